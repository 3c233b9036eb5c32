"""The scheduler's limits: batch size, token budget, context length, prefill chunking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    prefill_chunk_size: int | None = None  # None: max_num_batched_tokens
    # Take fewer prompt tokens when that lands a step nearer a token bucket than padding up
    # would (the rest is prefilled next step): a step costs its bucket's tokens, not its own.
    align_prefill_to_buckets: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {self.prefill_chunk_size}")

    @property
    def chunk_size(self) -> int:
        return self.prefill_chunk_size or self.max_num_batched_tokens

    @classmethod
    def from_engine_config(cls, config: Any, *, max_model_len: int) -> SchedulerConfig:
        """From an EngineConfig whose max_model_len was resolved by the caller."""
        return cls(max_num_seqs=config.max_num_seqs,
                   max_num_batched_tokens=config.max_num_batched_tokens,
                   max_model_len=max_model_len, prefill_chunk_size=config.prefill_chunk_size)
