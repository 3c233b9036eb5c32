"""float64 numpy twin of `jaxllm.sampling`'s filtering, written the obvious way (full sorts).

It defines what the fast path must compute: logit bias -> allowed-token mask (-inf) ->
penalties -> temperature -> top-k -> top-p -> min-p, keeping every token whose scaled logit is >= the row's threshold (ties kept).
"""

from __future__ import annotations

import numpy as np

from jaxllm.sampling import SamplingTensors
from jaxllm.token_masks import unpack_allowed_host


def reference_filtered_logprobs(logits: np.ndarray, t: SamplingTensors) -> np.ndarray:
    """Log-probabilities [R, V] (float64, -inf = filtered) that each row samples from."""
    x = np.asarray(logits, np.float64)
    f = {name: np.asarray(getattr(t, name)) for name in t.__dataclass_fields__}
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        out[r] = _reference_row(x[r], {name: value[r] for name, value in f.items()})
    return out


def reference_penalties(row: np.ndarray, counts: np.ndarray, prompt_mask: np.ndarray,
                        presence: float, frequency: float, repetition: float) -> np.ndarray:
    row = row.copy()
    occurred = prompt_mask | (counts > 0)
    row[occurred] = np.where(row[occurred] > 0, row[occurred] / repetition,
                             row[occurred] * repetition)
    return row - frequency * counts - presence * (counts > 0)


def _reference_row(row: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    vocab = row.shape[0]
    row = row + p["logit_bias"].astype(np.float64)
    row = np.where(unpack_allowed_host(p["allowed_mask"], vocab), row, -np.inf)
    x = reference_penalties(row, p["output_counts"].astype(np.float64), p["prompt_mask"],
                            float(p["presence_penalty"]), float(p["frequency_penalty"]),
                            float(p["repetition_penalty"]))
    if p["greedy"]:
        out = np.full(vocab, -np.inf)
        out[int(np.argmax(x))] = 0.0
        return out
    x = x / float(p["temperature"])
    keep = np.ones(vocab, bool)
    k = int(p["top_k"])
    if 0 < k < vocab:
        kth = np.sort(x)[::-1][k - 1]
        keep &= x >= kth
    top_p = float(p["top_p"])
    if top_p < 1.0:
        probs = _softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-x, kind="stable")
        exclusive = np.cumsum(probs[order]) - probs[order]
        last = order[np.flatnonzero((exclusive < top_p) & keep[order])[-1]]
        keep &= x >= x[last]
    min_p = float(p["min_p"])
    if min_p > 0.0:
        keep &= x >= x.max() + np.log(min_p)
    kept = np.where(keep, x, -np.inf)
    return kept - _logsumexp(kept)


def reference_logprobs(logits: np.ndarray, tokens: np.ndarray, k: int):
    """float64 log_softmax: chosen-token logprobs, ranks (1 = best), top-k ids and values."""
    x = np.asarray(logits, np.float64)
    lp = x - _logsumexp(x, axis=1)[:, None]
    chosen = lp[np.arange(x.shape[0]), tokens]
    ranks = (x > x[np.arange(x.shape[0]), tokens][:, None]).sum(axis=1) + 1
    top_ids = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return chosen, ranks, top_ids, np.take_along_axis(lp, top_ids, axis=1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _logsumexp(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    s = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return s if axis is None else np.squeeze(s, axis=axis)
