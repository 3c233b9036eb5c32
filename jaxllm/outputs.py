"""What the engine hands back: vLLM-shaped request and completion outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """One token's log-probability, its rank in the distribution (1 = most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position: the chosen token's id -> Logprob, plus the top-k alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    """One sample (of n) for a request. text, token_ids and logprobs hold everything so far,
    or (`RequestOutputKind.DELTA`) what is new since the request's previous output;
    cumulative_logprob is always the running total."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0

    def snapshot(self) -> RequestMetrics:
        """A copy for one output (a streaming request gets one per step: copy.copy is ~5x
        slower)."""
        return RequestMetrics(self.arrival_time, self.first_scheduled_time,
                              self.first_token_time, self.finished_time, self.num_cached_tokens)


@dataclass(slots=True)
class RequestOutput:
    """A request's state as seen by a caller; yielded repeatedly while streaming."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request
