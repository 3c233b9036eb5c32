"""Server-only settings that are not engine concerns (kept apart from EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Limits and parsers of the HTTP layer. Engine/server flags shared with `LLM` live in
    `jaxllm.config.EngineConfig`; these only make sense for the server."""

    max_n: int = 16  # most samples per request (n)
    max_logprobs: int = 20  # most top-logprobs per position (OpenAI's limit)
    tool_call_parser: str | None = "hermes"  # "hermes" or None (tools then never parsed)
    reasoning_parser: str | None = None  # "think": split <think>...</think> into reasoning_content
    drain_timeout_s: float = 30.0  # graceful shutdown: wait this long for in-flight requests
    retry_after_s: float = 1.0  # Retry-After header on 429 when the engine gives none
    enable_metrics: bool = True
    # After the engine's warm-up, gc.freeze() what is alive then (the libraries and the model:
    # ~700k objects), so a full garbage collection no longer stalls a step (~0.3 s on a 2-core
    # CPU: an inter-token latency spike). Cyclic garbage among those objects is never
    # collected afterwards: right for a process that serves one engine.
    freeze_gc: bool = True

    def __post_init__(self) -> None:
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20], got {self.max_logprobs}")
        if self.tool_call_parser not in (None, "hermes"):
            raise ValueError(f"tool_call_parser must be 'hermes' or None, got {self.tool_call_parser!r}")
        if self.reasoning_parser not in (None, "think"):
            raise ValueError(f"reasoning_parser must be 'think' or None, got {self.reasoning_parser!r}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
