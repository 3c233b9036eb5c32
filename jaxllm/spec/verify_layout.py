"""Where a step's verification reads its inputs: the host-side layout of the speculating rows.

A speculating sequence feeds its last token and its k_r drafts as k_r + 1 query tokens,
starting at its query offset (`AttentionMetadata.cu_q_lens[s]`); the hidden state of query
token i gives the target's distribution for position i (after the last token for i = 0,
after draft i - 1 otherwise). `build_verify_layout` lays the speculating sequences out as
fixed-shape arrays of a verify-row bucket, so the verification program (LM head on those
rows, then `rejection_sample`) compiles once per (token bucket, row bucket).

When the step's logits rows (its bucket's S) can hold every verified position (R * (K+1) <=
S: a lone sequence verifying K = 7 drafts in the 8-token bucket), the step's forward computes
the LM head on exactly those positions instead of on each sequence's last token
(`logits_indices_for`), and the verification reads them: the LM head, a large share of a
small model's step, runs once per step instead of twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class VerifyLayout:
    """Padded to `rows` verify rows; padding rows have no drafts and read hidden row 0."""

    hidden_rows: np.ndarray  # i32 [rows, K+1]: hidden row of position i's query token
    draft_token_ids: np.ndarray  # i32 [rows, K]: 0 past a row's drafts
    num_draft: np.ndarray  # i32 [rows]
    seq_index: np.ndarray  # i32 [R]: the step's sequence index of each real verify row
    # The step's forward computed the logits of hidden_rows, row by row (logits_indices_for)
    in_logits: bool = False

    @property
    def num_rows(self) -> int:
        return int(self.seq_index.shape[0])


def verify_row_buckets(max_rows: int) -> list[int]:
    """Verify-row counts to compile: powers of two up to `max_rows` (included)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    buckets = [1]
    while buckets[-1] < max_rows:
        buckets.append(min(2 * buckets[-1], max_rows))
    return buckets


def fits_in_logits(rows: int, num_speculative_tokens: int, logits_rows: int) -> bool:
    """Whether a step whose forward computes `logits_rows` logits rows can compute all of a
    `rows`-row verification's positions there."""
    return rows * (num_speculative_tokens + 1) <= logits_rows


def logits_indices_for(layout: VerifyLayout, logits_rows: int) -> np.ndarray:
    """The step's logits_indices [logits_rows] computing `layout`'s verified positions, row
    by row, first (padding: row 0)."""
    flat = layout.hidden_rows.reshape(-1)
    if flat.shape[0] > logits_rows:
        raise ValueError(f"{flat.shape[0]} verified positions do not fit {logits_rows} logits rows")
    indices = np.zeros(logits_rows, np.int32)
    indices[:flat.shape[0]] = flat
    return indices


def build_verify_layout(query_starts: Sequence[int], drafts: Sequence[Sequence[int]],
                        seq_index: Sequence[int], num_speculative_tokens: int,
                        rows: int) -> VerifyLayout:
    """query_starts[j]: the first query row (cu_q_lens) of speculating sequence j, whose
    drafts[j] (at most K) follow its last token; seq_index[j]: its index in the step."""
    n = len(drafts)
    if not len(query_starts) == len(seq_index) == n:
        raise ValueError("query_starts, drafts and seq_index must have one entry per row")
    if n > rows:
        raise ValueError(f"{n} speculating sequences do not fit {rows} verify rows")
    k = num_speculative_tokens
    hidden_rows = np.zeros((rows, k + 1), np.int32)
    draft_ids = np.zeros((rows, k), np.int32)
    num_draft = np.zeros(rows, np.int32)
    offsets = np.arange(k + 1, dtype=np.int32)
    for j, (start, row_drafts) in enumerate(zip(query_starts, drafts, strict=True)):
        m = len(row_drafts)
        if m > k:
            raise ValueError(f"row {j} has {m} drafts, more than num_speculative_tokens {k}")
        hidden_rows[j] = start + np.minimum(offsets, m)  # past its drafts: its last query row
        draft_ids[j, :m] = row_drafts
        num_draft[j] = m
    return VerifyLayout(hidden_rows, draft_ids, num_draft, np.asarray(seq_index, np.int32))
