"""Which sequences propose this step, and how many tokens: the scheduler's side of
speculative decoding.

`Speculation.drafts_for(req, batch_size)` asks the proposer for up to k tokens continuing a
decoding request (prompt lookup for `mode="ngram"`), within the request's per-request back-off
and its room (max_tokens, max_model_len). A request does not speculate while its next tokens'
constraints change from position to position in ways the verifier's per-position tensors do
not model: min_tokens not yet reached, bad words, a grammar. `record` feeds each verification's
outcome to the back-off and the counters; `drop` forgets a finished request.

A proposer marked `deferred` (the draft model, `jaxllm.spec.draft`; the EAGLE head,
`jaxllm.spec.eagle`) proposes after scheduling: `drafts_for` then reserves k placeholder
drafts (budget and pages for k + 1 tokens), and the engine calls `prepare(sched)` between
`Scheduler.schedule()` and laying out the step, which has the proposer write its tokens over
the placeholders. The engine calls `after_forward(inputs, forward)` after every target
forward: the EAGLE proposer stores the target's hidden states there (a no-op otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from jaxllm.request import Request
from jaxllm.spec.backoff import SpeculationBackoff
from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.ngram import NgramProposer

if TYPE_CHECKING:
    from jaxllm.scheduler_output import SchedulerOutput


class Proposer(Protocol):
    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> np.ndarray: ...

    def drop(self, request_id: str) -> None: ...


@dataclass
class SpeculationStats:
    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # of which accepted
    verifications: int = 0  # speculating rows verified

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified row (accepted drafts + the bonus/corrected token)."""
        return (self.accepted + self.verifications) / self.verifications if self.verifications else 0.0


class Speculation:
    def __init__(self, config: SpeculativeConfig, max_model_len: int,
                 proposer: Proposer | None = None) -> None:
        if not config.enabled:
            raise ValueError("speculation is disabled")
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = proposer if proposer is not None else NgramProposer(config)
        self._backoff: dict[str, SpeculationBackoff] = {}
        self.stats = SpeculationStats()

    @classmethod
    def for_engine(cls, config: SpeculativeConfig, engine_config: Any, parts: Any, buckets: Any,
                   num_pages: int, attention: Any) -> Speculation:
        """The engine's speculation: n-gram lookup, or a draft model or EAGLE head loaded,
        given its KV cache (`num_pages` pages, the target's page ids) and compiled here
        (ValueError for a bad draft model or head: missing, another vocabulary or hidden
        size, not an EAGLE-1 checkpoint)."""
        proposer = None
        if config.mode == "draft":
            from jaxllm.spec.draft import DraftProposer

            proposer = DraftProposer.load(engine_config, parts, buckets, num_pages, attention)
        elif config.mode == "eagle":
            from jaxllm.spec.eagle import EagleProposer

            proposer = EagleProposer.load(engine_config, parts, buckets, num_pages, attention)
        elif config.mode != "ngram":
            raise ValueError(f"speculative mode {config.mode!r} is not available yet")
        return cls(config, parts.max_model_len, proposer)

    @property
    def draft_runner(self):
        """The draft model's runner (draft mode) or the EAGLE head's (eagle mode: its KV
        cache and the feature store), else None: its caches sleep with the target's and its
        compile counts join the engine's."""
        return getattr(self.proposer, "runner", None)

    @property
    def deferred(self) -> bool:
        """The proposer fills placeholder drafts after scheduling (`prepare`)."""
        return bool(getattr(self.proposer, "deferred", False))

    def prepare(self, sched: SchedulerOutput) -> None:
        """Called once per scheduled step before its inputs are laid out: a deferred proposer
        replaces the step's placeholder drafts by its proposals (a no-op otherwise)."""
        if self.deferred and not sched.is_empty:
            self.proposer.fill(sched)

    def after_forward(self, inputs: Any, forward: Any) -> None:
        """Called after every target forward is dispatched (`StepInputs`, `ForwardOutput`):
        the EAGLE proposer stores the step's hidden states (a no-op for the others)."""
        hook = getattr(self.proposer, "after_forward", None)
        if hook is not None:
            hook(inputs, forward)

    @property
    def num_speculative_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def drafts_for(self, req: Request, batch_size: int) -> list[int]:
        """Draft tokens for `req`'s next step (empty: a plain decode)."""
        sp = req.sampling_params
        if (not self.config.speculates_at(batch_size) or req.num_output_tokens < sp.min_tokens
                or sp.bad_words_token_ids or getattr(sp, "structured_outputs", None)):
            return []
        backoff = self._backoff.get(req.request_id)
        if backoff is None:
            backoff = self._backoff[req.request_id] = SpeculationBackoff.from_config(self.config)
        cap = self.config.proposal_cap(req.num_tokens, req.num_output_tokens, req.max_tokens,
                                       self.max_model_len)
        k = min(backoff.proposal_length(self.config.num_speculative_tokens), cap)
        if k <= 0:
            return []
        if self.deferred:
            return [0] * k  # placeholders: `prepare` writes the proposals
        return [int(t) for t in self.proposer.propose(req.request_id, req.all_token_ids, k)[:k]]

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        backoff = self._backoff.get(request_id)
        if backoff is not None:
            backoff.record(proposed, accepted)
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.verifications += 1

    def drop(self, request_id: str) -> None:
        self._backoff.pop(request_id, None)
        self.proposer.drop(request_id)
