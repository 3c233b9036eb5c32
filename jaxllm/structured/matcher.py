"""One sequence's position in its grammar.

The matcher follows the sequence's output lazily: `sync(output_ids)` consumes the tokens it has
not seen yet, so whoever asks (the sampling-tensor builder before a step, the output processor
after one) brings it up to date, and preemption (output kept), recompute and the overlapped
loop need nothing special. A token the grammar rejects (it could only come from a bug: the
sampler never draws a masked token) puts the matcher in its error state, which reads as
finished so the request stops instead of running unconstrained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import llguidance
import llguidance.numpy as llnp
import numpy as np

logger = logging.getLogger(__name__)


class GrammarMatcher:
    """Wraps an llguidance `LLMatcher` for one sequence (one of n samples)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher
        self._consumed = 0  # output tokens fed to the matcher so far

    @property
    def num_consumed(self) -> int:
        return self._consumed

    @property
    def llmatcher(self) -> llguidance.LLMatcher:
        """The wrapped matcher (for batched mask filling)."""
        return self._matcher

    def sync(self, output_ids: Sequence[int]) -> None:
        """Consume output_ids[num_consumed:]; roll back if the output got shorter."""
        if len(output_ids) < self._consumed:
            self._matcher.rollback(self._consumed - len(output_ids))
            self._consumed = len(output_ids)
            return
        if len(output_ids) == self._consumed or self.finished:
            self._consumed = max(self._consumed, len(output_ids))
            return
        new = [int(t) for t in output_ids[self._consumed:]]
        self._consumed = len(output_ids)
        if not self._matcher.consume_tokens(new):
            logger.warning("grammar rejected a generated token: %s", self.error)

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (EOS may follow)."""
        return self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing but EOS can follow (or the matcher is in its error state)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    def fill_bitmask(self, words: np.ndarray, row: int) -> None:
        """Write this sequence's allowed next tokens into `words[row]` (int32 [rows, W],
        W = ceil(tokenizer vocab / 32), bit t % 32 of word t // 32 = token t allowed)."""
        llnp.fill_next_token_bitmask(self._matcher, words, row)
