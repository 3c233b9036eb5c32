"""Ragged paged attention in plain jax.numpy: the oracle for the kernels and the CPU path.

Layout: the flattened token axis is processed in blocks of consecutive tokens (lax.map when
there is more than one block). A block whose tokens all belong to one sequence (the body of a
prefill chunk) gathers that sequence's pages once and runs as a plain matmul; a block that mixes
sequences (decode batches, chunk boundaries) gathers each token's own pages. Either way the cost
scales with the pages listed in page_indices (its width P), never with the whole cache, and a
decode token reads exactly its own sequence's pages.

Keys beyond a query's causal / sliding-window range are masked in the logits AND zeroed in the
values, so garbage or NaN in unused pages (or in slots past kv_len) never reaches the output.
Math runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.kernels.block_sizes import reference_token_block
from jaxllm.kernels.ragged_layout import TokenLayout, token_layout, write_new_kv

_MASK_VALUE = -1e30


def _masked_softmax(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Softmax over `axis` of the masked logits; rows with no visible key give all zeros."""
    logits = jnp.where(mask, logits, _MASK_VALUE)
    row_max = jnp.max(logits, axis=axis, keepdims=True)
    probs = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(probs, axis=axis, keepdims=True)
    return probs / jnp.where(denom > 0, denom, 1.0)


def _key_mask(
    positions: jax.Array, valid: jax.Array, kv_capacity: int, sliding_window: int | None
) -> jax.Array:
    """[B, L]: which key positions each token of the block may attend to."""
    key_pos = jnp.arange(kv_capacity, dtype=jnp.int32)
    mask = valid[:, None] & (key_pos[None, :] <= positions[:, None])
    if sliding_window is not None:
        mask = mask & (key_pos[None, :] > positions[:, None] - sliding_window)
    return mask


def _attend_shared_keys(q, k, v, mask, soft_cap):
    """Tokens of ONE sequence: q [B, Hkv, G, D] vs k, v [L, Hkv, D] as real matmuls."""
    key_ok = jnp.any(mask, axis=0)[:, None, None]  # [L, 1, 1]
    k = jnp.where(key_ok, k, 0.0)
    v = jnp.where(key_ok, v, 0.0)  # 0 * NaN would poison the sum otherwise
    logits = jnp.einsum("bkgd,lkd->bkgl", q, k)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    probs = _masked_softmax(logits, mask[:, None, None, :], axis=-1)
    return jnp.einsum("bkgl,lkd->bkgd", probs, v)


def _attend_own_keys(q, k, v, mask, soft_cap):
    """Each token its own keys: q [B, Hkv, G, D] vs k, v [B, L, Hkv, D].

    Written as broadcast-multiply-reduce rather than a batched einsum: with few query heads
    per KV head these are matrix-vector products, and XLA CPU runs a fused elementwise loop
    several times faster than a batch of tiny matmuls (measured on decode batches).
    """
    mask4 = mask[:, :, None, None]  # [B, L, 1, 1]
    logits = jnp.sum(q[:, None] * k[:, :, :, None, :], axis=-1)  # [B, L, Hkv, G]
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    probs = _masked_softmax(logits, mask4, axis=1)
    v = jnp.where(mask4, v, 0.0)
    return jnp.sum(probs[..., None] * v[:, :, :, None, :], axis=1)  # [B, Hkv, G, D]


def _gather_pages(kv_cache: jax.Array, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pages [..., P] -> K, V of shape [..., P*page_size, Hkv, D] in float32."""
    _, page_size, two_hkv, head_dim = kv_cache.shape
    kv = kv_cache[pages]  # [..., P, page_size, 2Hkv, D]
    lead = pages.shape[:-1]
    kv = kv.reshape(*lead, pages.shape[-1] * page_size, two_hkv // 2, 2, head_dim)
    kv = kv.astype(jnp.float32)
    return kv[..., 0, :], kv[..., 1, :]


def attend(
    q: jax.Array,
    kv_cache: jax.Array,
    page_indices: jax.Array,
    layout: TokenLayout,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> jax.Array:
    """Attention of every token over its own sequence's cache (already holding the new K/V)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2] // 2
    group = num_q_heads // num_kv_heads
    kv_capacity = page_indices.shape[1] * kv_cache.shape[1]
    block = reference_token_block(num_tokens, kv_capacity, num_kv_heads, head_dim)
    num_blocks = -(-num_tokens // block)
    padded = num_blocks * block

    qf = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    pad = padded - num_tokens

    def pad_tokens(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x

    qf, seq_ids, positions, valid = (
        pad_tokens(qf),
        pad_tokens(layout.seq_ids),
        pad_tokens(layout.positions),
        pad_tokens(layout.valid),
    )

    def one_block(args: tuple[jax.Array, ...]) -> jax.Array:
        q_b, seq_b, pos_b, valid_b = args
        mask = _key_mask(pos_b, valid_b, kv_capacity, sliding_window)
        # Padding tokens take the first token's sequence so they never split a block.
        seq_b = jnp.where(valid_b, seq_b, seq_b[0])

        def shared_pages(_: None) -> jax.Array:
            k, v = _gather_pages(kv_cache, page_indices[seq_b[0]])
            return _attend_shared_keys(q_b, k, v, mask, soft_cap)

        def per_token_pages(_: None) -> jax.Array:
            k, v = _gather_pages(kv_cache, page_indices[seq_b])
            return _attend_own_keys(q_b, k, v, mask, soft_cap)

        if block == 1:
            return shared_pages(None)
        return jax.lax.cond(jnp.all(seq_b == seq_b[0]), shared_pages, per_token_pages, None)

    def reshape_blocks(x: jax.Array) -> jax.Array:
        return x.reshape(num_blocks, block, *x.shape[1:])

    blocks = tuple(reshape_blocks(x) for x in (qf, seq_ids, positions, valid))
    if num_blocks == 1:
        out = one_block(tuple(x[0] for x in blocks))[None]
    else:
        out = jax.lax.map(one_block, blocks)
    out = out.reshape(padded, num_q_heads, head_dim)[:num_tokens]
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def ragged_paged_attention_reference(
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
    out = attend(
        q,
        kv_cache,
        page_indices,
        layout,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return out, kv_cache
