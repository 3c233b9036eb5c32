"""One sequence's state as the scheduler and the page cache see it.

A user request with ``n > 1`` becomes n `Request` objects (samples) sharing ``parent_id``;
``sample_index`` orders them. The scheduler mutates these objects in place; the engine reads
``output_token_ids`` and ``status`` to build `RequestOutput`s.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from jaxllm.structured.matcher import GrammarMatcher

from jaxllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its pages were taken; output kept
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI/vLLM finish_reason string ("stop" | "length" | "abort"), None if live."""
        return _FINISH_REASON.get(self)


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    """A sequence: prompt, generated tokens, progress through the KV cache and its pages.

    num_computed_tokens counts tokens whose K/V is in the cache or is being written by a step
    already handed to the runner (the scheduler advances it when it schedules a step). The
    last sampled token is therefore never computed until the next step feeds it.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first
    cache_salt: str | None = None
    parent_id: str | None = None  # the user request id when n > 1
    sample_index: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    page_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (or a sibling)
    page_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full pages
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Dispatched steps that will sample this sequence's next tokens, results not yet applied:
    # 1 normally, 2 while the overlapped loop has scheduled a step past an in-flight one.
    num_pending_samples: int = 0
    sample_row: int = -1  # the row of the latest step that samples it (its output's index)
    num_draft_tokens: int = 0  # proposed tokens a dispatched step is verifying (computed ahead)
    max_tokens: int = 0  # effective limit, set by the scheduler at admission
    # Its sampling tensors depend on its output so far (penalties, multi-token bad words, a
    # grammar): set by the engine at admission, read per step by the overlapped loop.
    reads_token_history: bool = False
    # The sample's PRNG identity (jaxllm.sampling.request_key_data): a seed reproduces it.
    key_data: np.ndarray | None = field(default=None, repr=False)
    # Structured output: this sequence's grammar position (fills its allowed-token mask).
    grammar: GrammarMatcher | None = field(default=None, repr=False)
    # The page list the decode pass last handed a step (page_ids[:k], never mutated), reused
    # while a step needs the same k pages: the step layout then knows by identity that the
    # row did not change. Reset where the pages are freed (`KVCacheManager.free`: a
    # preemption, a finish, a waiting sibling's release); page_ids only grows between frees.
    scheduled_pages: list[int] = field(default_factory=list, repr=False)
    # prompt + output, one list kept in sync by `append_output`; do not mutate. (A plain
    # attribute, not a property: the scheduler reads it for every running request per step.)
    all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = self.prompt_token_ids + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def awaiting_sample(self) -> bool:
        """A dispatched step will sample this sequence's next token."""
        return self.num_pending_samples > 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past `num_output_tokens` (a verification emitted tokens after
        one that ended the sequence)."""
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens:]
