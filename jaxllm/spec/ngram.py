"""Prompt-lookup proposals: continue the text the way it continued the last time its current
suffix occurred (copy-heavy tasks: rewrites, extraction, lists, code edits).

For n from `max_n` down to `min_n`, the last n tokens are searched for earlier in prompt +
output; the most recent occurrence of the longest matching suffix wins. If that occurrence
ends p tokens before the end, the proposal is what followed it, read as a copy from p tokens
back: token j of the proposal is history[L + j - p], continuing through the proposal itself
once the copy reaches the end (a text repeating with period p keeps repeating). So a match
always yields k tokens.

Cost: one vectorised comparison of the whole history with its last token, then at most
`max_n - 1` comparisons restricted to the positions still matching; a 4k-token history takes
a few microseconds. `NgramProposer` keeps each request's history as a growing int32 array so
that the per-step cost is that search, not a list-to-array conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxllm.spec.config import SpeculativeConfig

_EMPTY = np.zeros(0, np.int32)


def propose_ngram(history: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """Up to k proposed tokens (int32, empty when no suffix of >= min_n tokens recurs)."""
    length = history.shape[0]
    if k < 1 or length < min_n + 1:
        return _EMPTY
    # ends: positions i < L - 1 where history[i - j] == history[L - 1 - j] for j < matched
    ends = np.flatnonzero(history[:-1] == history[-1])
    matched = 1
    best_ends = ends
    while ends.size and matched < max_n:
        ends = ends[ends >= matched]  # a longer match needs room before it
        ends = ends[history[ends - matched] == history[length - 1 - matched]]
        if ends.size:
            matched += 1
            best_ends = ends
        else:
            break
    if not best_ends.size or matched < min_n:
        return _EMPTY
    period = length - 1 - int(best_ends[-1])  # the most recent occurrence
    if period >= k:
        return history[length - period:length - period + k].astype(np.int32, copy=True)
    cycle = history[length - period:]  # the last `period` tokens repeat
    return np.resize(cycle, k).astype(np.int32, copy=False)


class TokenHistory:
    """A request's prompt + output as a growing int32 array (amortised appends)."""

    def __init__(self, capacity: int = 256) -> None:
        self._data = np.zeros(max(1, capacity), np.int32)
        self.length = 0

    @property
    def tokens(self) -> np.ndarray:
        return self._data[:self.length]

    def sync(self, token_ids: Sequence[int]) -> np.ndarray:
        """Make the array equal `token_ids`, assuming it only grew since the last sync (the
        engine appends output tokens); a shorter list rebuilds it. Returns the tokens."""
        n = len(token_ids)
        if n < self.length:
            self.length = 0
        if n > self._data.shape[0]:
            grown = np.zeros(max(n, 2 * self._data.shape[0]), np.int32)
            grown[:self.length] = self._data[:self.length]
            self._data = grown
        if n > self.length:
            self._data[self.length:n] = token_ids[self.length:n]
            self.length = n
        return self.tokens


class NgramProposer:
    """Per-request n-gram proposals: `propose(request_id, token_ids, k)`, `drop(request_id)`
    when the request finishes (or is aborted)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.ngram_min
        self.max_n = config.ngram_max
        self._histories: dict[str, TokenHistory] = {}

    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> np.ndarray:
        """Up to k tokens continuing `token_ids` (the request's prompt + output so far)."""
        history = self._histories.get(request_id)
        if history is None:
            history = self._histories[request_id] = TokenHistory(2 * len(token_ids))
        return propose_ngram(history.sync(token_ids), k, self.min_n, self.max_n)

    def drop(self, request_id: str) -> None:
        self._histories.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._histories)
