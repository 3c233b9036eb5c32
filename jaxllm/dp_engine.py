"""Data-parallel serving: one AsyncEngine per data slice behind a load balancer.

Each `data` index of the mesh gets its own engine (own pages, scheduler, prefix cache and
jitted step on its [1, tp] sub-mesh; see jaxllm.parallel.data_parallel for why not one SPMD
program). `DataParallelEngine` implements `EngineClient`, the interface the server uses, so the
server does not know how many replicas serve it. `create_async_engine(config)` picks the engine kind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from jaxllm.async_engine import AsyncEngine
from jaxllm.config import EngineConfig
from jaxllm.engine import EngineStats, LLMEngine
from jaxllm.engine_client import EngineClient
from jaxllm.errors import EngineDeadError
from jaxllm.outputs import RequestOutput
from jaxllm.parallel import LoadBalancer
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Counters summed over replicas; gauges (page_usage, step times) are averaged or maxed below.
_SUMMED = ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits",
           "prompt_tokens_total", "generation_tokens_total", "compile_count",
           "recompile_count", "steps_total", "num_preemptions", "spec_proposed_tokens",
           "spec_accepted_tokens")


class DataParallelEngine:
    """AsyncEngine-shaped front over replicas; a request lives on one replica until it ends."""

    def __init__(self, replicas: Sequence[AsyncEngine]) -> None:
        if not replicas:
            raise ValueError("DataParallelEngine needs at least one replica")
        self.replicas = list(replicas)
        first = self.replicas[0]
        self.engine_config: EngineConfig = first.engine_config
        self.model_config = first.model_config
        self.tokenizer = first.tokenizer
        self.model_name: str = first.model_name
        self.max_model_len: int = min(r.max_model_len for r in self.replicas)
        self._owner: dict[str, int] = {}  # request id -> replica index, while it runs
        self._live = [0] * len(self.replicas)  # requests routed to each replica, not yet done
        self._lock = threading.Lock()
        self.balancer: LoadBalancer[int] = LoadBalancer(
            list(range(len(self.replicas))), load_of=lambda i: self._live[i])

    @classmethod
    async def from_config(cls, config: EngineConfig) -> DataParallelEngine:
        """Load once, build one engine per data slice (warm-ups run one after another)."""
        from jaxllm.loading import load_engine_parts_per_slice
        from jaxllm.platform_defaults import resolve_engine_config

        config = resolve_engine_config(config).config
        def build() -> list[LLMEngine]:
            slices = load_engine_parts_per_slice(config)
            logger.info("data parallel: %d replicas of tensor_parallel_size=%d", len(slices),
                        config.tensor_parallel_size)
            return [LLMEngine(config, parts) for parts in slices]

        engines = await asyncio.to_thread(build)
        return cls([AsyncEngine(e) for e in engines])

    # -- requests ---------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str, *, cache_salt: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Route to the least-loaded replica and stream its outputs."""
        with self._lock:
            if request_id in self._owner:
                raise ValueError(f"request id {request_id!r} is already in use")
            index = self.balancer.pick()
            self._owner[request_id] = index
            self._live[index] += 1
        try:
            async for out in self.replicas[index].generate(
                    prompt, sampling_params, request_id, cache_salt=cache_salt, priority=priority):
                yield out
        finally:
            with self._lock:
                self._owner.pop(request_id, None)
                self._live[index] -= 1

    async def abort(self, request_id: str) -> bool:
        """Abort on the replica that owns the request; False if no replica has it."""
        index = self._owner.get(request_id)
        if index is None:
            return False
        return await self.replicas[index].abort(request_id)

    def replica_of(self, request_id: str) -> int | None:
        """Index of the replica serving `request_id` (None once it finished)."""
        return self._owner.get(request_id)

    # -- health and stats --------------------------------------------------------------------
    async def check_health(self) -> None:
        """Unhealthy if any replica is: its requests would fail, and the balancer may pick it."""
        for i, r in enumerate(self.replicas):
            try:
                await r.check_health()
            except EngineDeadError as e:
                raise EngineDeadError(f"data-parallel replica {i}: {e}") from e

    @property
    def is_healthy(self) -> bool:
        return all(r.is_healthy for r in self.replicas)

    def get_stats(self) -> EngineStats:
        stats = [r.get_stats() for r in self.replicas]
        total = EngineStats()
        for name in _SUMMED:
            setattr(total, name, sum(getattr(s, name) for s in stats))
        total.page_usage = sum(s.page_usage for s in stats) / len(stats)
        total.step_time_s = max(s.step_time_s for s in stats)
        total.host_gap_s = max(s.host_gap_s for s in stats)
        total.warmup_time_s = sum(s.warmup_time_s for s in stats)
        return total

    def replica_stats(self) -> list[EngineStats]:
        return [dataclasses.replace(r.get_stats()) for r in self.replicas]

    # -- management: applied to every replica ------------------------------------------------
    async def _all(self, name: str, *args: Any) -> list[Any]:
        return list(await asyncio.gather(*(getattr(r, name)(*args) for r in self.replicas)))

    async def reset_prefix_cache(self) -> bool:
        return all(await self._all("reset_prefix_cache"))

    async def pause_generation(self) -> None:
        await self._all("pause_generation")

    async def resume_generation(self) -> None:
        await self._all("resume_generation")

    async def sleep(self, level: int = 1) -> None:
        await self._all("sleep", level)

    async def wake_up(self) -> None:
        await self._all("wake_up")

    async def start_profile(self, log_dir: str | None = None) -> None:
        # One trace covers every device of the process; starting it per replica would fail.
        await self.replicas[0].start_profile(log_dir)

    async def stop_profile(self) -> None:
        await self.replicas[0].stop_profile()

    async def wait_for_requests_to_drain(self, timeout: float | None = None) -> None:
        await self._all("wait_for_requests_to_drain", timeout)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        await self._all("shutdown", drain_timeout)


async def create_async_engine(config: EngineConfig) -> EngineClient:
    """The serving engine the config asks for: one AsyncEngine, a DataParallelEngine for
    data_parallel_size > 1, or (several processes) the multi-host leader's engine.

    Multi-host: call jaxllm.parallel.initialize_distributed(config) first, on every process;
    followers run jaxllm.multihost.run_follower(config) instead of this.
    """
    if config.num_processes > 1:
        from jaxllm.multihost import leader_async_engine

        if config.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 across several processes is not supported; "
                             "use tensor parallelism across hosts")
        return await leader_async_engine(config)
    if config.data_parallel_size > 1:
        return await DataParallelEngine.from_config(config)
    return await AsyncEngine.from_config(config)
