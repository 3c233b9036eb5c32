"""What one `Scheduler.schedule()` decides: which sequences run, how many tokens each feeds,
which pages they own, and the bucket the step is padded to. No device layout: the runner side
lays it out (`jaxllm.model_inputs.build_step_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxllm.buckets import Bucket
from jaxllm.request import Request


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step: feed token_ids at positions start_pos.. ."""

    request: Request
    token_ids: list[int]
    start_pos: int
    num_new_tokens: int
    samples: bool  # the step samples this sequence's next token (end of prefill or decode)
    page_ids: list[int]  # the pages covering positions [0, kv_len)
    epoch: int  # request.num_preemptions when scheduled; a stale step is ignored by update()
    output_index: int = 0  # index in the output of the token this row samples
    # Look-ahead: token_ids[0] is a placeholder whose id is row `prev_row` of the in-flight
    # step's sampled tokens (None: token_ids are all known).
    prev_row: int | None = None
    # Speculation: proposed tokens fed after the last known token (token_ids[1:]), verified
    # by this step; `update` keeps the accepted ones and rolls the rest back. A list when
    # there are any (a draft model writes them in place); () otherwise (no list per row).
    drafts: list[int] | tuple[()] = ()

    @property
    def kv_len(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    bucket: Bucket | None  # None when nothing was scheduled
    num_tokens: int
    page_size: int
    null_page: int
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs
