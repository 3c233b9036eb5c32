"""LLMEngine: the synchronous loop body. request -> tokenizer -> scheduler -> runner -> outputs.

`add_request` tokenizes and admits (ValueError for bad input, nothing half-admitted).
A step is two halves: `dispatch` schedules one bucketed step, lays out its `StepInputs` and
sampling tensors and hands forward + sampler to the device without waiting; `complete`
waits for the sampled tokens, feeds them to the scheduler and lets the `OutputProcessor` turn
them into cumulative `RequestOutput`s (detokenized, stop strings, logprobs, finish reasons).

`step()` runs them overlapped (EngineConfig.overlap_scheduling, the default): it dispatches
step N+1 before completing step N, so the device never waits for the host's scheduling,
input packing and output processing. Step N+1 decodes the tokens step N is still sampling
through placeholders the device fills in (`Scheduler.schedule(lookahead=True)`); a request
that step N finishes has its look-ahead row discarded. With overlap off, step() is
`complete(dispatch())`: the serial loop, kept for debugging and the equality tests.
`LLM` drives it directly; `AsyncEngine` from a thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm.buckets import BucketSet
from jaxllm.cache.allocator import PageAllocator
from jaxllm.cache.kv_cache import allocate_kv_caches, bytes_per_page, pages_for_budget
from jaxllm.cache.manager import KVCacheManager
from jaxllm.config import EngineConfig
from jaxllm.kernels import get_backend
from jaxllm.loading import EngineParts, load_engine_parts
from jaxllm.model_inputs import StepInputs
from jaxllm.output_processor import OutputProcessor
from jaxllm.outputs import RequestOutput
from jaxllm.platform_defaults import describe as describe_defaults
from jaxllm.platform_defaults import resolve_engine_config
from jaxllm.request import Request
from jaxllm.runner import DeviceSample, ForwardOutput, ModelRunner
from jaxllm.sampling import request_key_data, unseeded_request_seed
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jaxllm.spec import VerifyLayout, build_verify_layout
from jaxllm.spec.draft import draft_model_config
from jaxllm.spec.eagle import eagle_bytes_per_page
from jaxllm.spec.scheduling import Speculation
from jaxllm.spec.verify_layout import fits_in_logits, logits_indices_for
from jaxllm.step_inputs import SamplingTensorBuilder
from jaxllm.step_layout import StepInputsBuilder
from jaxllm.structured.compiler import GrammarCompiler
from jaxllm.structured.tokenizer_view import build_llg_tokenizer
from jaxllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters and gauges for metrics endpoints and benchmarks."""

    num_running: int = 0
    num_waiting: int = 0
    page_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    compile_count: int = 0
    recompile_count: int = 0
    steps_total: int = 0
    num_preemptions: int = 0
    step_time_s: float = 0.0  # last step, wall
    host_gap_s: float = 0.0  # last step: device idle between the previous result and this dispatch
    host_time_s: float = 0.0  # last step(): its wall time minus the time it waited for the device
    last_step_tokens: int = 0  # tokens the last completed step produced
    spec_proposed_tokens: int = 0  # speculative decoding: drafts verified
    spec_accepted_tokens: int = 0  # of which accepted
    spec_mean_acceptance_length: float = 0.0  # tokens emitted per verified row
    warmup_time_s: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return d


def reads_token_history(params: SamplingParams) -> bool:
    """Whether a row's sampling tensors depend on its output so far (built on the host):
    such a look-ahead row's sampler waits for the in-flight step's token."""
    return (params.has_penalties or params.has_structured_output
            or any(len(w) > 1 for w in params.bad_words_token_ids or ()))


@dataclass
class InFlightStep:
    """A dispatched step whose sampled tokens the host has not seen yet."""

    sched: SchedulerOutput
    inputs: StepInputs
    forward: ForwardOutput
    sampled: DeviceSample | None  # None until the sampler is dispatched (see dispatch)
    started_at: float
    dispatched_at: float
    host_gap_s: float
    verify: VerifyLayout | None  # some sequence proposed drafts: the step verifies them

    @property
    def speculative(self) -> bool:
        """The step verifies proposals instead of sampling."""
        return self.verify is not None


class LLMEngine:
    """Owns the tokenizer, scheduler, runner and per-request output state."""

    def __init__(self, config: EngineConfig, parts: EngineParts | None = None) -> None:
        """`parts`: pre-built model and hooks (a data-parallel slice); None loads from config.
        Unset platform-dependent settings take the backend's defaults (platform_defaults)."""
        resolved = resolve_engine_config(config)
        config = self.config = resolved.config
        logger.info("%s", describe_defaults(resolved))
        parts = parts if parts is not None else load_engine_parts(config)
        self.model_config = parts.model_config
        self.tokenizer: Tokenizer = parts.tokenizer
        self.generation_config: dict[str, Any] = parts.generation_config
        self.model_name = config.served_model_name or parts.default_name
        self.max_model_len = parts.max_model_len
        self.page_size = parts.page_size
        self.dtype = parts.dtype
        self.kv_dtype = parts.kv_dtype
        self.eos_token_ids = tuple(sorted(set(self.tokenizer.eos_token_ids)
                                          | set(self.model_config.eos_token_ids)))
        # The attention backend decides the KV cache's layout (kernels' registry).
        self.attention = get_backend(config.attention_impl)
        self._head_shards = config.tensor_parallel_size
        logger.info("attention: %s", self.attention.describe())
        num_pages = config.num_pages or self._pages_from_budget()
        logger.info("KV cache: %d pages x %d tokens, %s (%.1f MiB)", num_pages, self.page_size,
                    self.kv_dtype.name,
                    num_pages * bytes_per_page(self.model_config, self.page_size, self.kv_dtype,
                                               self.attention, self._head_shards) / 2**20)
        allocator = PageAllocator(num_pages, self.page_size)
        cache = KVCacheManager(allocator, enable_prefix_caching=config.enable_prefix_caching)
        # Every bucket is one compilation of the whole model: the platform's ladder
        # (jaxllm/platform_defaults.py says why each is what it is).
        self.buckets = BucketSet(config.max_num_batched_tokens, config.max_num_seqs,
                                 self.max_model_len, self.page_size,
                                 token_bucket_ratio=resolved.token_bucket_ratio,
                                 single_token_bucket=resolved.single_token_bucket)
        logger.info("step buckets: %s", self.buckets.describe())
        spec = config.speculative_config()
        # (draft / eagle mode: loads the proposer, its caches on the same page ids, its programs)
        self.speculation = (Speculation.for_engine(spec, config, parts, self.buckets, num_pages,
                                                   self.attention) if spec.enabled else None)
        self._spec_k = spec.num_speculative_tokens if spec.enabled else 0
        # Verification rows: one for a lone sequence (the latency case speculation is for),
        # else the most sequences that speculate together (padding rows cost LM-head rows).
        most = min(spec.disable_above_batch or config.max_num_seqs, config.max_num_seqs)
        self._verify_rows = sorted({1, most}) if spec.enabled else []
        self.scheduler = Scheduler(
            SchedulerConfig.from_engine_config(config, max_model_len=self.max_model_len),
            cache, self.buckets, self.speculation)
        kv = allocate_kv_caches(self.model_config, num_pages, self.page_size, self.kv_dtype,
                                sharding=parts.kv_sharding, backend=self.attention,
                                head_shards=self._head_shards)
        make_runner = parts.make_runner or ModelRunner  # multi-host leaders broadcast steps
        self.runner = make_runner(parts.model, kv, attention_impl=config.attention_impl,
                                  attention_wrapper=parts.attention_wrapper,
                                  max_rows=config.max_num_seqs, compute_dtype=self.dtype)
        # Structured output: compiled grammars (LRU), llguidance's tokenizer view built in the
        # background from here.
        self.grammars = GrammarCompiler(partial(build_llg_tokenizer, self.tokenizer,
                                                self.eos_token_ids))
        self.tensors = SamplingTensorBuilder(self.model_config.vocab_size, self.grammars)
        self.step_layout = StepInputsBuilder()  # build_step_inputs, page-table rows kept per request
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler, self.max_model_len)
        self._request_counter = 0
        self._stats = EngineStats()
        self._sleeping_specs = None
        self._profiling = False
        self._last_result_time: float | None = None  # when the previous step's result arrived
        self._last_completed: float | None = None
        self._waited = 0.0  # seconds the current step() spent waiting for the device
        self._in_flight: InFlightStep | None = None  # overlapped loop: dispatched, not completed
        store = (self.runner.program_store(str(Path(config.compilation_cache_dir) / "programs"))
                 if config.compilation_cache_dir else None)
        self._stats.warmup_time_s = self.runner.warm_up(self.buckets.all(), self.tensors.dummy,
                                                        compile_threads=config.compile_threads,
                                                        store=store,
                                                        num_speculative_tokens=self._spec_k,
                                                        verify_rows=self._verify_rows)
        logger.info("warm-up prepared %d programs (%d loaded from saved ones) in %.1f s",
                    self.runner.compile_count, self.runner.loaded_programs,
                    self._stats.warmup_time_s)

    def _pages_from_budget(self) -> int:
        budget = self.config.kv_cache_memory_bytes
        if jax.default_backend() != "cpu":
            stats = jax.local_devices()[0].memory_stats() or {}
            free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            budget = free if free > 0 else budget
        budget = int(budget * self.config.memory_fraction)
        extra = self._proposer_bytes_per_page()
        if extra:  # the proposer's caches have as many pages as the target's: split the budget
            own = bytes_per_page(self.model_config, self.page_size, self.kv_dtype,
                                 self.attention, self._head_shards)
            budget = budget * own // (own + extra)
        return pages_for_budget(self.model_config, self.page_size, self.kv_dtype, budget,
                                self.attention, self._head_shards)

    def _proposer_bytes_per_page(self) -> int:
        """Bytes per page a speculative proposer's caches add (a draft model's KV cache; an
        EAGLE head's KV cache and the feature store); 0 without one, or when its config is
        not cheap to read before loading."""
        draft = draft_model_config(self.config)
        if draft is not None:
            return bytes_per_page(draft, self.page_size, self.kv_dtype, self.attention,
                                  self._head_shards)
        return eagle_bytes_per_page(self.config, self.model_config, self.page_size,
                                    self.kv_dtype, self.attention, self.dtype)

    # -- admission ----------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config)

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None,
                    request_id: str, *, cache_salt: str | None = None,
                    priority: int = 0) -> None:
        """Tokenize and admit; ValueError (and nothing admitted) for bad input. The argument
        order is `EngineClient.generate`'s. What `step` returns for the request, every step
        or only at its finish, whole or new parts only, is `sampling_params.output_kind`."""
        params = sampling_params if sampling_params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling params must be a SamplingParams")
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        if request_id in self.outputs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._sleeping_specs is not None:
            raise ValueError("the engine is asleep (its KV cache is released): call wake_up() first")
        text, ids = self._tokenize(prompt)
        if params.bad_words and params.bad_words_token_ids is None:  # (the server resolves its own)
            params = params.resolve_bad_words(
                lambda word: self.tokenizer.encode(word, add_special_tokens=False))
        # A bad schema/regex/grammar raises here, before anything is queued.
        grammars = (self.grammars.matchers(params.structured_outputs, params.n)
                    if params.structured_outputs is not None else [None] * params.n)
        if params.prompt_logprobs is not None:
            # Prompt logprobs need every prompt position computed: never serve it from cache.
            cache_salt = f"prompt-logprobs-{uuid.uuid4().hex}"
        seed = params.seed
        if seed is None:
            seed = unseeded_request_seed(self.config.seed, self._request_counter)
        self._request_counter += 1
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        history = reads_token_history(params)
        seqs = [Request(request_id=sid, prompt_token_ids=ids, sampling_params=params,
                        eos_token_ids=self.eos_token_ids, priority=priority, cache_salt=cache_salt,
                        parent_id=request_id if params.n > 1 else None, sample_index=i,
                        key_data=request_key_data(seed, i), grammar=grammars[i],
                        reads_token_history=history)
                for i, sid in enumerate(seq_ids)]
        if params.n == 1:
            self.scheduler.add_request(seqs[0])
        else:
            self.scheduler.add_parallel_samples(seqs)
        self.outputs.add(request_id, text, ids, params, seqs)
        self._stats.prompt_tokens_total += len(ids)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.model_config.vocab_size})")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("the prompt is empty")
        return text, ids

    def abort_request(self, request_id: str, return_output: bool = False) -> RequestOutput | bool | None:
        """Abort a request (all its samples) and free its pages now."""
        out = self.outputs.abort(request_id)
        if return_output:
            return out
        return out is not None

    def has_unfinished_requests(self) -> bool:
        return len(self.outputs) > 0

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance by one step; outputs for every request that progressed or finished."""
        start = time.perf_counter()
        self._waited = 0.0
        if not self.config.overlap_scheduling:
            step = self.dispatch()
            outs = self.complete(step) if step is not None else self.outputs.collect()
        else:
            prev, self._in_flight = self._in_flight, None
            if prev is not None and (prev.speculative or self._speculating()):
                # A verification's sequences go on from however many drafts it accepts, and
                # proposals need the last token on the host: complete the step before
                # scheduling them again (no look-ahead while the batch speculates).
                outs = self.complete(prev)
                prev = None
                cur = self.dispatch(None)
            else:
                cur = self.dispatch(prev)
                outs = self.complete(prev) if prev is not None else self.outputs.collect()
            if cur is not None and cur.sampled is None:
                self.sample(cur)  # its look-ahead rows' sampling needed step N's tokens
            self._in_flight = cur
        self._stats.host_time_s = time.perf_counter() - start - self._waited
        return outs

    def _speculating(self) -> bool:
        """Whether sequences propose drafts at the current batch size."""
        return (self.speculation is not None
                and self.speculation.config.speculates_at(self.scheduler.num_running))

    def _drain(self) -> None:
        """Complete the in-flight step (before anything that must see a quiet device)."""
        prev, self._in_flight = self._in_flight, None
        if prev is not None:
            self.complete(prev)

    def dispatch(self, in_flight: InFlightStep | None = None) -> InFlightStep | None:
        """Schedule a step and hand its forward pass (and usually its sampler) to the device
        without waiting; None if idle. `in_flight`: a dispatched step not completed yet,
        whose tokens this one may decode. The sampler is left for `sample` when a look-ahead
        row's sampling reads the token history on the host (penalty counts, bad words, a
        grammar): that must wait until the in-flight step's tokens are known."""
        start = time.perf_counter()
        sched = self.scheduler.schedule(lookahead=in_flight is not None)
        if sched.is_empty:
            return None
        if self.speculation is not None:
            self.speculation.prepare(sched)  # a draft model proposes into the placeholders
        inputs = self.step_layout(sched)
        layout = self._verify_layout(sched, inputs)
        if layout is not None and layout.in_logits:  # the forward's LM head on its positions
            inputs = inputs.replace(logits_indices=logits_indices_for(layout, sched.bucket.num_seqs))
        forward = self.runner.forward(
            inputs, in_flight.sampled.next_input_ids if in_flight is not None else None)
        if self.speculation is not None:
            self.speculation.after_forward(inputs, forward)  # EAGLE: store the hidden states
        # Host work between the previous result and this dispatch (output processing, the
        # scheduler, input packing) is time the device sat idle (none when overlapped).
        dispatched = time.perf_counter()
        host_gap = (max(0.0, dispatched - self._last_result_time)
                    if self._last_result_time and in_flight is None else 0.0)
        step = InFlightStep(sched, inputs, forward, None, start, dispatched, host_gap, layout)
        # (look-ahead rows, prev_row set, exist only when a step is in flight)
        if in_flight is None or not any(s.prev_row is not None and s.request.reads_token_history
                                        for s in sched.seqs):
            self.sample(step)
        return step

    def sample(self, step: InFlightStep) -> None:
        """Build the step's sampling tensors from what the host knows now and dispatch the
        sampler (per-row token masks and biases are applied there), or, when some sequence
        proposed drafts, the verification of every row (jaxllm.spec.rejection)."""
        sched = step.sched
        if not step.speculative:
            tensors = self.tensors.build(sched, [s.request.sampling_params for s in sched.seqs],
                                         [s.request.key_data for s in sched.seqs],
                                         sched.bucket.num_seqs)
            step.sampled = self.runner.sample(step.forward.logits, tensors)
            return
        layout = step.verify
        tensors = self.tensors.build(sched, [s.request.sampling_params for s in sched.seqs],
                                     [s.request.key_data for s in sched.seqs],
                                     layout.hidden_rows.shape[0])
        step.sampled = self.runner.verify(step.forward, layout, tensors)

    def _verify_layout(self, sched: SchedulerOutput, inputs: StepInputs) -> VerifyLayout | None:
        """Where the step's verification reads its positions (None: no sequence proposed);
        in the forward's logits rows when they can hold them all (`fits_in_logits`)."""
        if self.speculation is None or not any(s.drafts for s in sched.seqs):
            return None
        cu = inputs.attention.cu_q_lens
        rows = next(r for r in self._verify_rows if r >= len(sched.seqs))
        layout = build_verify_layout(
            [int(cu[j + 1]) - 1 - len(s.drafts) for j, s in enumerate(sched.seqs)],
            [s.drafts for s in sched.seqs], range(len(sched.seqs)), self._spec_k, rows)
        layout.in_logits = fits_in_logits(rows, self._spec_k, sched.bucket.num_seqs)
        return layout

    def complete(self, step: InFlightStep) -> list[RequestOutput]:
        """Wait for a dispatched step's tokens and turn them into outputs."""
        self._prompt_logprobs(step)
        waiting = time.perf_counter()
        result = self.runner.fetch(step.sampled)
        self._last_result_time = time.perf_counter()
        self._waited += self._last_result_time - waiting
        produced = self.scheduler.update(step.sched, result.token_ids)
        self._stats.last_step_tokens = len(produced)
        before = self.outputs.generation_tokens_total
        self.outputs.process(step.sched, result, produced)
        self._stats.generation_tokens_total += self.outputs.generation_tokens_total - before
        if not self.scheduler.has_work():
            self._last_result_time = None  # idle time until the next request is not a host gap
        self._stats.steps_total += 1
        now = time.perf_counter()
        # Wall time per step: overlapped, the interval between completions (each completion
        # also dispatched the next step); serial, this step's schedule-to-outputs time.
        since = self._last_completed if self.config.overlap_scheduling else None
        self._stats.step_time_s = now - (since if since is not None else step.started_at)
        self._last_completed = now if self.scheduler.has_work() else None
        self._stats.host_gap_s = step.host_gap_s
        return self.outputs.collect()

    def _prompt_logprobs(self, step: InFlightStep) -> None:
        rows, targets, where = self.outputs.prompt_logprob_rows(
            step.sched, np.asarray(step.inputs.attention.cu_q_lens))
        if not rows:
            return
        chosen, rank, ids, vals = self.runner.prompt_logprobs(
            step.forward.hidden, np.array(rows), np.array(targets))
        self.outputs.add_prompt_logprobs(where, targets, chosen, rank, ids, vals)

    # -- management ---------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        s = self._stats
        cache_stats = self.scheduler.cache.stats
        s.num_running = self.scheduler.num_running
        s.num_waiting = self.scheduler.num_waiting
        s.page_usage = self.scheduler.page_usage
        s.prefix_cache_queries = cache_stats.queried_tokens
        s.prefix_cache_hits = cache_stats.hit_tokens
        s.compile_count = self.runner.compile_count
        s.recompile_count = self.runner.recompiles
        draft = self.speculation.draft_runner if self.speculation is not None else None
        if draft is not None:
            s.compile_count += draft.compile_count
            s.recompile_count += draft.recompiles
        s.num_preemptions = self.scheduler.num_preemptions
        if self.speculation is not None:
            spec = self.speculation.stats
            s.spec_proposed_tokens, s.spec_accepted_tokens = spec.proposed, spec.accepted
            s.spec_mean_acceptance_length = spec.mean_acceptance_length
        return dataclasses.replace(s)

    def reset_prefix_cache(self) -> bool:
        self.scheduler.reset_prefix_cache()
        return True

    def sleep(self, level: int = 1) -> None:
        """Drop the KV cache (and the prefix cache that indexes it); requires no live requests."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if len(self.outputs):
            raise ValueError("cannot sleep with requests in flight")
        self._drain()
        if self._sleeping_specs is None:
            self.scheduler.reset_prefix_cache()
            runners = self._kv_runners()
            self._sleeping_specs = [r.drop_kv_caches() for r in runners]

    def wake_up(self) -> None:
        if self._sleeping_specs is not None:
            for runner, specs in zip(self._kv_runners(), self._sleeping_specs, strict=True):
                runner.restore_kv_caches(specs)
            self._sleeping_specs = None

    def _kv_runners(self) -> list:
        """Runners owning a KV cache: the target's, and a draft model's (draft mode) or an
        EAGLE head's (eagle mode: its KV cache and the feature store)."""
        draft = self.speculation.draft_runner if self.speculation is not None else None
        return [self.runner] + ([draft] if draft is not None else [])

    def start_profile(self, log_dir: str | None = None) -> None:
        if self._profiling:
            raise ValueError("a profile is already running")
        jax.profiler.start_trace(log_dir or "/tmp/jaxllm-profile")
        self._profiling = True

    def stop_profile(self) -> None:
        if not self._profiling:
            raise ValueError("no profile is running")
        jax.profiler.stop_trace()
        self._profiling = False
