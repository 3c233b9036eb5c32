"""Ragged paged attention for XLA CPU: the reference's math with less structure to compile.

Buckets with no more tokens than sequence slots (T <= S: the decode buckets) and a page table
short enough for one block (block_sizes.cpu_single_pass) run one loop-free pass: each token
gathers its own sequence's pages and attends to them, with no token blocks (lax.map) and no
shared-vs-per-token branch (lax.cond). Such a step reads T * P pages, what a decode step of
that bucket reads anyway, whatever its mix of decode and prefill tokens. Measured on the
default model (benchmarks/step_profile.py): the reference's step time at batch 32, faster at
batch 8, and about a third less compile time per such bucket. Other buckets (prefill-heavy, or long page tables) use the reference's
blocked path, whose single-sequence blocks read each sequence's pages once.

Same contract, masking and float32 math as kernels/reference.py, which stays its oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.kernels.block_sizes import cpu_single_pass
from jaxllm.kernels.ragged_layout import TokenLayout, token_layout, write_new_kv
from jaxllm.kernels.reference import attend as reference_attend

_MASK_VALUE = -1e30


def own_pages_attend(
    q: jax.Array,
    kv_cache: jax.Array,
    page_indices: jax.Array,
    layout: TokenLayout,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> jax.Array:
    """Every token against its own sequence's pages, for all T tokens at once (no loop).

    q [T, Hq, D]; the cache already holds the new K/V. Reads T * P pages, so it is meant for
    buckets with T == S, where that is exactly what a decode step needs. Written as
    broadcast-multiply-reduce (not batched matmuls) so XLA fuses the page gather into the two
    reductions instead of copying the pages out first. Masked keys are dropped from the
    logits and zeroed in the values, so NaN in unused slots never reaches the output.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_cache.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    kv_capacity = page_indices.shape[1] * page_size
    pages = jnp.clip(page_indices[layout.seq_ids], 0, num_pages - 1)  # [T, P]
    kv = kv_cache[pages].reshape(num_tokens, kv_capacity, num_kv_heads, 2, head_dim)
    kv = kv.astype(jnp.float32)
    k, v = kv[..., 0, :], kv[..., 1, :]  # [T, L, Hkv, D]
    key_pos = jnp.arange(kv_capacity, dtype=jnp.int32)[None, :]
    mask = layout.valid[:, None] & (key_pos <= layout.positions[:, None])
    if sliding_window is not None:
        mask = mask & (key_pos > layout.positions[:, None] - sliding_window)
    mask = mask[:, :, None, None]  # [T, L, 1, 1]
    qf = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, 1, num_kv_heads, group, head_dim)
    logits = jnp.sum(qf * k[:, :, :, None, :], axis=-1)  # [T, L, Hkv, G]
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask, logits, _MASK_VALUE)
    row_max = jnp.max(logits, axis=1, keepdims=True)
    probs = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=1)  # [T, Hkv, G]
    v = jnp.where(mask, v, 0.0)
    out = jnp.sum(probs[..., None] * v[:, :, :, None, :], axis=1)  # [T, Hkv, G, D]
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


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
    kv_capacity = page_indices.shape[1] * kv_cache.shape[1]
    head_dim, num_kv_heads = q.shape[2], kv_cache.shape[2] // 2
    if cpu_single_pass(q.shape[0], kv_lens.shape[0], kv_capacity, num_kv_heads, head_dim):
        return own_pages_attend(q, kv_cache, page_indices, layout, **opts), kv_cache
    return reference_attend(q, kv_cache, page_indices, layout, **opts), kv_cache
