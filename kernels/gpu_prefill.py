"""Paged prefill attention on GPU (Pallas Triton): query blocks that each belong to ONE sequence.

The tokens to attend (gpu_paged.py hands over every query token except the last one of each
sequence) are cut per sequence into blocks of `block_q` tokens; a block never spans two
sequences, so a program reads only its own sequence's pages, from the first one its window
can see to the one holding its last token, several pages per load (gpu_decode.attend_pages).
Rows of the tile are token-major: row r is token r // Gp, query head r % Gp of the program's
kv head (Gp = G padded to a power of two).

The grid is static: at most ceil(T / block_q) + min(S, T // 2) blocks exist (each sequence
with work has at least 2 query tokens and adds at most one partial block); blocks past the
step's work have no tokens and exit at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxllm.kernels.block_sizes import gpu_num_stages, gpu_num_warps
from jaxllm.kernels.gpu_decode import attend_pages
from jaxllm.kernels.ragged_layout import scalar_num_seqs


def max_prefill_blocks(num_tokens: int, max_seqs: int, block_q: int) -> int:
    """Static bound on the number of query blocks of a step (module docstring)."""
    return max(1, -(-num_tokens // block_q) + min(max_seqs, num_tokens // 2))


def prefill_blocks(cu_q_lens: jax.Array, num_seqs: jax.Array, *, block_q: int,
                   num_blocks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sequence, first token, token count) [num_blocks] int32 of each query block covering
    every token but the last of each real sequence; unused blocks have count 0."""
    max_seqs = cu_q_lens.shape[0] - 1
    n = jnp.clip(scalar_num_seqs(num_seqs), 0, max_seqs)
    real = jnp.arange(max_seqs, dtype=jnp.int32) < n
    counts = jnp.where(real, jnp.maximum(cu_q_lens[1:] - cu_q_lens[:-1] - 1, 0), 0)
    seq_blocks = -(-counts // block_q)
    ends = jnp.cumsum(seq_blocks, dtype=jnp.int32)
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.clip(jnp.sum(ends[None, :] <= blocks[:, None], axis=1, dtype=jnp.int32), 0,
                   max_seqs - 1)
    within = blocks - (ends[seq] - seq_blocks[seq])
    first = cu_q_lens[seq] + within * block_q
    count = jnp.clip(counts[seq] - within * block_q, 0, block_q)
    count = jnp.where(blocks < ends[-1], count, 0)
    return seq, first.astype(jnp.int32), count.astype(jnp.int32)


def _prefill_kernel(
    kv_lens_ref, pages_ref, cu_ref, seq_ref, first_ref, count_ref, q_ref, kv_ref, o_ref,
    *, group_padded: int, pages_per_block: int, num_pages: int, sm_scale: float,
    sliding_window: int | None, soft_cap: float | None, precision, split_probs: bool,
):  # fmt: skip
    rows = q_ref.shape[0]
    block_keys = pages_per_block * kv_ref.shape[1]
    b, head = pl.program_id(0), pl.program_id(1)
    seq, first, count = seq_ref[b], first_ref[b], count_ref[b]
    kv_len, q_start, q_end = kv_lens_ref[seq], cu_ref[seq], cu_ref[seq + 1]
    first_pos = kv_len - (q_end - q_start) + (first - q_start)
    row_token = lax.broadcasted_iota(jnp.int32, (rows,), 0) // group_padded
    q_pos = first_pos + row_token
    row_live = row_token < count
    last_pos = first_pos + count - 1
    block_hi = jnp.where(count > 0, last_pos // block_keys + 1, 0)
    block_lo = jnp.int32(0)
    if sliding_window is not None:
        block_lo = jnp.minimum(jnp.maximum(first_pos - sliding_window + 1, 0) // block_keys,
                               block_hi)

    def block_mask(key_pos):
        mask = row_live[:, None] & (key_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            mask = mask & (key_pos[None, :] > q_pos[:, None] - sliding_window)
        return mask

    acc, _, l_sum = attend_pages(
        q_ref[...], kv_ref, pages_ref, seq, head, kv_len, block_lo, block_hi, block_mask,
        pages_per_block=pages_per_block, num_pages=num_pages, sm_scale=sm_scale,
        soft_cap=soft_cap, precision=precision, split_probs=split_probs)
    o_ref[...] = (acc / jnp.where(l_sum > 0, l_sum, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "block_q", "pages_per_block", "sm_scale", "sliding_window", "soft_cap", "precision",
    "split_probs", "out_dtype", "interpret"))
def prefill_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    block_q: int,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    precision,
    split_probs: bool,
    out_dtype,
    interpret: bool,
) -> jax.Array:
    """Every query token but each sequence's last: q [T, Hq, D] (compute dtype), page_indices
    [S, P] with P a multiple of pages_per_block. Returns [T, Hq, D] in out_dtype, zero for the
    tokens it does not cover (last tokens, padding)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, _, two_hkv, _ = kv_cache.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    group_padded = 1 << max(0, (group - 1).bit_length())
    num_blocks = max_prefill_blocks(num_tokens, kv_lens.shape[0], block_q)
    seq, first, count = prefill_blocks(cu_q_lens, num_seqs, block_q=block_q,
                                       num_blocks=num_blocks)
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    tokens = jnp.where(offsets[None, :] < count[:, None], first[:, None] + offsets[None, :],
                       num_tokens).reshape(-1)  # [num_blocks * block_q]; T = no token
    q_sel = jnp.concatenate([q, jnp.zeros((1, num_q_heads, head_dim), q.dtype)])[tokens]
    q_sel = q_sel.reshape(num_blocks * block_q, num_kv_heads, group, head_dim)
    q_sel = jnp.pad(q_sel, ((0, 0), (0, 0), (0, group_padded - group), (0, 0)))
    rows = block_q * group_padded
    q_rows = q_sel.reshape(num_blocks, block_q, num_kv_heads, group_padded, head_dim)
    q_rows = q_rows.transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, num_blocks, rows, head_dim)

    kernel = functools.partial(
        _prefill_kernel, group_padded=group_padded, pages_per_block=pages_per_block,
        num_pages=num_pages, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap, precision=precision, split_probs=split_probs,
    )  # fmt: skip
    whole = pl.no_block_spec
    out = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        in_specs=[whole] * 6
        + [pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (h, b, 0, 0)), whole],
        out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (h, b, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_kv_heads, num_blocks, rows, head_dim), out_dtype),
        compiler_params=pltriton.CompilerParams(
            num_warps=gpu_num_warps(rows, head_dim), num_stages=gpu_num_stages()),
        interpret=interpret,
        name="jaxllm_paged_prefill_gpu",
    )(kv_lens, page_indices, cu_q_lens, seq, first, count, q_rows, kv_cache)
    out = out.reshape(num_kv_heads, num_blocks * block_q, group_padded, head_dim)
    out = out[:, :, :group].transpose(1, 0, 2, 3).reshape(-1, num_q_heads, head_dim)
    return jnp.zeros((num_tokens, num_q_heads, head_dim), out_dtype).at[tokens].set(
        out, mode="drop")
