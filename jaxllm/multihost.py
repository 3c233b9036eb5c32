"""Multi-host serving: the leader schedules and broadcasts each step, followers replay it.

Process 0 (the leader) runs HTTP, tokenizer and scheduler; its `BroadcastingRunner` sends
every device call's host inputs -- a forward pass's `StepInputs`, a sampler call's sampling
tensors, or the rows of a prompt-logprobs call -- to the followers with a StepBroadcaster
before running it.
Each follower (`run_follower`) holds the same model and KV-cache shards and runs the same
jitted programs in the same order (multi-controller SPMD), so the cross-host collectives
inside the step line up. Warm-up is broadcast like any step.

Failure: the leader's broadcasts run under a CollectiveWatchdog (a follower that stops
answering fails the step instead of hanging it), and followers beat a heartbeat that a
leader-side thread watches, so a dead follower makes `check_health` fail within seconds
even while the leader is idle.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.async_engine import AsyncEngine
from jaxllm.config import EngineConfig
from jaxllm.errors import EngineDeadError
from jaxllm.model_inputs import StepInputs
from jaxllm.parallel import CollectiveWatchdog, HeartbeatMonitor, StepBroadcaster
from jaxllm.runner import ModelRunner
from jaxllm.sampling import SamplingTensors

logger = logging.getLogger(__name__)

OP_SETUP, OP_FORWARD, OP_SAMPLE, OP_PROMPT_LOGPROBS = 1, 2, 3, 4

_STEP_ARRAYS = StepInputs.field_ranks()  # the one definition of a step's inputs
_SAMPLING = {"temperature": (np.float32, 1), "top_k": (np.int32, 1), "top_p": (np.float32, 1),
             "min_p": (np.float32, 1), "presence_penalty": (np.float32, 1),
             "frequency_penalty": (np.float32, 1), "repetition_penalty": (np.float32, 1),
             "greedy": (np.int32, 1), "key_data": (np.uint32, 2), "step": (np.int32, 1),
             "num_logprobs": (np.int32, 1), "output_counts": (np.int32, 2),
             "prompt_mask": (np.uint8, 2), "logit_bias": (np.float32, 2),
             "allowed_mask": (np.int32, 2), "masked_logprobs": (np.int32, 1),
             "grammar_mask": (np.int32, 2)}
if set(_SAMPLING) != set(SamplingTensors.__dataclass_fields__):  # every field must travel
    raise AssertionError(f"_SAMPLING {sorted(_SAMPLING)} does not match SamplingTensors")
STEP_SCHEMA: dict[str, tuple[Any, int]] = {
    "op": (np.int32, 1), "setup": (np.int32, 1), "rows": (np.int32, 1), "targets": (np.int32, 1),
    **{f"a.{k}": (np.int32, nd) for k, nd in _STEP_ARRAYS.items()},
    **{f"s.{k}": v for k, v in _SAMPLING.items()},
}
_EMPTY = np.zeros(1, np.int32)


@dataclass(frozen=True)
class MultiHostOptions:
    """Timeouts of the leader/follower protocol (seconds)."""

    # A broadcast the followers do not join within this is a lost follower. Must exceed one
    # step's compile time: followers compile each program while the leader compiles its own.
    collective_timeout_s: float = 300.0
    heartbeat_interval_s: float = 0.5
    max_heartbeat_silence_s: float = 3.0


def _blank(n_dims: int, dtype: Any = np.int32) -> np.ndarray:
    return np.zeros((1,) * n_dims, dtype)


def _message(op: int, *, setup: np.ndarray = _EMPTY, rows: np.ndarray = _EMPTY,
             targets: np.ndarray = _EMPTY, inputs: StepInputs | None = None,
             tensors: SamplingTensors | None = None) -> dict[str, np.ndarray]:
    """One broadcast: every schema field, unused ones as size-1 blanks."""
    msg = {"op": np.array([op], np.int32), "setup": setup, "rows": rows, "targets": targets}
    arrays = inputs.to_flat() if inputs is not None else None
    for k, nd in _STEP_ARRAYS.items():
        msg[f"a.{k}"] = np.asarray(arrays[k]) if arrays is not None else _blank(nd)
    penalties = False
    if tensors is not None:
        host = {k: np.asarray(getattr(tensors, k)) for k in _SAMPLING}
        penalties = bool(np.any(host["presence_penalty"] != 0) or np.any(host["frequency_penalty"] != 0)
                         or np.any(host["repetition_penalty"] != 1))
    for k, (dt, nd) in _SAMPLING.items():
        if tensors is None or (k in ("output_counts", "prompt_mask") and not penalties) or (
                k == "logit_bias" and not np.any(host[k])) or (
                k == "grammar_mask" and not np.any(host["masked_logprobs"])):
            msg[f"s.{k}"] = _blank(nd, dt)  # follower fills neutral: no vocab-sized transfer
        else:
            msg[f"s.{k}"] = host[k].astype(dt)
    return msg


def _unpack_inputs(msg: dict[str, np.ndarray]) -> StepInputs:
    return StepInputs.from_flat({k: msg[f"a.{k}"] for k in _STEP_ARRAYS})


def _unpack_tensors(msg: dict[str, np.ndarray], vocab_size: int) -> SamplingTensors:
    rows = msg["s.temperature"].shape[0]
    s = {k: msg[f"s.{k}"] for k in _SAMPLING}
    if s["output_counts"].shape != (rows, vocab_size):
        s["output_counts"] = np.zeros((rows, vocab_size), np.int32)
        s["prompt_mask"] = np.zeros((rows, vocab_size), bool)
    if s["logit_bias"].shape != (rows, vocab_size):
        s["logit_bias"] = np.zeros((rows, vocab_size), np.float32)
    if not np.any(s["masked_logprobs"]):  # sent blank: all allowed (read by no row anyway)
        s["grammar_mask"] = np.full(s["allowed_mask"].shape, -1, np.int32)
    s["greedy"] = s["greedy"].astype(bool)
    s["masked_logprobs"] = s["masked_logprobs"].astype(bool)
    s["prompt_mask"] = s["prompt_mask"].astype(bool)
    return SamplingTensors(**{k: jnp.asarray(v) for k, v in s.items()})


class BroadcastingRunner(ModelRunner):
    """The leader's runner: broadcasts each device call's inputs, then runs it itself."""

    def __init__(self, model, kv_caches, *, caster: StepBroadcaster, **kwargs: Any) -> None:
        self.caster = caster
        self._in_flight = None  # outputs of the last device call
        # Followers size their caches from the leader's (free memory differs per host).
        caster.send(_message(OP_SETUP, setup=np.array([kv_caches[0].shape[0]], np.int32)))
        super().__init__(model, kv_caches, **kwargs)

    def _send(self, msg: dict[str, np.ndarray]) -> None:
        # The broadcast is a collective too: collectives of a device call still in flight
        # would interleave with it, so each call finishes before the next one is announced
        # (followers do the same; multi-host runs one step at a time).
        jax.block_until_ready(self._in_flight)
        self.caster.send(msg)

    def forward(self, inputs: StepInputs, prev_tokens=None):
        self._send(_message(OP_FORWARD, inputs=inputs))
        out = super().forward(inputs, prev_tokens)
        self._in_flight = (out.logits, out.hidden)
        return out

    def sample(self, logits, tensors: SamplingTensors):
        self._send(_message(OP_SAMPLE, tensors=tensors))
        out = super().sample(logits, tensors)
        self._in_flight = out
        return out

    def warm_up(self, buckets, dummy_tensors, **kwargs: Any) -> float:
        # Run (and so broadcast) a dummy step per bucket: the followers compile in lockstep
        # instead of stalling the first real step's collectives while they compile.
        return self.warm_up_by_running(buckets, dummy_tensors)

    def prompt_logprobs(self, hidden, rows: np.ndarray, targets: np.ndarray):
        self._send(_message(OP_PROMPT_LOGPROBS, rows=np.asarray(rows, np.int32),
                            targets=np.asarray(targets, np.int32)))
        return super().prompt_logprobs(hidden, rows, targets)


class LeaderAsyncEngine(AsyncEngine):
    """AsyncEngine of the leader: unhealthy once a follower is lost; stops followers on exit."""

    def __init__(self, engine, watchdog: CollectiveWatchdog, caster: StepBroadcaster,
                 monitor: HeartbeatMonitor | None, options: MultiHostOptions) -> None:
        self.watchdog = watchdog
        self.caster = caster
        self._follower_error: str | None = None
        self._watching = threading.Event()
        super().__init__(engine)
        if monitor is not None:
            threading.Thread(target=self._watch, args=(monitor, options), daemon=True,
                             name="jaxllm-follower-watch").start()

    def _watch(self, monitor: HeartbeatMonitor, options: MultiHostOptions) -> None:
        while not self._watching.wait(options.heartbeat_interval_s):
            silent = monitor.silent_followers(options.max_heartbeat_silence_s)
            if silent:
                self._follower_error = (
                    f"follower process(es) {silent} sent no heartbeat for more than "
                    f"{options.max_heartbeat_silence_s:g}s: the process group is broken; "
                    "restart all processes")
                logger.error(self._follower_error)
                return

    def _lost(self) -> str | None:
        return self._follower_error or self.watchdog.error

    async def check_health(self) -> None:
        lost = self._lost()
        if lost is not None:
            raise EngineDeadError(f"multi-host engine is unhealthy: {lost}")
        await super().check_health()

    @property
    def is_healthy(self) -> bool:
        return self._lost() is None and super().is_healthy

    async def generate(self, *args: Any, **kwargs: Any):
        lost = self._lost()
        if lost is not None:
            raise EngineDeadError(f"multi-host engine is unhealthy: {lost}")
        async for out in super().generate(*args, **kwargs):
            yield out

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        await super().shutdown(drain_timeout)
        self._watching.set()
        if self._lost() is None:
            try:
                self.caster.send_stop()
            except Exception:  # noqa: BLE001 -- followers already gone: nothing to stop
                logger.warning("could not tell followers to stop", exc_info=True)


def _check_multihost(config: EngineConfig) -> EngineConfig:
    """`config` with the platform's defaults resolved (leader and followers alike), after
    checking it describes this process group."""
    import jax

    from jaxllm.platform_defaults import resolve_engine_config

    if jax.process_count() != config.num_processes:
        raise ValueError(f"config says {config.num_processes} processes but jax has "
                         f"{jax.process_count()}: call initialize_distributed(config) first")
    if config.data_parallel_size > 1:
        raise ValueError("multi-host runs one engine: data_parallel_size must be 1")
    # One step at a time across hosts: the followers replay the leader's device calls, and a
    # look-ahead step would have to pass the same previous-step arrays on every process.
    return dataclasses.replace(resolve_engine_config(config).config, overlap_scheduling=False)


def build_leader_engine(config: EngineConfig, options: MultiHostOptions = MultiHostOptions()):
    """(LLMEngine, watchdog, caster) of process 0; blocks until followers took each step."""
    from jaxllm.engine import LLMEngine
    from jaxllm.loading import load_engine_parts

    config = _check_multihost(config)
    watchdog = CollectiveWatchdog(options.collective_timeout_s)
    caster = StepBroadcaster(STEP_SCHEMA, leader=True, watchdog=watchdog)
    parts = load_engine_parts(config)

    def make_runner(model, kv, **kwargs):
        return BroadcastingRunner(model, kv, caster=caster, **kwargs)

    parts.make_runner = make_runner
    return LLMEngine(config, parts), watchdog, caster


async def leader_async_engine(config: EngineConfig,
                              options: MultiHostOptions = MultiHostOptions()) -> LeaderAsyncEngine:
    """The serving engine of process 0 (create_async_engine calls this)."""
    import asyncio

    engine, watchdog, caster = await asyncio.to_thread(build_leader_engine, config, options)
    return LeaderAsyncEngine(engine, watchdog, caster, HeartbeatMonitor(config.num_processes),
                             options)


def run_follower(config: EngineConfig, options: MultiHostOptions = MultiHostOptions()) -> None:
    """A follower's whole life: load the model shards, then replay the leader's steps until
    it says stop. Returns when the leader stops; raises if a step fails."""
    from jaxllm.cache.kv_cache import allocate_kv_caches
    from jaxllm.kernels import get_backend
    from jaxllm.loading import load_engine_parts

    config = _check_multihost(config)
    parts = load_engine_parts(config)
    caster = StepBroadcaster(STEP_SCHEMA, leader=False)  # idle leaders are normal: no deadline
    monitor = HeartbeatMonitor(config.num_processes)
    stop_beating = monitor.start_beating(config.process_id, options.heartbeat_interval_s)
    try:
        msg = caster.receive()
        if msg is None:
            return
        if int(msg["op"][0]) != OP_SETUP:
            raise RuntimeError(f"expected the leader's setup message, got op {int(msg['op'][0])}")
        num_pages = int(msg["setup"][0])
        kv = allocate_kv_caches(parts.model_config, num_pages, parts.page_size, parts.kv_dtype,
                                sharding=parts.kv_sharding,
                                backend=get_backend(config.attention_impl),
                                head_shards=config.tensor_parallel_size)
        runner = ModelRunner(parts.model, kv, attention_impl=config.attention_impl,
                             attention_wrapper=parts.attention_wrapper,
                             max_rows=config.max_num_seqs, compute_dtype=parts.dtype)
        logger.info("follower %d ready: %d KV pages", config.process_id, num_pages)
        forward = None
        while (msg := caster.receive()) is not None:
            op = int(msg["op"][0])
            if op == OP_FORWARD:  # (the leader runs no look-ahead steps: see _check_multihost)
                forward = runner.forward(_unpack_inputs(msg))
                # before the next broadcast, as the leader
                jax.block_until_ready((forward.logits, forward.hidden))
            elif op == OP_SAMPLE:
                tensors = _unpack_tensors(msg, parts.model_config.vocab_size)
                runner.fetch(runner.sample(forward.logits, tensors))  # lockstep with the leader
            elif op == OP_PROMPT_LOGPROBS:
                runner.prompt_logprobs(forward.hidden, msg["rows"], msg["targets"])
            else:
                raise RuntimeError(f"unknown step op {op} from the leader")
        logger.info("follower %d: leader stopped", config.process_id)
    finally:
        stop_beating.set()
