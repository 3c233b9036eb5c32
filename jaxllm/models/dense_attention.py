"""Dense causal attention over a flat ragged batch: the plain (cache-free) attention function.

Used by the plain decode path and by tests; the engine swaps in ragged paged attention.
Every token attends to earlier-or-equal positions of its own segment (sequence).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class DenseMetadata:
    """segment_ids [T]: sequence of each token, -1 for padding; positions [T]. `kv_dtype`:
    round K/V to it before attending, as a paged cache of that dtype stores them (None: not)."""

    segment_ids: jax.Array
    positions: jax.Array
    kv_dtype: Any = struct.field(pytree_node=False, default=None)


def dense_causal_attention(q, k, v, layer_cache, md: DenseMetadata, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None):
    """q [T, Hq, D], k/v [T, Hkv, D] -> ([T, Hq, D], layer_cache unchanged)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if md.kv_dtype is not None:
        k, v = k.astype(md.kv_dtype), v.astype(md.kv_dtype)
    qg = q.reshape(t, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("qhgd,khd->hgqk", qg, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    seg, pos = md.segment_ids, md.positions
    mask = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0) & (pos[None, :] <= pos[:, None])
    if sliding_window is not None:
        mask &= pos[:, None] - pos[None, :] < sliding_window
    logits = jnp.where(mask[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask[None, None], probs, 0.0)  # padding rows: all-masked -> zeros, not NaN
    out = jnp.einsum("hgqk,khd->qhgd", probs, v.astype(jnp.float32))
    return out.reshape(t, hq, d).astype(q.dtype), layer_cache
