"""Where each flattened token belongs: its sequence, its absolute position, and its cache slot.

Shared by every implementation: the token -> (sequence, position) mapping and the scatter that
writes the new keys/values into their pages. The write is a plain XLA scatter with
``mode="drop"``: padding tokens are sent to an out-of-range page and land nowhere, and under a
donated cache XLA performs it in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TokenLayout:
    """Per-token view of a ragged batch (all arrays have length T); a pytree, so it can cross
    lax.cond / jit boundaries."""

    seq_ids: jax.Array  # int32 [T]: sequence of the token (clamped into [0, S) for padding)
    positions: jax.Array  # int32 [T]: absolute position of the token in its sequence
    valid: jax.Array  # bool [T]: False for padding tokens


def scalar_num_seqs(num_seqs: jax.Array) -> jax.Array:
    """num_seqs as an int32 scalar, whether it came as shape [] or [1]."""
    return jnp.reshape(num_seqs, (-1,))[0].astype(jnp.int32)


def token_layout(
    num_tokens: int, kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array
) -> TokenLayout:
    """Map each of the T flattened tokens to its sequence and absolute position.

    Only the first num_seqs sequences count; cu_q_lens beyond them may hold anything. Counting
    the real sequences that end at or before a token (O(T*S) integer work) is robust to such
    padding, unlike a binary search that assumes the whole array is sorted.
    """
    max_seqs = kv_lens.shape[0]
    n = jnp.clip(scalar_num_seqs(num_seqs), 0, max_seqs)
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_ends = cu_q_lens[1:]
    real_seq = jnp.arange(max_seqs, dtype=jnp.int32) < n
    ended = (seq_ends[None, :] <= tokens[:, None]) & real_seq[None, :]
    seq_ids = jnp.sum(ended, axis=1, dtype=jnp.int32)
    valid = (tokens < cu_q_lens[n]) & (tokens >= cu_q_lens[0]) & (seq_ids < n)
    seq_ids = jnp.clip(seq_ids, 0, max_seqs - 1)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    positions = kv_lens[seq_ids] - q_lens[seq_ids] + (tokens - cu_q_lens[seq_ids])
    valid = valid & (positions >= 0)
    positions = jnp.where(valid, positions, 0)
    return TokenLayout(seq_ids=seq_ids, positions=positions, valid=valid)


def _new_kv_targets(
    kv_cache_shape: tuple[int, ...], page_indices: jax.Array, layout: TokenLayout
) -> tuple[jax.Array, jax.Array]:
    """(page, slot) of each token's new K/V; page = num_pages (out of range) for tokens that
    write nothing: padding, a position past the page table, a page index out of range."""
    num_pages, page_size = kv_cache_shape[0], kv_cache_shape[1]
    pages_per_seq = page_indices.shape[1]
    page_col = jnp.clip(layout.positions // page_size, 0, pages_per_seq - 1)
    page = page_indices[layout.seq_ids, page_col]
    in_table = (layout.positions // page_size) < pages_per_seq
    ok = layout.valid & in_table & (page >= 0) & (page < num_pages)
    return jnp.where(ok, page, num_pages), layout.positions % page_size


def new_kv_slots(
    kv_cache_shape: tuple[int, ...], page_indices: jax.Array, layout: TokenLayout
) -> jax.Array:
    """int32 [T]: page * page_size + slot of each token's new K/V, -1 where nothing is written
    (the native CPU kernel writes them itself)."""
    page, slot = _new_kv_targets(kv_cache_shape, page_indices, layout)
    return jnp.where(page < kv_cache_shape[0], page * kv_cache_shape[1] + slot, -1)


def write_new_kv(
    kv_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    page_indices: jax.Array,
    layout: TokenLayout,
) -> jax.Array:
    """Scatter the new tokens' K/V into their (page, slot); padding tokens write nothing."""
    num_tokens, num_kv_heads, head_dim = k_new.shape
    page, slot = _new_kv_targets(kv_cache.shape, page_indices, layout)
    # Interleave so K of head h sits at 2h and V at 2h+1.
    kv = jnp.stack([k_new, v_new], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)
    return kv_cache.at[page, slot].set(kv.astype(kv_cache.dtype), mode="drop")


def block_sequence_ranges(
    seq_ids: jax.Array, num_valid: jax.Array, num_blocks: int, block: int
) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) of the sequences owning tokens of each query block (empty past the last token)."""
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block
    lasts = jnp.minimum(starts + block, num_valid) - 1
    has_tokens = starts < num_valid
    lo = jnp.where(has_tokens, seq_ids[jnp.clip(starts, 0, seq_ids.shape[0] - 1)], 0)
    hi = jnp.where(has_tokens, seq_ids[jnp.clip(lasts, 0, seq_ids.shape[0] - 1)] + 1, 0)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)
