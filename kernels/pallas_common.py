"""What the Pallas kernels (tpu_own, gpu) share: query-row layout, block ranges, online softmax.

Both kernels fold the query heads of one kv head into the rows of a block of consecutive
tokens ([Hkv, tokens * G, D]), walk only the sequences each block's tokens belong to, and fold
every page they read into a running (max, sum, accumulator) per row. The new K/V are already in
the cache when they run (the backend wrapper writes them first, backends.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.ragged_layout import block_sequence_ranges, scalar_num_seqs

MASK_VALUE = -1e30


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def query_blocks(md: AttentionMetadata, num_tokens: int, block: int
                 ) -> tuple[int, jax.Array, jax.Array]:
    """(number of blocks, seq_lo, seq_hi): the [lo, hi) sequences owning each block's tokens,
    from the prepared metadata's token layout."""
    num_blocks = -(-num_tokens // block)
    num_valid = md.cu_q_lens[jnp.clip(scalar_num_seqs(md.num_seqs), 0, md.kv_lens.shape[0])]
    seq_lo, seq_hi = block_sequence_ranges(md.layout.seq_ids, num_valid, num_blocks, block)
    return num_blocks, seq_lo, seq_hi


def fold_query_rows(q: jax.Array, num_kv_heads: int, padded_tokens: int,
                    group_padded: int) -> jax.Array:
    """q [T, Hq, D] -> [Hkv, padded_tokens * group_padded, D]: row r of kv head h is token
    r // group_padded, query head h * G + r % group_padded (zero rows for the padding)."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    rows = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    rows = jnp.pad(rows, ((0, padded_tokens - num_tokens), (0, 0), (0, group_padded - group),
                          (0, 0)))
    return rows.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded_tokens * group_padded, head_dim)


def unfold_query_rows(rows: jax.Array, num_tokens: int, group: int,
                      group_padded: int) -> jax.Array:
    """Inverse of fold_query_rows: [Hkv, padded_tokens * group_padded, D] -> [T, Hq, D]."""
    num_kv_heads, total_rows, head_dim = rows.shape
    out = rows.reshape(num_kv_heads, total_rows // group_padded, group_padded, head_dim)
    out = out[:, :num_tokens, :group].transpose(1, 0, 2, 3)
    return out.reshape(num_tokens, num_kv_heads * group, head_dim)


def online_softmax_update(
    state: tuple[jax.Array, jax.Array, jax.Array],
    logits: jax.Array,
    mask: jax.Array,
    values: jax.Array,
    dot: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    keepdims: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one page of keys into (acc [rows, D], max, sum) per row.

    logits / mask [rows, keys]; values [keys, D] (zero where not a real key); max and sum are
    [rows, 1] with keepdims (TPU scratch) or [rows] without (GPU registers). Masked logits
    give exactly zero weight, so a row that sees no key keeps sum 0 (its output is 0).
    """
    acc, m_prev, l_prev = state
    as_column = (lambda x: x) if keepdims else (lambda x: x[:, None])
    logits = jnp.where(mask, logits, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=keepdims))
    probs = jnp.where(mask, jnp.exp(logits - as_column(m_new)), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(probs, axis=1, keepdims=keepdims)
    acc = as_column(alpha) * acc + dot(probs, values)
    return acc, m_new, l_new
