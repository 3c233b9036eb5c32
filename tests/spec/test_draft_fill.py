"""`DraftProposer.fill` against a fake draft runner whose "model" reads its paged KV cache:
its next token is a hash of the whole context it finds in the cache, so a proposal equals the
true greedy continuation only if every position the draft attends to holds the request's
token (or the draft fed just before it). Rounds of proposals and simulated verifications
(accepted drafts, corrected and bonus tokens, a preemption onto new pages) check the
catch-up bookkeeping, the split of a catch-up longer than the token budget, and that a
steady-state proposal feeds only the 1 or 2 tokens the draft has not seen. No compilation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from jaxllm.buckets import BucketSet
from jaxllm.cache.manager import cdiv
from jaxllm.request import Request
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler_output import ScheduledSeq, SchedulerOutput
from jaxllm.spec.draft import DraftProposer, DraftState

PAGE, VOCAB, K, BUDGET, ROWS = 4, 50, 3, 16, 4


def _next_token(context: list[int | None]) -> int:
    if any(t is None for t in context):
        return -1  # read a position nobody wrote: never the true continuation
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % VOCAB


class FakeDraftRunner:
    """Writes each fed token into a dict keyed by (page, slot); returns, per sequence, the
    next token of the context read back through its page table (as `logits`)."""

    def __init__(self) -> None:
        self.kv: dict[tuple[int, int], int] = {}
        self.calls: list[int] = []  # tokens fed per call

    def forward(self, inputs, prev_tokens=None):
        ids = np.asarray(inputs.input_ids).copy()
        rows = np.asarray(inputs.prev_sample_rows)
        if prev_tokens is not None:
            ids = np.where(rows >= 0, np.asarray(prev_tokens)[np.maximum(rows, 0)], ids)
        md = inputs.attention
        n, cu = int(md.num_seqs[0]), np.asarray(md.cu_q_lens)
        self.calls.append(int(cu[n]))
        out = np.zeros(len(inputs.logits_indices), np.int32)
        for s in range(n):
            table = md.page_indices[s]
            for t in range(cu[s], cu[s + 1]):
                p = int(inputs.positions[t])
                assert table[p // PAGE] != 0, "wrote through the null page"
                self.kv[(int(table[p // PAGE]), p % PAGE)] = int(ids[t])
            out[s] = _next_token([self.kv.get((int(table[p // PAGE]), p % PAGE))
                                  for p in range(int(md.kv_lens[s]))])
        return SimpleNamespace(logits=out)

    def sample(self, logits, tensors):
        return SimpleNamespace(next_input_ids=np.pad(logits, (0, ROWS - len(logits))))


def _greedy(tokens: list[int], k: int) -> list[int]:
    out = []
    for _ in range(k):
        out.append(_next_token(tokens + out))
    return out


def _scheduled(req: Request, k: int) -> ScheduledSeq:
    """What the scheduler hands over for a speculating row: last token + k placeholders."""
    n = req.num_tokens
    return ScheduledSeq(request=req, token_ids=[req.all_token_ids[-1]] + [0] * k,
                        start_pos=n - 1, num_new_tokens=1 + k, samples=True,
                        page_ids=req.page_ids[:cdiv(n + k, PAGE)], epoch=req.num_preemptions,
                        drafts=[0] * k)


def test_fill_proposes_the_drafts_greedy_continuation_through_its_cache():
    rng = np.random.default_rng(3)
    runner = FakeDraftRunner()
    proposer = DraftProposer(runner, BucketSet(BUDGET, ROWS, 64, PAGE), VOCAB)
    reqs = [Request(request_id=f"r{i}", prompt_token_ids=rng.integers(0, VOCAB, n).tolist(),
                    sampling_params=SamplingParams()) for i, n in enumerate([3, 21, 7])]
    for i, r in enumerate(reqs):
        r.page_ids = list(range(1 + 16 * i, 17 + 16 * i))  # 64 positions each
    for rnd in range(8):
        calls = len(runner.calls)
        seqs = [_scheduled(r, K if rnd % 2 == 0 else 1 + (rnd + j) % K)
                for j, r in enumerate(reqs)]
        proposer.fill(SchedulerOutput(seqs, None, 0, PAGE, 0))
        for s in seqs:
            want = _greedy(s.request.all_token_ids, len(s.drafts))
            assert s.drafts == want and s.token_ids[1:] == want, (rnd, s.request.request_id)
        assert max(runner.calls[calls:]) <= BUDGET
        if rnd == 0:
            assert len(runner.calls) - calls > K, "the 31-token catch-up was not split"
        elif rnd not in (5,):
            # steady state: each sequence feeds its corrected or bonus token, and the last
            # accepted draft when all were accepted
            assert runner.calls[calls] <= 2 * len(reqs)
        # a verification: some drafts accepted, then a token the draft did not propose
        for s in seqs:
            accepted = int(rng.integers(0, len(s.drafts) + 1))
            for t in s.drafts[:accepted]:
                s.request.append_output(t)
            banned = s.drafts[accepted] if accepted < len(s.drafts) else -1
            s.request.append_output(next(t for t in rng.permutation(VOCAB).tolist()
                                         if t != banned))
        if rnd == 4:  # r1 preempted and resumed on other pages: its draft KV is gone
            reqs[1].num_preemptions += 1
            reqs[1].page_ids = list(range(49, 65))
    for r in reqs:
        proposer.drop(r.request_id)
    assert len(proposer) == 0


def test_draft_kv_is_valid_up_to_the_first_unconfirmed_proposal():
    # the draft was fed the last token at 9 and proposals 5, 6 at 10, 11 (it proposed 5, 6, 7)
    state = DraftState(epoch=0, start=10, fed=[5, 6])
    history = list(range(10))
    assert state.valid_length(history) == 10  # nothing verified yet
    assert state.valid_length(history + [5, 6, 7, 8]) == 12  # all accepted (+ bonus 8)
    assert state.valid_length(history + [5, 9]) == 11  # 6 rejected, 9 drawn instead
    assert state.valid_length(history + [4]) == 10  # 5 rejected
    assert DraftState(epoch=0, start=10).valid_length(history + [1]) == 10
