"""The scheduler tests' harness: a fake runner and a plain reference generator.

The fake device mimics the runner and the attention kernel on token ids: it writes each fed
token (and its position) into a page store through the step's page table, then for every
sampling row reads the whole context back through the page table and checks it equals the
request's own tokens (so shared, evicted, freed or preempted pages can never leak into
another sequence unnoticed). The next token is a fixed function of that context, so every
request's output must equal `reference_generate`, however it was batched, chunked, cached or
preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.buckets import BucketSet
from jaxllm.cache import KVCacheManager, PageAllocator
from jaxllm.model_inputs import StepInputs, build_step_inputs
from jaxllm.output_processor import token_stop
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 61
EOS = (5,)
_WEIGHTS = np.random.default_rng(1234).integers(1, 1 << 20, size=4096, dtype=np.int64)


def next_token(context: list[int] | np.ndarray) -> int:
    ctx = np.asarray(context, dtype=np.int64)
    return int((ctx * _WEIGHTS[:len(ctx)]).sum() % VOCAB)


def reference_generate(prompt: list[int], sp: SamplingParams, max_model_len: int,
                       capacity: int) -> tuple[list[int], RequestStatus, int | None]:
    """One sequence, token by token, with the documented stop rules."""
    tokens, out = list(prompt), []
    max_tokens = sp.max_tokens if sp.max_tokens is not None else capacity - len(prompt)
    while True:
        t = next_token(tokens)
        out.append(t)
        tokens.append(t)
        if len(out) >= sp.min_tokens:
            if not sp.ignore_eos and t in EOS:
                return out, RequestStatus.FINISHED_STOPPED, None
            if t in sp.stop_token_ids:
                return out, RequestStatus.FINISHED_STOPPED, t
        if len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH, None


class FakeDevice:
    """Page store of (token, position) per slot; see the module docstring."""

    def __init__(self, num_pages: int, page_size: int, buckets: BucketSet) -> None:
        self.store = np.full((num_pages, page_size, 2), -1, dtype=np.int64)
        self.page_size = page_size
        self.buckets = set(buckets.all())
        self.steps: list[SchedulerOutput] = []

    def step(self, out: SchedulerOutput, prev_sampled: np.ndarray | None = None) -> np.ndarray:
        """Run a step; `prev_sampled`: the in-flight step's sampled ids, which look-ahead
        placeholders (prev_sample_rows) read, as the runner does on the device."""
        assert out.bucket in self.buckets, f"{out.bucket} not in the bucket set"
        self.steps.append(out)
        a = _flat(build_step_inputs(out))
        ps, n = self.page_size, int(a["num_seqs"][0])
        cu, kv_lens, pages = a["cu_q_lens"], a["kv_lens"], a["page_indices"]
        assert n == len(out.seqs) and cu[n] == out.num_tokens
        # padding: tokens id/pos 0, seqs kv_len 0 and q_len 0, tables on the null page
        assert not a["input_ids"][cu[n]:].any() and not a["positions"][cu[n]:].any()
        assert not kv_lens[n:].any() and (cu[n:] == cu[n]).all()
        assert (pages[n:] == out.null_page).all()
        for s in range(n):
            used = -(-int(kv_lens[s]) // ps)
            assert (pages[s, used:] == out.null_page).all()
            assert out.null_page not in pages[s, :used]
            q0, q1 = int(cu[s]), int(cu[s + 1])
            for j in range(q0, q1):
                pos = int(kv_lens[s]) - (q1 - q0) + (j - q0)
                assert a["positions"][j] == pos
                token = a["input_ids"][j]
                if a["prev_sample_rows"][j] >= 0:  # look-ahead placeholder
                    assert token == 0 and prev_sampled is not None
                    token = prev_sampled[a["prev_sample_rows"][j]]
                    assert token >= 0, "placeholder points at a row that sampled nothing"
                self.store[pages[s, pos // ps], pos % ps] = (token, pos)
        sampled = np.full(out.bucket.num_seqs, -1, dtype=np.int64)
        for s, seq in enumerate(out.seqs):
            assert a["logits_indices"][s] == cu[s + 1] - 1
            kv = int(kv_lens[s])
            ctx = self.store[pages[s, :-(-kv // ps)]].reshape(-1, 2)[:kv]
            assert (ctx[:, 1] == np.arange(kv)).all(), "read a slot holding another position"
            expected = seq.request.all_token_ids[:kv]
            if seq.prev_row is not None:  # the pending token is not appended yet
                expected = expected + [int(prev_sampled[seq.prev_row])]
            assert ctx[:, 0].tolist() == expected, f"{seq.request.request_id} read foreign KV"
            if seq.samples:
                sampled[s] = next_token(ctx[:, 0])
        return sampled


@dataclass
class Setup:
    sched: Scheduler
    device: FakeDevice
    alloc: PageAllocator


def make(num_pages: int = 64, page_size: int = 4, max_num_seqs: int = 8,
         max_num_batched_tokens: int = 32, max_model_len: int = 128, chunk: int | None = None,
         prefix_caching: bool = True, align: bool = True) -> Setup:
    alloc = PageAllocator(num_pages, page_size)
    cache = KVCacheManager(alloc, enable_prefix_caching=prefix_caching)
    buckets = BucketSet(max_num_batched_tokens, max_num_seqs, max_model_len, page_size,
                        min_page_width=2)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len, prefill_chunk_size=chunk,
                          align_prefill_to_buckets=align)
    return Setup(Scheduler(cfg, cache, buckets), FakeDevice(num_pages, page_size, buckets), alloc)


def req(rid: str, prompt: list[int], t: float = 0.0, **sp_kwargs) -> Request:
    salt = sp_kwargs.pop("cache_salt", None)
    priority = sp_kwargs.pop("priority", 0)
    sp_kwargs.setdefault("max_tokens", 8)
    return Request(rid, prompt, SamplingParams(**sp_kwargs), eos_token_ids=EOS,
                   arrival_time=t, cache_salt=salt, priority=priority)


def _flat(inputs: StepInputs) -> dict[str, np.ndarray]:
    """StepInputs as one dict of host arrays, attention fields without their prefix."""
    return {k.removeprefix("attention."): v for k, v in inputs.to_flat().items()}


def apply_step(s: Setup, out: SchedulerOutput, sampled) -> list[Request]:
    """What the engine does with a step's tokens: the scheduler appends them, the output
    processor's token rule decides finishes and tells the scheduler. Returns the finished."""
    finished = []
    for row in s.sched.update(out, sampled):
        r = out.seqs[row].request
        stop = token_stop(r, r.output_token_ids[-1], s.sched.config.max_model_len)
        if stop is not None:
            s.sched.finish(r.request_id, *stop)
            finished.append(r)
    return finished


def run_step(s: Setup) -> tuple[SchedulerOutput, list[Request]]:
    out = s.sched.schedule()
    s.sched.check_invariants([r for r in out.preempted if r.is_finished])
    finished = apply_step(s, out, s.device.step(out)) if out.seqs else []
    s.sched.check_invariants(finished)
    return out, finished


@dataclass
class Overlap:
    """The overlapped loop's state: the dispatched step not yet applied."""

    in_flight: tuple[SchedulerOutput, np.ndarray] | None = None


def overlapped_step(s: Setup, state: Overlap) -> tuple[SchedulerOutput | None, list[Request]]:
    """What the engine's overlapped loop does: schedule and dispatch step N+1 (look-ahead
    placeholders reading step N's sampled ids), then apply step N. Returns (step N+1, the
    requests step N finished)."""
    prev = state.in_flight
    out = s.sched.schedule(lookahead=prev is not None)
    s.sched.check_invariants([r for r in out.preempted if r.is_finished])
    state.in_flight = (out, s.device.step(out, prev[1] if prev else None)) if out.seqs else None
    finished = apply_step(s, *prev) if prev is not None else []
    s.sched.check_invariants(finished)
    return (out if out.seqs else None), finished


def drive(s: Setup, arrivals: dict[int, list[Request]] | None = None,
          max_steps: int = 2000, overlap: bool = False) -> list[SchedulerOutput]:
    """Add arrivals at their step, run until idle; invariants after every step.
    `overlap`: drive it as the engine's overlapped loop does."""
    arrivals = dict(arrivals or {})
    outs = []
    state = Overlap()
    for step in range(max_steps):
        for r in arrivals.pop(step, []):
            s.sched.add_request(r)
        if not s.sched.has_work() and not arrivals and state.in_flight is None:
            break
        out = overlapped_step(s, state)[0] if overlap else run_step(s)[0]
        if out is not None:
            outs.append(out)
    else:
        raise AssertionError("scheduler did not drain")
    s.sched.check_invariants()
    assert s.alloc.num_used_pages == 0
    return outs


def assert_matches_reference(s: Setup, reqs: list[Request]) -> None:
    cap = s.alloc.num_usable_pages * s.alloc.page_size
    for r in reqs:
        out, status, reason = reference_generate(r.prompt_token_ids, r.sampling_params,
                                                 s.sched.config.max_model_len, cap)
        assert (r.output_token_ids, r.status, r.stop_reason) == (out, status, reason), r.request_id


def prompts(rng: np.random.Generator, lengths: list[int]) -> list[list[int]]:
    return [rng.integers(6, VOCAB, size=n).tolist() for n in lengths]
