"""Paged decode attention on GPU (Pallas Triton): one query token per sequence, split-KV.

Grid (sequence, kv head, kv split). A program holds the G query heads that share its kv head
as the rows of one tile (padded to the tensor-core minimum, block_sizes.gpu_decode_rows), so
every K/V byte it reads serves all G heads at once. It streams its split's share of the
sequence's pages, several pages per block (one gathered load of `pages_per_block` pages: fewer,
larger loads for Triton's pipeliner to keep in flight), folding each block into a running
(max, sum, accumulator) per row. Splits of one sequence write partial results that
`merge_splits` combines in one small XLA pass; long contexts with few sequences fill the SMs.

Used by gpu_paged.py for the last query token of every sequence (a decode row, or the final
token of a prefill chunk); the cache already holds the step's new K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxllm.kernels.block_sizes import gpu_decode_splits, gpu_num_stages, gpu_num_warps

MASK_VALUE = -1e30  # finite: a fully masked row keeps max -1e30 and weights exactly 0


def load_kv_block(kv_ref, pages_ref, seq, block, head, *, pages_per_block: int,
                  num_pages: int, dtype) -> tuple[jax.Array, jax.Array]:
    """(K, V) [pages_per_block * page_size, D] of kv head `head` for page-table columns
    [block * pages_per_block, +pages_per_block) of sequence `seq`, in `dtype`."""
    _, page_size, _, head_dim = kv_ref.shape
    pages = pages_ref[seq, pl.ds(block * pages_per_block, pages_per_block)]
    pages = jnp.clip(pages, 0, num_pages - 1)  # columns past use may hold anything
    keys = pages_per_block * page_size
    k = kv_ref[pages, :, 2 * head, :].reshape(keys, head_dim).astype(dtype)
    v = kv_ref[pages, :, 2 * head + 1, :].reshape(keys, head_dim).astype(dtype)
    return k, v


def probs_dot_values(probs, v, *, precision, split_probs: bool):
    """P.V with float32 probabilities P. With bfloat16 V, P goes to the tensor cores as
    bfloat16: as a hi + lo pair (two MMAs, ~16 mantissa bits: the reference's accuracy) when
    split_probs, else once (flash attention's rounding: ~2^-9 relative per probability)."""
    if v.dtype == jnp.float32:
        return pltriton.dot(probs, v, precision=precision)
    hi = probs.astype(v.dtype)
    out = pltriton.dot(hi, v, precision=precision)
    if split_probs:
        lo = (probs - hi.astype(jnp.float32)).astype(v.dtype)
        out = out + pltriton.dot(lo, v, precision=precision)
    return out


def attend_block(state, q, k, v, key_pos, kv_len, mask, *, sm_scale: float,
                 soft_cap: float | None, precision, split_probs: bool):
    """Fold one block of keys into the running (acc [rows, D], max [rows], sum [rows]) of the
    rows of q (P.V as probs_dot_values).

    Keys at or past kv_len may be poisoned (NaN in never-written slots), so their values are
    zeroed before the P.V product; their logits are masked by `mask`."""
    acc, m_prev, l_prev = state
    v = jnp.where((key_pos < kv_len)[:, None], v, jnp.zeros_like(v))
    logits = pltriton.dot(q, k, trans_b=True, precision=precision) * sm_scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask, logits, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    probs = jnp.where(mask, jnp.exp(logits - m_new[:, None]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(probs, axis=1)
    acc = alpha[:, None] * acc + probs_dot_values(probs, v, precision=precision,
                                                  split_probs=split_probs)
    return acc, m_new, l_new


def attend_pages(q, kv_ref, pages_ref, seq, head, kv_len, block_lo, block_hi, block_mask, *,
                 pages_per_block: int, num_pages: int, sm_scale: float,
                 soft_cap: float | None, precision, split_probs: bool):
    """The online softmax of the rows of q [rows, D] over blocks [block_lo, block_hi) of
    sequence `seq`'s keys (kv head `head`; load_kv_block, then attend_block): float32
    (acc [rows, D], max [rows], sum [rows]). block_mask(key_pos) is the [rows, block keys]
    mask of the block whose keys stand at positions key_pos."""
    rows, head_dim = q.shape
    block_keys = pages_per_block * kv_ref.shape[1]
    key_in_block = lax.broadcasted_iota(jnp.int32, (block_keys,), 0)

    def one_block(block, state):
        k, v = load_kv_block(kv_ref, pages_ref, seq, block, head,
                             pages_per_block=pages_per_block, num_pages=num_pages,
                             dtype=q.dtype)
        key_pos = block * block_keys + key_in_block
        return attend_block(state, q, k, v, key_pos, kv_len, block_mask(key_pos),
                            sm_scale=sm_scale, soft_cap=soft_cap, precision=precision,
                            split_probs=split_probs)

    state = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    return lax.fori_loop(block_lo, block_hi, one_block, state)


def _decode_kernel(
    kv_lens_ref, pages_ref, q_ref, kv_ref, acc_ref, m_ref, l_ref,
    *, pages_per_block: int, num_splits: int, num_pages: int, sm_scale: float,
    sliding_window: int | None, soft_cap: float | None, precision, split_probs: bool,
):  # fmt: skip
    rows = q_ref.shape[0]
    page_size = kv_ref.shape[1]
    block_keys = pages_per_block * page_size
    seq, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_len = kv_lens_ref[seq]  # 0 for sequences without a query token
    pos = kv_len - 1
    block_hi = pl.cdiv(pl.cdiv(kv_len, page_size), pages_per_block)
    block_lo = jnp.int32(0)
    if sliding_window is not None:
        block_lo = jnp.maximum(pos - sliding_window + 1, 0) // block_keys
    chunk = pl.cdiv(block_hi - block_lo, num_splits)
    lo = jnp.minimum(block_lo + split * chunk, block_hi)
    hi = jnp.minimum(lo + chunk, block_hi)

    def block_mask(key_pos):
        live = key_pos < kv_len
        if sliding_window is not None:
            live = live & (key_pos > pos - sliding_window)
        return jnp.broadcast_to(live[None, :], (rows, block_keys))

    acc, m, l_sum = attend_pages(
        q_ref[...], kv_ref, pages_ref, seq, head, kv_len, lo, hi, block_mask,
        pages_per_block=pages_per_block, num_pages=num_pages, sm_scale=sm_scale,
        soft_cap=soft_cap, precision=precision, split_probs=split_probs)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l_sum


def merge_splits(acc: jax.Array, m: jax.Array, l_sum: jax.Array) -> jax.Array:
    """Combine per-split online-softmax partials: [K, ..., D], [K, ...], [K, ...] -> [..., D]
    (rows that saw no key come out 0)."""
    m_all = jnp.max(m, axis=0)
    weight = jnp.exp(m - m_all[None])
    denom = jnp.sum(weight * l_sum, axis=0)
    num = jnp.sum(weight[..., None] * acc, axis=0)
    return num / jnp.where(denom > 0, denom, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=(
    "rows", "pages_per_block", "sm_scale", "sliding_window", "soft_cap", "precision",
    "split_probs", "interpret"))
def decode_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    *,
    rows: int,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    precision,
    split_probs: bool,
    interpret: bool,
) -> jax.Array:
    """One query token per sequence over its pages: q [S, Hq, D] (in the compute dtype),
    kv_lens [S] (0: the sequence has no token this step, its row comes out 0), page_indices
    [S, P] with P a multiple of pages_per_block. Returns float32 [S, Hq, D]."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_pages, _, two_hkv, _ = kv_cache.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    q_rows = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    num_splits = gpu_decode_splits(num_seqs, num_kv_heads,
                                   page_indices.shape[1] // pages_per_block)
    kernel = functools.partial(
        _decode_kernel, pages_per_block=pages_per_block, num_splits=num_splits,
        num_pages=num_pages, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap, precision=precision, split_probs=split_probs,
    )  # fmt: skip
    whole = pl.no_block_spec  # whole array in global memory; indexed in the kernel
    parts = (num_splits, num_seqs, num_kv_heads, rows)
    acc, m, l_sum = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        in_specs=[whole, whole,
                  pl.BlockSpec((None, None, rows, head_dim), lambda s, h, k: (s, h, 0, 0)),
                  whole],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, k: (k, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, k: (k, s, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, k: (k, s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*parts, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(parts, jnp.float32),
            jax.ShapeDtypeStruct(parts, jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(
            num_warps=gpu_num_warps(rows, head_dim), num_stages=gpu_num_stages()),
        interpret=interpret,
        name="jaxllm_paged_decode_gpu",
    )(kv_lens, page_indices, q_rows, kv_cache)
    out = merge_splits(acc, m, l_sum)[:, :, :group]  # [S, Hkv, G, D]
    return out.reshape(num_seqs, num_q_heads, head_dim)
