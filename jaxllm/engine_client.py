"""The two engine interfaces everything above the engine is typed against.

`EngineClient` (async) is what the server and other async callers use; the single-device
`AsyncEngine`, the data-parallel `DataParallelEngine` and the multi-host leader's
`LeaderAsyncEngine` implement it, so the server never knows which one serves it.
`EngineCore` (sync) is the loop body a caller steps itself: `LLMEngine` implements it and
`LLM` is typed against it. Both take a request's arguments in one order:
(prompt, sampling_params, request_id, *, cache_salt, priority).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from jaxllm.config import EngineConfig, ModelConfig
    from jaxllm.engine import EngineStats
    from jaxllm.outputs import RequestOutput
    from jaxllm.sampling_params import SamplingParams
    from jaxllm.tokenizer import Tokenizer


@runtime_checkable
class EngineClient(Protocol):
    """An async engine: streams outputs, runs management commands."""

    engine_config: EngineConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int

    def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                 request_id: str, *, cache_salt: str | None = None,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Admit a request; yield its outputs (`sampling_params.output_kind`: cumulative,
        deltas or the final one) until finished (ValueError for bad input before anything is
        queued; leaving the iterator early aborts it)."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine can no longer serve."""
        ...

    @property
    def is_healthy(self) -> bool: ...

    def get_stats(self) -> EngineStats: ...

    async def reset_prefix_cache(self) -> bool: ...

    async def pause_generation(self) -> None: ...

    async def resume_generation(self) -> None: ...

    async def sleep(self, level: int = 1) -> None: ...

    async def wake_up(self) -> None: ...

    async def start_profile(self, log_dir: str | None = None) -> None: ...

    async def stop_profile(self) -> None: ...

    async def wait_for_requests_to_drain(self, timeout: float | None = None) -> None: ...

    async def shutdown(self, drain_timeout: float | None = None) -> None: ...


@runtime_checkable
class EngineCore(Protocol):
    """A synchronous engine the caller steps: admit, step until done, abort."""

    tokenizer: Tokenizer
    generation_config: dict[str, Any]

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None,
                    request_id: str, *, cache_salt: str | None = None,
                    priority: int = 0) -> None: ...

    def abort_request(self, request_id: str, return_output: bool = False
                      ) -> RequestOutput | bool | None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def default_sampling_params(self) -> SamplingParams: ...

    def get_stats(self) -> EngineStats: ...

    def reset_prefix_cache(self) -> bool: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self) -> None: ...

    def start_profile(self, log_dir: str | None = None) -> None: ...

    def stop_profile(self) -> None: ...
