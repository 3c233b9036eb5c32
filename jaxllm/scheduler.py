"""Who runs in the next step: continuous batching under a token budget, with chunked prefill,
prefix reuse, n>1 page sharing and preemption by recompute.

Each `schedule()` builds one unified ragged step: running decodes first, then prefill chunks
of running (partially prefilled) requests, then new or preempted requests from the waiting
queue (priority, then arrival). When a running request needs a page and none is free, the
lowest-priority newest running request is preempted: its pages are freed and it waits again
with its output intact; on resume prompt + output are prefilled again.

`schedule()` advances each scheduled request's num_computed_tokens at once, so a prefill
chunk can be scheduled again before the previous step's `update()`. A request whose next
token is being sampled waits for `update()`, except with `schedule(lookahead=True)` (the
engine's overlapped loop): then a decoding request whose one pending token is still on the
device is scheduled once more with a placeholder, and the runner takes that token's id from
the in-flight step's sampler output (`ScheduledSeq.prev_row`). If the pending token ends the
request, the look-ahead row's result is discarded by `update()` (the request is finished).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

import numpy as np

from jaxllm.buckets import BucketSet
from jaxllm.cache.invariants import check_invariants
from jaxllm.cache.manager import KVCacheManager, cdiv
from jaxllm.request import Request, RequestStatus
from jaxllm.scheduler_config import SchedulerConfig
from jaxllm.scheduler_output import ScheduledSeq, SchedulerOutput
from jaxllm.spec.scheduling import Speculation

logger = logging.getLogger(__name__)


class Scheduler:
    """Continuous-batching scheduler over a `KVCacheManager` and a `BucketSet`."""

    def __init__(self, config: SchedulerConfig, cache: KVCacheManager, buckets: BucketSet,
                 speculation: Speculation | None = None) -> None:
        """`speculation`: proposes draft tokens for decoding requests (None: no speculation)."""
        if buckets.token_buckets[-1] < config.max_num_batched_tokens:
            raise ValueError("largest token bucket is below max_num_batched_tokens")
        if buckets.page_widths[-1] * cache.page_size < config.max_model_len:
            raise ValueError("widest page table does not cover max_model_len")
        if buckets.page_size != cache.page_size:
            raise ValueError(f"bucket page_size {buckets.page_size} != cache page_size "
                             f"{cache.page_size}")
        self.config = config
        self.speculation = speculation
        self.cache = cache
        self.allocator = cache.allocator
        self.buckets = buckets
        self.page_size = cache.page_size
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._running_sorted = True  # running is in _key order (admissions unsort it)
        self.requests: dict[str, Request] = {}  # live (not finished) requests by id
        self._order: dict[str, int] = {}
        self._next_order = 0
        self._fork_wait: dict[str, Request] = {}  # sibling id -> leader it waits for
        self.num_preemptions = 0
        self.num_steps = 0

    # ---- admission ----------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue one sequence; ValueError (nothing queued) if it can never run."""
        self._validate(req)
        self._enqueue(req)

    def add_parallel_samples(self, samples: Sequence[Request]) -> None:
        """Queue the n samples of one request. The first is prefilled alone; the others wait
        until its prefill has filled the prompt's full pages, then share them and recompute
        only the prompt's tail into pages of their own."""
        if not samples:
            raise ValueError("no samples")
        for req in samples:
            self._validate(req)
        if len({r.request_id for r in samples}) != len(samples):
            raise ValueError("sample request ids must be distinct")
        leader = samples[0]
        shared = self._fork_pages(leader)
        for req in samples:
            if list(req.prompt_token_ids) != list(leader.prompt_token_ids):
                raise ValueError("parallel samples must share one prompt")
            self._enqueue(req)
            if req is not leader and shared > 0:
                self._fork_wait[req.request_id] = leader

    def _validate(self, req: Request) -> None:
        rid, n_prompt = req.request_id, req.num_prompt_tokens
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already running")
        if req.status is not RequestStatus.WAITING or req.output_token_ids or req.page_ids:
            raise ValueError(f"request {rid!r} is not a fresh request")
        if n_prompt == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        max_len = self.config.max_model_len
        capacity = min(max_len, self.allocator.num_usable_pages * self.page_size)
        if n_prompt >= capacity:
            raise ValueError(
                f"request {rid!r}: prompt of {n_prompt} tokens leaves no room to generate "
                f"(max_model_len {max_len}, KV cache {self.allocator.num_usable_pages} pages x "
                f"{self.page_size} tokens)")
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is None:
            req.max_tokens = capacity - n_prompt
        elif n_prompt + max_tokens > max_len:
            raise ValueError(
                f"request {rid!r}: prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = "
                f"{n_prompt + max_tokens} exceeds max_model_len {max_len}")
        elif n_prompt + max_tokens > capacity:
            raise ValueError(
                f"request {rid!r}: prompt ({n_prompt}) + max_tokens ({max_tokens}) needs "
                f"{cdiv(n_prompt + max_tokens, self.page_size)} pages; the KV cache has "
                f"{self.allocator.num_usable_pages}")
        else:
            req.max_tokens = max_tokens

    def _enqueue(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self._order[req.request_id] = self._next_order
        self._next_order += 1
        self.waiting.append(req)

    def _fork_pages(self, leader: Request) -> int:
        """Full prompt pages siblings can share (the last prompt token is always recomputed)."""
        return (leader.num_prompt_tokens - 1) // self.page_size

    def _key(self, req: Request) -> tuple[int, float, int]:
        return (req.priority, req.arrival_time, self._order[req.request_id])

    # ---- one step -----------------------------------------------------------------------
    def schedule(self, lookahead: bool = False) -> SchedulerOutput:
        """The next step. `lookahead`: the previous step is still in flight; decoding requests
        waiting for its token may be scheduled with a placeholder (see the module docstring)."""
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        scheduled: set[str] = set()
        preempted: list[Request] = []
        withheld = 0  # budget held back to land the step on a bucket
        if not self._running_sorted:
            self.running.sort(key=self._key)
            self._running_sorted = True
        budget = self._decode_pass(seqs, scheduled, preempted, budget, lookahead)
        # The prefill pass (steady decoding: everyone was scheduled by the decode pass).
        candidates = ([] if len(scheduled) == len(self.running)  # (steady decoding)
                      else [r for r in self.running if r.request_id not in scheduled])
        if (candidates or self.waiting) and self.config.align_prefill_to_buckets:
            aligned = self._aligned_prefill_budget(
                self.config.max_num_batched_tokens - budget, budget, scheduled)
            withheld, budget = budget - aligned, aligned
        chunk = self.config.chunk_size
        for req in candidates:
            if budget == 0 or len(seqs) >= self.config.max_num_seqs:
                break
            if (req.status is not RequestStatus.RUNNING or req.request_id in scheduled
                    or req.num_pending_samples):
                continue
            remaining = len(req.all_token_ids) - req.num_computed_tokens
            if remaining == 1:
                continue  # a decode the decode pass left (budget or preemption)
            n = min(remaining, budget, chunk)
            if not self._grow_or_preempt(req, n, scheduled, preempted):
                continue
            seqs.append(self._take(req, n, len(seqs)))
            scheduled.add(req.request_id)
            budget -= n
        if not preempted:
            budget = self._admit_waiting(seqs, scheduled, budget)
        num_tokens = self.config.max_num_batched_tokens - withheld - budget
        bucket = None
        if seqs:
            widest = max([len(s.page_ids) for s in seqs])
            bucket = self.buckets.pick(num_tokens, len(seqs), widest)
            self.num_steps += 1
        null = self.allocator.null_page
        return SchedulerOutput(seqs, bucket, num_tokens, self.page_size,
                               0 if null is None else null, preempted)

    def _decode_pass(self, seqs: list[ScheduledSeq], scheduled: set[str],
                     preempted: list[Request], budget: int, lookahead: bool) -> int:
        """Schedule every running request that decodes (one known token, plus any drafts;
        or, with `lookahead`, the placeholder of its in-flight token); returns the budget
        left. The hottest loop of the host side (once per running request per step): the
        one-token cases are inlined (`_take` for them), reading request fields directly,
        and the page check is skipped when a request's pages have room."""
        max_seqs = self.config.max_num_seqs
        max_model_len = self.config.max_model_len
        chunk = self.config.chunk_size
        page_size = self.page_size
        speculation = self.speculation
        running = RequestStatus.RUNNING
        # (running holds each request once and the decode pass runs first: a request is in
        # `scheduled` only after its turn here, or preempted, no longer RUNNING.)
        for req in list(self.running):
            if budget == 0 or len(seqs) >= max_seqs:
                break
            if req.status is not running:
                continue
            all_ids = req.all_token_ids
            num_tokens = len(all_ids)
            start = req.num_computed_tokens
            if req.num_pending_samples:
                # Look-ahead: only a plain decode whose pending token cannot end it by length
                # (that row would be wasted). (If its sampling reads the token history on the
                # host, the engine dispatches that step's sampler once the token is known.)
                if not (lookahead and req.num_pending_samples == 1 and start == num_tokens
                        and len(req.output_token_ids) + 1 < req.max_tokens
                        and num_tokens + 1 < max_model_len):
                    continue
                token, prev_row = 0, req.sample_row  # a placeholder for the pending token
            else:
                if num_tokens - start != 1:
                    continue  # a prompt (chunk): the prefill pass
                if speculation is not None and (
                        drafts := speculation.drafts_for(req, len(self.running))):
                    n = min(1 + len(drafts), budget, chunk)
                    if (start + n > len(req.page_ids) * page_size
                            and not self._grow_or_preempt(req, n, scheduled, preempted)):
                        continue
                    seqs.append(self._take(req, n, len(seqs), drafts[:n - 1]))
                    scheduled.add(req.request_id)
                    budget -= n
                    continue
                token, prev_row = all_ids[start], None
            # One token (what `_take` does for it, inlined).
            if (start + 1 > len(req.page_ids) * page_size
                    and not self._grow_or_preempt(req, 1, scheduled, preempted)):
                continue
            pending = req.num_pending_samples + 1
            req.num_computed_tokens = start + 1
            req.num_draft_tokens = 0
            req.num_pending_samples = pending
            req.sample_row = len(seqs)
            pages = req.scheduled_pages  # (the last step's list while the row keeps its pages)
            if len(pages) != (start + page_size) // page_size:
                pages = req.scheduled_pages = req.page_ids[:(start + page_size) // page_size]
            seqs.append(ScheduledSeq(
                req, [token], start, 1, True, pages,
                req.num_preemptions, len(req.output_token_ids) + pending - 1, prev_row))
            scheduled.add(req.request_id)
            budget -= 1
        return budget

    def _aligned_prefill_budget(self, used: int, budget: int, scheduled: set[str]) -> int:
        """Prompt-token budget after `used` decode tokens: all of `budget`, or less when the
        step's tokens then fall on a token bucket instead of being padded further up.

        E.g. 31 decodes + a 128-token prompt = 159 tokens would pad to a 512-token bucket
        (buckets 128, 512): taking 97 prompt tokens fills the 128 bucket and the other 31 ride
        along with the next step's decodes. Only with decodes in the step (`used` > 0): they
        make a next step happen anyway, while a prompt alone would pay a whole extra step
        (its fixed cost of reading the weights) for what it defers."""
        if used == 0:
            return budget
        pending = 0
        for r in itertools.chain(self.running, self.waiting):  # stops once the budget is met
            if r.request_id in scheduled or r.awaiting_sample or r.status.is_finished:
                continue
            pending += r.num_tokens - r.num_computed_tokens
            if pending >= budget:
                break
        want = used + min(budget, pending)
        ladder = self.buckets.token_buckets
        up = next((t for t in ladder if t >= want), ladder[-1])
        down = max((t for t in ladder if t <= want), default=0)
        if down > used and want - down < up - want:
            return down - used
        return budget

    def _grow_or_preempt(self, req: Request, n: int, scheduled: set[str],
                         preempted: list[Request]) -> bool:
        """Pages for n more tokens of req, preempting newest running requests as needed.
        False if req itself had to be preempted."""
        if req.num_computed_tokens + n <= len(req.page_ids) * self.page_size:
            return True  # its pages already hold the new tokens (most decode steps)
        while not self.cache.allocate_slots(req, n):
            victims = [r for r in self.running if r.request_id not in scheduled]
            victim = max(victims, key=self._key)
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, seqs: list[ScheduledSeq], scheduled: set[str], budget: int) -> int:
        self.waiting.sort(key=self._key)
        for req in list(self.waiting):
            if (budget == 0 or len(seqs) >= self.config.max_num_seqs
                    or len(self.running) >= self.config.max_num_seqs):
                break
            if req.request_id in self._fork_wait:
                continue
            n = self._try_allocate(req, budget)
            if n == 0 and self._release_waiting_pages(req):
                n = self._try_allocate(req, budget)
            if n == 0:
                break  # first come first served: nobody overtakes the head of the queue
            self.waiting.remove(req)
            self.running.append(req)
            self._running_sorted = False
            req.status = RequestStatus.RUNNING
            seqs.append(self._take(req, n, len(seqs)))
            scheduled.add(req.request_id)
            budget -= n
        return budget

    def _try_allocate(self, req: Request, budget: int) -> int:
        """Take a waiting request's cached prefix and pages for its next chunk; returns the
        chunk's token count, 0 (nothing taken) if pages are short."""
        fresh = not req.page_ids  # forked siblings already hold their shared pages
        cached = self.cache.find_cached_prefix(req)
        hit = len(cached) * self.page_size
        n = min(req.num_tokens - req.num_computed_tokens - hit, budget, self.config.chunk_size)
        if not self.cache.allocate_slots(req, n, cached):
            return 0
        if self.cache.enable_prefix_caching and fresh:
            self.cache.stats.record(req.num_tokens, hit)
        if cached and req.num_preemptions == 0:
            req.num_cached_tokens = min(hit, req.num_prompt_tokens)
        return n

    def _release_waiting_pages(self, head: Request) -> bool:
        """Free the pages that forked siblings hold while they wait, so they cannot starve
        the head of the queue (they prefill from scratch, or from the prefix cache, later)."""
        holders = [r for r in self.waiting if r.page_ids and r is not head]
        for r in holders:
            self.cache.free(r)
        return bool(holders)

    def _take(self, req: Request, n: int, row: int, drafts: Sequence[int] = ()) -> ScheduledSeq:
        """Record that the step feeds req's next n tokens as its row `row` (the last
        len(drafts) of them proposed tokens)."""
        start = req.num_computed_tokens
        num_tokens = len(req.all_token_ids)
        placeholder = start == num_tokens  # look-ahead: the pending token is on the device
        req.num_computed_tokens = computed = start + n
        req.num_draft_tokens = len(drafts)
        samples = computed >= num_tokens
        prev_row = req.sample_row if placeholder else None
        if samples:
            req.num_pending_samples += 1
            req.sample_row = row
        if placeholder:
            token_ids = [0]
        else:
            token_ids = req.all_token_ids[start:start + n - len(drafts)]
        if drafts:
            token_ids += drafts
        return ScheduledSeq(
            req, token_ids, start, n, samples, req.page_ids[:-(-computed // self.page_size)],
            req.num_preemptions, len(req.output_token_ids) + req.num_pending_samples - 1,
            prev_row, list(drafts) if drafts else ())

    def _preempt(self, req: Request) -> None:
        logger.debug("preempting %s (%d tokens)", req.request_id, req.num_tokens)
        self.cache.free(req)
        self.running.remove(req)
        req.status = RequestStatus.PREEMPTED
        req.num_pending_samples = 0
        req.num_draft_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)

    # ---- results ------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled_token_ids: Sequence | np.ndarray
               ) -> list[int]:
        """Apply a finished step: sampled_token_ids[i] is what row output.seqs[i] sampled:
        one token, or (a verification step) its emitted tokens, -1 after them (entries of
        non-sampling and padded rows are ignored). A speculating row keeps its accepted
        drafts' KV (num_computed_tokens rolls back past the rejected ones; no copies).
        Returns the rows whose sequence got new tokens. Whether a token ends the sequence is
        the output processor's call (`jaxllm.output_processor`), which then calls `finish`."""
        produced: list[int] = []
        computed: list[tuple[Request, int]] = []  # (sequence, tokens now in the KV cache)
        sampled_array = np.asarray(sampled_token_ids)
        per_row = sampled_array.ndim == 2
        sampled = sampled_array.tolist()  # Python ints at once (not one numpy scalar per row)
        running = RequestStatus.RUNNING
        for i, seq in enumerate(output.seqs):
            req = seq.request
            if req.status is not running or seq.epoch != req.num_preemptions:
                continue  # aborted, finished or preempted since this step was scheduled
            kv_len = seq.start_pos + seq.num_new_tokens
            if not seq.samples:
                computed.append((req, kv_len))
                continue
            req.num_draft_tokens = 0
            req.num_pending_samples -= 1
            if not per_row:  # one sampled token (the hot path: every decode step)
                token = sampled[i]  # (`append_output`, inlined)
                req.output_token_ids.append(token)
                req.all_token_ids.append(token)
                computed.append((req, kv_len))
                produced.append(i)
                continue
            tokens = [t for t in sampled[i] if t >= 0]
            if seq.drafts:
                accepted = len(tokens) - 1
                req.num_computed_tokens -= len(seq.drafts) - accepted  # rejected drafts' slots
                if self.speculation is not None:
                    self.speculation.record(req.request_id, len(seq.drafts), accepted)
            for token in tokens:  # (accepted drafts first: their KV is verified)
                req.append_output(token)
            computed.append((req, kv_len - len(seq.drafts) + len(tokens) - 1))
            produced.append(i)
        self.cache.register_computed_rows(computed)
        if self._fork_wait:
            for req, num_tokens in computed:
                self._maybe_fork(req, num_tokens)
        return produced

    def _maybe_fork(self, leader: Request, computed: int) -> None:
        need = self._fork_pages(leader) * self.page_size
        if computed < need:
            return
        for sid, lead in list(self._fork_wait.items()):
            if lead is leader:
                del self._fork_wait[sid]
                self.cache.fork(leader, self.requests[sid], self._fork_pages(leader))

    def finish(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_STOPPED,
               stop_reason: int | str | None = None) -> Request | None:
        """End a request (the output processor found a stop, or an abort); frees its pages."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, status, stop_reason)
        return req

    def abort(self, request_id: str) -> bool:
        """Drop a waiting, running or preempted request and free its pages now."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED) is not None

    def _finish(self, req: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        self.cache.free(req)
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        del self.requests[req.request_id]
        del self._order[req.request_id]
        self._fork_wait.pop(req.request_id, None)
        for sid, lead in list(self._fork_wait.items()):
            if lead is req:  # its siblings prefill on their own
                del self._fork_wait[sid]
        req.status = status
        req.stop_reason = stop_reason
        req.num_pending_samples = 0
        req.num_draft_tokens = 0
        if self.speculation is not None:
            self.speculation.drop(req.request_id)

    # ---- state --------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def reset_prefix_cache(self) -> int:
        return self.cache.reset_prefix_cache()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def page_usage(self) -> float:
        return self.allocator.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cache.stats.hit_rate

    def stats(self) -> dict[str, float]:
        return {"num_running": self.num_running, "num_waiting": self.num_waiting,
                "page_usage": self.page_usage, "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
                "num_preemptions": self.num_preemptions}

    def check_invariants(self, extra_requests: Iterable[Request] = ()) -> None:
        """Pages, queues and request states agree (AssertionError otherwise); with no live
        request left, no page may be owned (no leak)."""
        live = list(self.requests.values())
        assert len(self.running) + len(self.waiting) == len(live), "a request is in no queue"
        assert {r.request_id for r in self.running + self.waiting} == set(self.requests)
        for r in self.running:
            assert r.status is RequestStatus.RUNNING, f"{r.request_id} running as {r.status}"
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not r.awaiting_sample
        for sid in self._fork_wait:
            assert not self.requests[sid].page_ids, f"sibling {sid} holds pages before its fork"
        assert len(self.running) <= self.config.max_num_seqs
        check_invariants(self.allocator, [*live, *extra_requests],
                         expect_no_used_pages=not live)
