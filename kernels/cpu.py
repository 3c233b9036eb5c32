"""Ragged paged attention tuned for XLA CPU: a loop-free decode path plus the reference's
general path for steps that carry prefill chunks.

Why a separate path for decode: in a decode step every sequence has one query token, so token
i of the step is sequence i's query whenever the scheduler lists decodes first (it does). Then
each token needs exactly its own sequence's pages, gathered straight from the page table with
no per-token index, no token blocks (lax.map) and no shared-vs-per-token branch. Keys are
consumed by broadcast-multiply-reduce loops that XLA fuses with the page gather, so the cache
pages are read once and never copied into a [S, P*page, ...] temporary.

Which path runs is decided on device (lax.cond) from the step's own tables: the decode path
only when every valid token i belongs to sequence i. Buckets with more tokens than sequence
slots cannot be pure decode steps (the scheduler picks the smallest bucket) and compile only
the general path, which keeps their compile time at the reference's.

Same contract, masking and float32 math as kernels/reference.py, which stays its oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.kernels.ragged_layout import TokenLayout, token_layout, write_new_kv
from jaxllm.kernels.reference import attend as reference_attend

_MASK_VALUE = -1e30


def _gather_sequence_kv(kv_cache: jax.Array, page_indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K, V of every sequence's listed pages: [S, P*page_size, Hkv, D] each, in float32."""
    num_pages, page_size, two_hkv, head_dim = kv_cache.shape
    seqs, width = page_indices.shape
    pages = jnp.clip(page_indices, 0, num_pages - 1)
    kv = kv_cache[pages].reshape(seqs, width * page_size, two_hkv // 2, 2, head_dim)
    kv = kv.astype(jnp.float32)
    return kv[..., 0, :], kv[..., 1, :]


def decode_attend(
    q: jax.Array,
    kv_cache: jax.Array,
    page_indices: jax.Array,
    layout: TokenLayout,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> jax.Array:
    """Attention for a step whose token i is sequence i's single query (T == S).

    q [S, Hq, D]; the cache already holds the new K/V. Masked keys are dropped from the logits
    and zeroed in the values, so garbage or NaN in unused slots never reaches the output.
    """
    seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2] // 2
    group = num_q_heads // num_kv_heads
    kv_capacity = page_indices.shape[1] * kv_cache.shape[1]
    qf = (q.astype(jnp.float32) * sm_scale).reshape(seqs, 1, num_kv_heads, group, head_dim)
    k, v = _gather_sequence_kv(kv_cache, page_indices)
    key_pos = jnp.arange(kv_capacity, dtype=jnp.int32)[None, :]
    mask = layout.valid[:, None] & (key_pos <= layout.positions[:, None])
    if sliding_window is not None:
        mask = mask & (key_pos > layout.positions[:, None] - sliding_window)
    mask = mask[:, :, None, None]  # [S, L, 1, 1]
    logits = jnp.sum(qf * k[:, :, :, None, :], axis=-1)  # [S, L, Hkv, G]
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask, logits, _MASK_VALUE)
    row_max = jnp.max(logits, axis=1, keepdims=True)
    probs = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=1)  # [S, Hkv, G]
    v = jnp.where(mask, v, 0.0)
    out = jnp.sum(probs[..., None] * v[:, :, :, None, :], axis=1)  # [S, Hkv, G, D]
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(seqs, num_q_heads, head_dim).astype(q.dtype)


def is_decode_step(layout: TokenLayout) -> jax.Array:
    """True when every valid token i belongs to sequence i (each sequence has <= 1 token)."""
    tokens = jnp.arange(layout.seq_ids.shape[0], dtype=jnp.int32)
    return jnp.all(~layout.valid | (layout.seq_ids == tokens))


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def ragged_paged_attention_cpu(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Write the new K/V into their pages, then attend. Inputs are assumed validated."""
    layout = token_layout(q.shape[0], kv_lens, cu_q_lens, num_seqs)
    kv_cache = write_new_kv(kv_cache, k_new, v_new, page_indices, layout)
    opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    general = functools.partial(reference_attend, **opts)
    if q.shape[0] != kv_lens.shape[0]:
        return general(q, kv_cache, page_indices, layout), kv_cache
    out = jax.lax.cond(
        is_decode_step(layout),
        functools.partial(decode_attend, **opts),
        general,
        q, kv_cache, page_indices, layout,
    )  # fmt: skip
    return out, kv_cache
