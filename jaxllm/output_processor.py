"""From sampled token ids to what callers see: the one owner of finishing.

The `OutputProcessor` keeps the user-visible state of every live request (an
`IncrementalDetokenizer`, logprob lists and metrics per sample), turns each step's sampled
tokens into `RequestOutput`s (cumulative, deltas or final only: `SamplingParams.output_kind`),
and decides every finish reason: EOS and stop token ids, max_tokens and max_model_len
(`token_stop`), a grammar that can only end (structured output: "stop" even if the model would
go on), stop strings (the detokenizer finds them), aborts. It tells the scheduler
(`Scheduler.finish`), which frees the pages; the scheduler never decides a finish itself.

Per step, a row of a plain sample (no logprobs, grammar or stop strings) whose token cannot end
it takes a quick path (its text extended, nothing else); every other token goes through
`_on_token`, the full per-token path and the quick path's reference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxllm.request import Request, RequestStatus
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from jaxllm.runner import StepResult
    from jaxllm.scheduler import Scheduler, SchedulerOutput


def token_stop(req: Request, token: int, max_model_len: int
               ) -> tuple[RequestStatus, int | None] | None:
    """The finish a just-appended `token` causes by itself: EOS or a stop token id (once
    min_tokens is reached), then max_tokens / max_model_len; None if the request goes on."""
    sp = req.sampling_params
    num_output = len(req.output_token_ids)
    if num_output >= sp.min_tokens:
        if not sp.ignore_eos and token in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if sp.stop_token_ids and token in sp.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
    if num_output >= req.max_tokens or len(req.all_token_ids) >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    return None


_RUNNING = RequestStatus.RUNNING  # (an enum member read from the class costs ~70 ns)


@dataclass(slots=True, eq=False)
class _Tracked:
    """Output state of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    finished: bool = False
    stream: bool = True  # False: the caller wants only the final output (FINAL_ONLY)
    delta: bool = False  # outputs carry only what is new (DELTA)
    sent_prompt_logprobs: int = 0  # prompt logprob entries DELTA outputs already carried
    # One sample, DELTA, no logprobs or prompt logprobs (what an OpenAI stream mostly is):
    # while it runs, `collect` builds its output inline (`_output` is the reference).
    quick_delta: bool = False
    touched: bool = field(default=False, repr=False)
    # The metrics copy the last output carried, None once they changed: outputs share it
    # while nothing changes (the engine never writes to a copy it handed out).
    metrics_copy: RequestMetrics | None = field(default=None, repr=False)


@dataclass(slots=True, eq=False)
class _Sample:
    """Output state of one sequence (one of n samples); its text is `detok.text`."""

    tracked: _Tracked
    seq: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    # The quick path of `process`. A plain sample (no logprobs, grammar or stop strings) can
    # only end by `token_stop`: a token at output length n < quick_until (max_tokens and
    # max_model_len; 0 until its first token is processed) ends it only if it is in stop_ids
    # and n >= min_tokens.
    plain: bool = False
    quick_until: int = 0
    stop_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    decodes: bool = True  # False: a deferred detokenizer, handed the ids at the finish
    sent_tokens: int = 0  # tokens (and logprobs) DELTA outputs already carried
    sent_text: int = 0  # characters of text DELTA outputs already carried


class OutputProcessor:
    """Detokenization, stop strings, logprobs and finish reasons of every live request."""

    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self._tracked: dict[str, _Tracked] = {}
        self._samples: dict[str, _Sample] = {}  # sequence id -> its output state
        self._prompt_logprob_ids: set[str] = set()  # live requests asking for prompt logprobs
        self.generation_tokens_total = 0
        # Counts that let a step skip whole passes (host time per step):
        self._num_streamed = 0  # live requests with an output every step (not FINAL_ONLY)
        self._num_unscheduled = 0  # live requests never scheduled (first_scheduled_time unset)
        self._num_touched = 0  # requests with something for the next collect

    def _forget_counts(self, tracked: _Tracked) -> None:
        """A request leaves: drop it from the counts above."""
        self._num_streamed -= tracked.stream
        if tracked.metrics.first_scheduled_time is None:
            self._num_unscheduled -= 1

    # -- requests -----------------------------------------------------------------------------
    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int],
            params: SamplingParams, seqs: Sequence[Request]) -> None:
        stream = params.output_kind is not RequestOutputKind.FINAL_ONLY
        # Text nobody reads before the finish (not streamed, no stop strings): decoded once then.
        defer = not stream and not params.stop
        tracked = _Tracked(request_id, prompt, prompt_ids, params, [],
                           RequestMetrics(arrival_time=time.time()),
                           prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
                           stream=stream, delta=params.output_kind is RequestOutputKind.DELTA)
        tracked.quick_delta = (tracked.delta and len(seqs) == 1 and params.logprobs is None
                               and params.prompt_logprobs is None)
        with_logprobs = params.logprobs is not None
        for s in seqs:
            stop_ids = set(params.stop_token_ids or ())
            if not params.ignore_eos:
                stop_ids.update(s.eos_token_ids)
            tracked.samples.append(_Sample(
                tracked, s, IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop,
                    params.include_stop_str_in_output, min_tokens=params.min_tokens,
                    defer=defer),
                logprobs=[] if with_logprobs else None,
                cumulative_logprob=0.0 if with_logprobs else None,
                plain=not with_logprobs and s.grammar is None and not params.stop,
                stop_ids=frozenset(stop_ids), min_tokens=params.min_tokens,
                decodes=not defer))
        self._tracked[request_id] = tracked
        self._num_streamed += stream
        self._num_unscheduled += 1
        if tracked.prompt_logprobs is not None:
            self._prompt_logprob_ids.add(request_id)
        for s in tracked.samples:
            self._samples[s.seq.request_id] = s

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracked

    def __len__(self) -> int:
        return len(self._tracked)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request (all its samples) now; its final output, None if unknown."""
        tracked = self._tracked.pop(request_id, None)
        self._prompt_logprob_ids.discard(request_id)
        if tracked is None:
            return None
        for s in tracked.samples:
            self.scheduler.abort(s.seq.request_id)
            self._samples.pop(s.seq.request_id, None)
            if not s.seq.is_finished:
                s.seq.status = RequestStatus.FINISHED_ABORTED
            if s.detok.deferred:  # its text so far, as a streamed request's would be
                self._flush(s)  # (nothing when its finish flushed it already)
        tracked.finished = True
        self._forget_counts(tracked)
        return self._output(tracked)

    # -- one step -----------------------------------------------------------------------------
    def process(self, sched: SchedulerOutput, result: StepResult,
                produced: Sequence[int]) -> None:
        """Apply a completed step: `produced` are the rows of `sched.seqs` whose sequence
        got new tokens, already appended by `Scheduler.update`: one per row, or (a
        verification step, `result.token_ids` [S, K+1]) the row's non-negative entries."""
        now = time.time()
        seqs, samples = sched.seqs, self._samples
        counts = None
        if result.token_ids.ndim == 2:
            counts = (result.token_ids >= 0).sum(axis=1).tolist()
        every_row = counts is None and len(produced) == len(seqs)  # (steady decoding)
        if self._num_unscheduled or (self._num_streamed and not every_row):
            # A streamed request gets an output for every step it is in (tokens or not); an
            # unstreamed one only at its finish, so steady steps of `LLM.generate` skip this.
            # (When every row produced a token, the loop below marks the streamed ones.)
            for s in seqs:
                sample = samples.get(s.request.request_id)
                if sample is None:
                    continue
                tracked = sample.tracked
                if tracked.metrics.first_scheduled_time is None:
                    tracked.metrics.first_scheduled_time = now
                    tracked.metrics_copy = None
                    self._num_unscheduled -= 1
                if tracked.stream and not tracked.touched:
                    tracked.touched = True
                    self._num_touched += 1
        quick = touched = 0
        for row in produced:
            seq = seqs[row].request
            sample = samples.get(seq.request_id)
            if sample is None:
                continue
            tracked = sample.tracked
            if tracked.stream and not tracked.touched:
                tracked.touched = True
                touched += 1
            if counts is not None and counts[row] > 1:
                self._replay(sample, result, row, counts[row], now)
                continue
            output = seq.output_token_ids
            n = len(output)
            if n < sample.quick_until and (n < sample.min_tokens
                                           or output[-1] not in sample.stop_ids):
                quick += 1  # a plain sample that goes on: only its text to extend
                if sample.decodes:
                    sample.detok.add_token(output[-1])
            else:
                self._on_token(sample, result, row, 0, now)
        self.generation_tokens_total += quick
        self._num_touched += touched

    def _replay(self, sample: _Sample, result: StepResult, row: int, count: int,
                now: float) -> None:
        """A verification emitted `count` tokens for the sequence: process them one by one;
        tokens after one that ended the sequence are dropped."""
        seq = sample.seq
        start = len(seq.output_token_ids) - count
        new = seq.output_token_ids[start:]
        seq.truncate_output(start)
        for i, token in enumerate(new):
            seq.append_output(token)
            if self._on_token(sample, result, row, i, now):
                break

    def _touch(self, tracked: _Tracked) -> None:
        """tracked has something for the next `collect` (progress if streamed, its finish)."""
        if not tracked.touched:
            tracked.touched = True
            self._num_touched += 1

    def _flush(self, sample: _Sample) -> str:
        """The sample's held-back text; a deferred detokenizer is handed the sample's
        tokens only now (it decodes them all at once anyway)."""
        if sample.detok.deferred:
            sample.detok.step(sample.seq.output_token_ids[len(sample.detok.token_ids):])
        return sample.detok.flush()

    def _on_token(self, sample: _Sample, result: StepResult, row: int, i: int,
                  now: float) -> bool:
        """Process the sequence's last output token (row's i-th emitted one this step);
        True if it ended the sequence. The reference the quick path of `process` follows."""
        tracked, seq, detok = sample.tracked, sample.seq, sample.detok
        params = tracked.params
        token = seq.output_token_ids[-1]
        self.generation_tokens_total += 1
        if tracked.metrics.first_token_time is None:
            tracked.metrics.first_token_time = now
            tracked.metrics_copy = None
        if sample.plain:
            sample.quick_until = min(seq.max_tokens, self.max_model_len - seq.num_prompt_tokens)
        if sample.logprobs is not None:
            logprob, rank, top_ids, top_vals = result.position(row, i)
            sample.logprobs.append(self.logprob_entry(
                token, float(logprob), int(rank), top_ids[:params.logprobs],
                top_vals[:params.logprobs]))
            sample.cumulative_logprob += float(logprob)
        stop = token_stop(seq, token, self.max_model_len)
        if seq.grammar is not None and (stop is None or stop[0] is RequestStatus.FINISHED_LENGTH):
            seq.grammar.sync(seq.output_token_ids)
            if seq.grammar.finished:  # nothing but EOS may follow: the output is complete
                stop = (RequestStatus.FINISHED_STOPPED, None)
        if sample.decodes:
            detok.add_token(token)
        if stop is not None and detok.stop_hit is None:
            # Text held back (bytes of an unfinished character, a possible stop-string start)
            # is released now, and may itself complete a stop string.
            self._flush(sample)
        if detok.stop_hit is not None and (
                stop is None or stop[0] is RequestStatus.FINISHED_LENGTH):
            # A stop string wins over length (as in vLLM); a stop token keeps its own reason.
            stop = (RequestStatus.FINISHED_STOPPED, detok.stop_hit)
        if stop is not None:
            self.scheduler.finish(seq.request_id, *stop)
            self._touch(tracked)
        return stop is not None

    def logprob_entry(self, token: int, logprob: float, rank: int, top_ids, top_vals
                      ) -> dict[int, Logprob]:
        entry = {int(t): Logprob(float(v), r + 1, self.tokenizer.decode([int(t)]))
                 for r, (t, v) in enumerate(zip(top_ids, top_vals, strict=True))}
        entry[token] = Logprob(logprob, rank, self.tokenizer.decode([token]))
        return entry

    # -- prompt logprobs ----------------------------------------------------------------------
    def prompt_logprob_rows(self, sched: SchedulerOutput, cu_q_lens: np.ndarray
                            ) -> tuple[list[int], list[int], list[tuple[_Tracked, int]]]:
        """Token rows of the step whose next-token logprob a request's prompt_logprobs still
        needs: (rows, target token ids, where each result goes)."""
        rows, targets, where = [], [], []
        if not self._prompt_logprob_ids:
            return rows, targets, where
        for i, s in enumerate(sched.seqs):
            sample = self._samples.get(s.request.request_id)
            if sample is None or s.request.sample_index != 0:
                continue
            tracked = sample.tracked
            if tracked.prompt_logprobs is None:
                continue
            n_prompt = len(tracked.prompt_token_ids)
            base = int(cu_q_lens[i])
            for j in range(s.num_new_tokens):
                pos = s.start_pos + j
                if pos + 1 < n_prompt and pos + 1 >= len(tracked.prompt_logprobs):
                    rows.append(base + j)
                    targets.append(tracked.prompt_token_ids[pos + 1])
                    where.append((tracked, pos + 1))
        return rows, targets, where

    def add_prompt_logprobs(self, where: list[tuple[_Tracked, int]], targets: list[int],
                            chosen, rank, ids, vals) -> None:
        for k, (tracked, pos) in enumerate(where):
            if pos == len(tracked.prompt_logprobs):
                n = tracked.params.prompt_logprobs
                tracked.prompt_logprobs.append(self.logprob_entry(
                    targets[k], float(chosen[k]), int(rank[k]), ids[k, :n], vals[k, :n]))

    # -- outputs ------------------------------------------------------------------------------
    def collect(self) -> list[RequestOutput]:
        """Outputs of every request that progressed since the last call (only finished ones
        for FINAL_ONLY requests); finished ones are forgotten."""
        outs: list[RequestOutput] = []
        if not self._num_touched:
            return outs
        self._num_touched = 0
        for tracked in list(self._tracked.values()):
            if not tracked.touched:
                continue
            tracked.touched = False
            samples = tracked.samples
            if tracked.quick_delta and samples[0].seq.status is _RUNNING:
                # (`_output`, inlined for the output most streams get at most steps)
                sample = samples[0]
                seq = sample.seq
                metrics = tracked.metrics_copy
                if metrics is None or metrics.num_cached_tokens != seq.num_cached_tokens:
                    metrics = _metrics_copy(tracked, seq.num_cached_tokens)
                tokens, text = sample.sent_tokens, sample.sent_text
                output, full = seq.output_token_ids, sample.detok.text
                sample.sent_tokens, sample.sent_text = len(output), len(full)
                outs.append(RequestOutput(
                    tracked.request_id, tracked.prompt, tracked.prompt_token_ids,
                    [CompletionOutput(0, full[text:], output[tokens:], None, None, None,
                                      seq.stop_reason)],
                    False, None, metrics))
                continue
            if _all_finished(samples):
                rid = tracked.request_id
                tracked.finished = True
                tracked.metrics.finished_time = time.time()
                tracked.metrics_copy = None
                del self._tracked[rid]
                self._forget_counts(tracked)
                self._prompt_logprob_ids.discard(rid)
                for s in samples:
                    self._samples.pop(s.seq.request_id, None)
            elif not tracked.stream:
                continue
            outs.append(self._output(tracked))
        return outs

    def _output(self, tracked: _Tracked) -> RequestOutput:
        """The request's output now, cumulative or (DELTA) what is new since its last one;
        nothing in it aliases live state. (Built with positional arguments: a streamed request
        gets one per step, and keywords cost ~40 % more per object.)"""
        samples = tracked.samples
        cached = samples[0].seq.num_cached_tokens
        metrics = tracked.metrics_copy
        if metrics is None or metrics.num_cached_tokens != cached:
            metrics = _metrics_copy(tracked, cached)
        prompt_logprobs = tracked.prompt_logprobs
        if tracked.delta:
            outputs = ([_delta_completion(0, samples[0])] if len(samples) == 1
                       else [_delta_completion(i, s) for i, s in enumerate(samples)])
            if prompt_logprobs is not None:
                sent, tracked.sent_prompt_logprobs = (tracked.sent_prompt_logprobs,
                                                      len(prompt_logprobs))
                prompt_logprobs = prompt_logprobs[sent:]
        else:
            outputs = ([_completion(0, samples[0])] if len(samples) == 1
                       else [_completion(i, s) for i, s in enumerate(samples)])
            if prompt_logprobs is not None:
                prompt_logprobs = list(prompt_logprobs)
        return RequestOutput(
            tracked.request_id, tracked.prompt, tracked.prompt_token_ids, outputs,
            tracked.finished, prompt_logprobs, metrics)


def _metrics_copy(tracked: _Tracked, num_cached_tokens: int) -> RequestMetrics:
    """A fresh copy of the request's metrics for its outputs to share until they change."""
    tracked.metrics.num_cached_tokens = num_cached_tokens
    metrics = tracked.metrics_copy = tracked.metrics.snapshot()
    return metrics


def _all_finished(samples: list[_Sample]) -> bool:
    for s in samples:
        status = s.seq.status
        if status is _RUNNING or not status.is_finished:
            return False
    return True


def _delta_completion(index: int, sample: _Sample) -> CompletionOutput:
    """What one sample produced since its last output (DELTA); advances its offsets."""
    seq = sample.seq
    status = seq.status
    tokens, text = sample.sent_tokens, sample.sent_text
    output, full = seq.output_token_ids, sample.detok.text
    sample.sent_tokens, sample.sent_text = len(output), len(full)
    return CompletionOutput(
        index, full[text:], output[tokens:], sample.cumulative_logprob,
        sample.logprobs[tokens:] if sample.logprobs is not None else None,
        None if status is _RUNNING else status.finish_reason, seq.stop_reason)


def _completion(index: int, sample: _Sample) -> CompletionOutput:
    """One sample's cumulative output (copies of its growing lists)."""
    seq = sample.seq
    status = seq.status
    return CompletionOutput(
        index, sample.detok.text, seq.output_token_ids[:], sample.cumulative_logprob,
        sample.logprobs[:] if sample.logprobs is not None else None,
        None if status is _RUNNING else status.finish_reason, seq.stop_reason)
