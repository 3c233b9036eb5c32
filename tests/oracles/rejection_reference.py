"""float64 numpy twin of `jaxllm.spec.rejection`, written the obvious way: one row at a time,
one position at a time, per-position sampling rows built by hand.

The uniforms are inputs (the device derives them from the request keys); besides the tokens
it returns each row's margin: how far the closest random decision it took was from flipping
(|u - p / q| for acceptances, the distance of u to a CDF boundary for draws). A float32 run may
legitimately differ from this one only where the margin is tiny.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.sampling import SamplingTensors
from tests.oracles.sampling_reference import reference_filtered_logprobs


@dataclass
class ReferenceVerify:
    num_accepted: np.ndarray  # [R]
    token_ids: np.ndarray  # [R, K+1], -1 after the emitted tokens
    margin: np.ndarray  # [R], inf for greedy rows


def reference_position_tensors(t: SamplingTensors, drafts: np.ndarray) -> SamplingTensors:
    """Row r * (K+1) + i: row r's parameters at output index step + i, with drafts[r, :i]
    added to its output counts."""
    rows, num_drafts = drafts.shape
    positions = num_drafts + 1
    fields = {name: np.repeat(np.asarray(getattr(t, name)), positions, axis=0)
              for name in t.__dataclass_fields__}
    fields["step"] = fields["step"] + np.tile(np.arange(positions), rows).astype(np.int32)
    counts = fields["output_counts"].copy()
    for r in range(rows):
        for i in range(positions):
            for d in drafts[r, :i]:
                counts[r * positions + i, d] += 1
    fields["output_counts"] = counts
    return SamplingTensors(**fields)


def reference_rejection_sample(logits: np.ndarray, drafts: np.ndarray, num_draft: np.ndarray,
                               t: SamplingTensors, draft_probs: np.ndarray | None,
                               u_accept: np.ndarray, u_draw: np.ndarray) -> ReferenceVerify:
    """logits [R, K+1, V]; drafts [R, K]; num_draft [R]; t: R rows (step = output index of
    the first emitted token); draft_probs [R, K, V] or None (one-hot proposals);
    u_accept, u_draw [R, K+1]: the uniforms of each position's output index."""
    rows, positions, vocab = logits.shape
    per_position = reference_position_tensors(t, drafts)
    logp = reference_filtered_logprobs(logits.reshape(rows * positions, vocab), per_position)
    logp = logp.reshape(rows, positions, vocab)
    greedy = np.asarray(t.greedy)
    num_accepted = np.zeros(rows, np.int64)
    tokens = np.full((rows, positions), -1, np.int64)
    margin = np.full(rows, np.inf)
    for r in range(rows):
        p = np.exp(logp[r])
        accepted = 0
        for i in range(int(num_draft[r])):
            d = int(drafts[r, i])
            if greedy[r]:
                ok = d == int(np.argmax(logp[r, i]))
            else:
                q = 1.0 if draft_probs is None else float(draft_probs[r, i, d])
                ok = u_accept[r, i] * q < p[i, d]
                if q > 0:
                    margin[r] = min(margin[r], abs(u_accept[r, i] - min(p[i, d] / q, 2.0)))
            if not ok:
                break
            tokens[r, i] = d
            accepted += 1
        num_accepted[r] = accepted
        if greedy[r]:
            tokens[r, accepted] = int(np.argmax(logp[r, accepted]))
            continue
        weights = p[accepted]
        if accepted < num_draft[r]:
            if draft_probs is None:
                q_row = np.zeros(vocab)
                q_row[drafts[r, accepted]] = 1.0
            else:
                q_row = draft_probs[r, accepted].astype(np.float64)
            residual = np.maximum(weights - q_row, 0.0)
            if residual.sum() > 0:
                weights = residual
        cum = np.cumsum(weights) / weights.sum()
        token = int(np.searchsorted(cum, u_draw[r, accepted], side="right"))
        tokens[r, accepted] = min(token, int(np.flatnonzero(weights > 0)[-1]))
        margin[r] = min(margin[r], float(np.min(np.abs(cum - u_draw[r, accepted]))))
    return ReferenceVerify(num_accepted, tokens, margin)
