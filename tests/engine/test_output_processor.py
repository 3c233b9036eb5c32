"""OutputProcessor.process: its quick path for plain rows against the per-row `_on_token` path.

Two processors see the same random workload step by step (fake scheduler, no model): one as
the engine runs it, one with the quick path off (every produced row through `_on_token`, the
reference). Mixed parameters: ignore_eos, EOS hits, stop token ids, min_tokens, max_tokens and
max_model_len, stop strings, logprobs, streamed and unstreamed requests, n > 1, verification
steps emitting several tokens per row, aborts, rows scheduled without a new token. Their
outputs, finish calls and token counts must be equal at every step, each finish must follow
the documented rules (checked by a plain re-implementation here), and an output once yielded
must never change. A third processor runs the streamed requests as DELTA: at every step the
concatenation of its outputs must be the cumulative output. A fourth does the same with the
inline DELTA outputs of `collect` off (every output through `_output`): its outputs must equal
the third's.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest

import jaxllm.output_processor as output_processor
from jaxllm.default_model import default_model_path
from jaxllm.output_processor import OutputProcessor
from jaxllm.outputs import RequestOutput
from jaxllm.request import Request, RequestStatus
from jaxllm.runner import StepResult
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scheduler_output import ScheduledSeq, SchedulerOutput
from jaxllm.tokenizer import Tokenizer, load_tokenizer

MAX_MODEL_LEN = 48
TOP = 3  # top logprobs the fake sampler returns per position
_WORDS = ["the", " cat", " sat", " here", "!", "\n", " 世界", "🤗", " stop", " é"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(default_model_path())


class _FakeScheduler:
    """What OutputProcessor needs of a scheduler: finish (records the call) and abort."""

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}
        self.calls: list[tuple[str, RequestStatus, int | str | None]] = []

    def finish(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_STOPPED,
               stop_reason: int | str | None = None) -> Request | None:
        self.calls.append((request_id, status, stop_reason))
        req = self.requests.pop(request_id, None)
        if req is not None:
            req.status, req.stop_reason = status, stop_reason
        return req

    def abort(self, request_id: str) -> bool:
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED) is not None


class _World:
    """One processor with its own requests (finishes and replays mutate them)."""

    def __init__(self, tok: Tokenizer, quick: bool, quick_delta: bool = True) -> None:
        self.scheduler = _FakeScheduler()
        self.outputs = OutputProcessor(tok, self.scheduler, MAX_MODEL_LEN)
        self.quick = quick
        self.quick_delta = quick_delta
        self.on_token_calls = 0
        on_token = self.outputs._on_token

        def counted(*args):
            self.on_token_calls += 1
            return on_token(*args)

        self.outputs._on_token = counted

    def add(self, rid: str, prompt: list[int], params: SamplingParams, eos: tuple[int, ...],
            kind: RequestOutputKind) -> list[Request]:
        params = params.clone(output_kind=kind)
        ids = [rid] if params.n == 1 else [f"{rid}#{i}" for i in range(params.n)]
        seqs = [Request(sid, prompt, params, eos_token_ids=eos, sample_index=i,
                        parent_id=rid if params.n > 1 else None,
                        max_tokens=params.max_tokens if params.max_tokens is not None
                        else MAX_MODEL_LEN - len(prompt))
                for i, sid in enumerate(ids)]
        for s in seqs:
            s.status = RequestStatus.RUNNING
            self.scheduler.requests[s.request_id] = s
        self.outputs.add(rid, None, prompt, params, seqs)
        if not self.quick:  # the reference: every row through _on_token
            for s in seqs:
                self.outputs._samples[s.request_id].plain = False
        if not self.quick_delta:  # the reference: every output through _output
            self.outputs._tracked[rid].quick_delta = False
        return seqs


def _params(rng: random.Random, tok: Tokenizer) -> SamplingParams:
    stop = None
    if rng.random() < 0.2:
        stop = rng.sample([" sat", "here!", "界", "\n ", "t"], rng.randint(1, 2))
    eos = sorted(tok.eos_token_ids)
    max_tokens = rng.choice([None, None, 1, 3, 12, 30])
    return SamplingParams(
        n=rng.choice([1, 1, 1, 2]),
        max_tokens=max_tokens,
        min_tokens=min(rng.choice([0, 0, 2, 6]), max_tokens or 6),
        ignore_eos=rng.random() < 0.3,
        stop_token_ids=rng.sample(range(100, 120), rng.randint(0, 2)) + (
            eos[:1] if rng.random() < 0.1 else []),
        stop=stop,
        include_stop_str_in_output=rng.random() < 0.5,
        logprobs=rng.choice([None, None, None, None, 0, 2]),
        skip_special_tokens=rng.random() < 0.8,
    )


def _next_token(rng: random.Random, tok: Tokenizer, params: SamplingParams,
                words: list[list[int]]) -> int:
    r = rng.random()
    if r < 0.03:
        return rng.choice(sorted(tok.eos_token_ids))
    if r < 0.06 and params.stop_token_ids:
        return rng.choice(params.stop_token_ids)
    if r < 0.2:
        return rng.randrange(600)  # often stray bytes
    return rng.choice(rng.choice(words))


def _expected_finish(offered: list[int], n_prompt: int, params: SamplingParams,
                     max_tokens: int, eos: tuple[int, ...]):
    """The documented token rules, token by token: (output, status, stop reason), or None
    while the sequence goes on."""
    out: list[int] = []
    for t in offered:
        out.append(t)
        if len(out) >= params.min_tokens:
            if not params.ignore_eos and t in eos:
                return out, RequestStatus.FINISHED_STOPPED, None
            if t in params.stop_token_ids:
                return out, RequestStatus.FINISHED_STOPPED, t
        if len(out) >= max_tokens or n_prompt + len(out) >= MAX_MODEL_LEN:
            return out, RequestStatus.FINISHED_LENGTH, None
    return None


class _Concatenated:
    """A DELTA request's outputs so far, concatenated: what its cumulative output must be."""

    def __init__(self) -> None:
        self.samples: dict[int, dict] = {}

    def add(self, out: RequestOutput) -> RequestOutput:
        for c in out.outputs:
            acc = self.samples.setdefault(c.index, dict(
                text="", token_ids=[], logprobs=[] if c.logprobs is not None else None))
            acc["text"] += c.text
            acc["token_ids"] += c.token_ids
            if c.logprobs is not None:
                acc["logprobs"] += c.logprobs
            acc.update(cumulative_logprob=c.cumulative_logprob,
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        outputs = [type(c)(c.index, **self.samples[c.index]) for c in out.outputs]
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, outputs,
                             out.finished, out.prompt_logprobs, out.metrics)


def _step_result(rng: random.Random, tokens: np.ndarray) -> StepResult:
    """The sampled tokens ([S] or, verifying, [S, K+1]) with random logprobs around them."""
    shape = tokens.shape
    n = tokens.size
    return StepResult(
        tokens,
        np.array([rng.uniform(-5, 0) for _ in range(n)]).reshape(shape),
        np.array([rng.randint(1, 9) for _ in range(n)]).reshape(shape),
        np.array([rng.randrange(600) for _ in range(n * TOP)]).reshape(*shape, TOP),
        np.array([rng.uniform(-5, 0) for _ in range(n * TOP)]).reshape(*shape, TOP))


def _run_workload(tok: Tokenizer, seed: int, monkeypatch) -> None:
    rng = random.Random(seed)
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(output_processor, "time", SimpleNamespace(time=lambda: clock.now))
    words = [tok.encode(w, add_special_tokens=False) for w in _WORDS]
    eos = tuple(sorted(tok.eos_token_ids))
    fast, ref = _World(tok, quick=True), _World(tok, quick=False)
    delta = _World(tok, quick=True)  # streamed requests as DELTA
    delta_ref = _World(tok, quick=True, quick_delta=False)  # ... each output through _output
    concatenated: dict[str, _Concatenated] = {}
    live: dict[str, list[tuple[Request, Request, SamplingParams]]] = {}
    created: list[tuple[Request, SamplingParams]] = []  # the quick world's sequences
    offered: dict[str, list[int]] = {}  # sequence id -> every token it was handed
    kept: list[tuple[object, object]] = []  # (yielded output, a deep copy at the time)
    final: dict[str, object] = {}  # request id -> its last output
    first_scheduled: dict[str, float] = {}  # request id -> the clock at its first row
    first_token: dict[str, float] = {}  # request id -> the clock at its first token
    num_requests, tokens_handed = 0, 0
    for step in range(120):
        clock.now += 1.0
        if num_requests < 60 and (rng.random() < 0.4 or not live):
            rid, num_requests = f"r{num_requests}", num_requests + 1
            params = _params(rng, tok)
            prompt = [rng.randrange(600) for _ in range(rng.randint(1, 12))]
            stream = rng.random() < 0.6
            kind = RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY
            seqs_a = fast.add(rid, prompt, params, eos, kind)
            seqs_b = ref.add(rid, prompt, params, eos, kind)
            seqs_d = delta.add(rid, prompt, params, eos,
                               RequestOutputKind.DELTA if stream else kind)
            seqs_r = delta_ref.add(rid, prompt, params, eos,
                                   RequestOutputKind.DELTA if stream else kind)
            if stream:
                concatenated[rid] = _Concatenated()
            live[rid] = [(a, b, params, d, r)
                         for a, b, d, r in zip(seqs_a, seqs_b, seqs_d, seqs_r, strict=True)]
            created.extend((a, params) for a in seqs_a)
        if live and rng.random() < 0.04:  # an abort: both return the same final output
            rid = rng.choice(sorted(live))
            got, want = fast.outputs.abort(rid), ref.outputs.abort(rid)
            assert got == want, (seed, step)
            d = delta.outputs.abort(rid)
            assert delta_ref.outputs.abort(rid) == d, (seed, step)
            assert (concatenated[rid].add(d) if rid in concatenated else d) == got, (seed, step)
            final[rid] = got
            del live[rid]
        # The step: a random subset of running sequences in random order; some scheduled
        # without a new token (a prefill chunk), some with several (a verification).
        pairs = [pair for seqs in live.values() for pair in seqs
                 if pair[0].status is RequestStatus.RUNNING]
        rng.shuffle(pairs)
        pairs = pairs[:rng.randint(0, len(pairs))]
        verify = rng.random() < 0.25
        width = 4 if verify else 1
        tokens = np.full((len(pairs), width), -1, dtype=np.int64)
        produced = []
        for row, (a, b, params, d, r) in enumerate(pairs):
            rid = a.parent_id or a.request_id
            first_scheduled.setdefault(rid, clock.now)
            if rng.random() < 0.1:
                continue  # scheduled, nothing sampled
            produced.append(row)
            first_token.setdefault(rid, clock.now)
            for k in range(rng.randint(1, width)):
                t = _next_token(rng, tok, params, words)
                tokens[row, k] = t
                a.append_output(t)  # as Scheduler.update does, before process
                b.append_output(t)
                d.append_output(t)
                r.append_output(t)
                offered.setdefault(a.request_id, []).append(t)
                tokens_handed += 1
        result = _step_result(rng, tokens if verify else tokens[:, 0])
        for world, side in ((fast, 0), (ref, 1), (delta, 3), (delta_ref, 4)):
            seqs = [ScheduledSeq(p[side], [0], 0, 1, True, [], 0) for p in pairs]
            world.outputs.process(SchedulerOutput(seqs, None, len(seqs), 16, 0), result, produced)
        got, want = fast.outputs.collect(), ref.outputs.collect()
        where = (seed, step)
        assert got == want, where
        deltas = delta.outputs.collect()
        assert delta_ref.outputs.collect() == deltas, where  # the inline DELTA outputs
        assert [o.request_id for o in deltas] == [o.request_id for o in got], where
        for d, cumulative in zip(deltas, got, strict=True):
            rid = d.request_id
            assert (concatenated[rid].add(d) if rid in concatenated else d) == cumulative, where
        assert fast.scheduler.calls == ref.scheduler.calls, where
        assert fast.outputs.generation_tokens_total == ref.outputs.generation_tokens_total, where
        kept.extend((out, copy.deepcopy(out)) for out in got)
        for out in got:
            final[out.request_id] = out
            m = out.metrics
            assert (m.first_scheduled_time, m.first_token_time, m.finished_time) == (
                first_scheduled.get(out.request_id), first_token.get(out.request_id),
                clock.now if out.finished else None), where
            if out.finished:
                del live[out.request_id]
    for out, snapshot in kept:
        assert out == snapshot, (seed, out.request_id)  # later steps left it alone
    # Every finish follows the token rules (stop strings aside: the detokenizer's twin tests
    # cover those), reported to the scheduler once; the final text is the decode of the ids.
    finishes = [sid for sid, status, _ in fast.scheduler.calls
                if status is not RequestStatus.FINISHED_ABORTED]
    assert len(finishes) == len(set(finishes)), seed
    for a, params in created:
        if a.status is RequestStatus.FINISHED_ABORTED or params.stop:
            continue
        expected = _expected_finish(offered.get(a.request_id, []), a.num_prompt_tokens, params,
                                    a.max_tokens, eos)
        if expected is None:
            assert a.status is RequestStatus.RUNNING, (seed, a.request_id)
            continue
        assert (a.output_token_ids, a.status, a.stop_reason) == expected, (seed, a.request_id)
        assert a.request_id in finishes
        out = final.get(a.parent_id or a.request_id)  # (None: unstreamed, a sibling runs)
        if out is not None and out.finished:
            c = out.outputs[a.sample_index]
            assert c.token_ids == a.output_token_ids
            assert c.text == tok.decode(c.token_ids, params.skip_special_tokens), (seed, c)
    # The quick path did most of the work in the engine's processor.
    quick_rows = ref.on_token_calls - fast.on_token_calls
    assert quick_rows >= tokens_handed // 25, (seed, quick_rows, tokens_handed)


@pytest.mark.parametrize("rep", range(4))
def test_quick_path_equals_per_row_reference_on_random_workloads(tok, monkeypatch, rep):
    _run_workload(tok, random.randrange(1 << 30), monkeypatch)
