"""Ragged paged attention on NVIDIA GPUs: the "gpu" backend's entry point, and the first kernel.

`ragged_paged_attention_gpu` runs the paged decode + prefill kernels (gpu_paged.py: a decode
grid of (sequence, kv head, kv split) and prefill blocks of one sequence each; issue 18). They
have interpret-mode tests only: their first hardware run is owed (docs/architecture.md, "What
runs on GPU"). `query_block_attention_gpu` below is the first kernel, the one the recorded H200
run measured (97 GB/s of KV read at decode 64 x 2048): kept as the comparison point
(benchmarks/attention_bench.py --impl gpu,gpu_query_blocks) and as the one-line fallback.

Why Triton and not Mosaic GPU: CI has no GPU, so the kernel must be checked in interpret mode
on CPU. With the installed JAX, Triton-backend kernels interpret faithfully (jax's own Triton
paged attention matches its reference there), while Mosaic GPU's GMEM->SMEM copies with
barriers and wgmma fail or give wrong results under interpret. The Triton backend is deprecated
from JAX 0.11; a Hopper Mosaic GPU path is the follow-up once hardware runs are possible.

First kernel's status: the default on NVIDIA GPUs until the paged kernels. Float32 inputs
are multiplied at full float32 precision (precision=HIGHEST: IEEE dots, no TF32); bfloat16
inputs keep the default (TF32 on the float32-widened values, exact for bfloat16 operands).

Grid: (query blocks, kv heads, kv splits). A program owns `block` consecutive tokens x the
query heads of one KV head (padded to a power of two, as Triton block shapes must be), walks
the sequences those tokens belong to and, for each, its share (split) of the pages the tokens
can see, keeping an online softmax per row. Split-KV lets long decode contexts fill the SMs;
the splits' partial (acc, max, sum) are merged afterwards in XLA. New K/V are written first by
the backend wrapper's shared XLA scatter (ragged_layout.write_new_kv).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxllm.kernels.block_sizes import gpu_kv_splits, gpu_query_block
from jaxllm.kernels.gpu_paged import paged_attention_gpu
from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.pallas_common import (
    MASK_VALUE,
    fold_query_rows,
    next_pow2,
    online_softmax_update,
    query_blocks,
    unfold_query_rows,
)


def _kernel(
    kv_lens_ref, pages_ref, cu_ref, seq_lo_ref, seq_hi_ref, q_ref, kv_ref,
    acc_out_ref, m_out_ref, l_out_ref,
    *, block: int, group_padded: int, num_splits: int, num_pages: int,
    sm_scale: float, sliding_window: int | None, soft_cap: float | None,
    precision: lax.Precision | None,
):  # fmt: skip
    rows, head_dim = q_ref.shape
    page_size = kv_ref.shape[1]
    i, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_start = i * block
    q = q_ref[...].astype(jnp.float32) * sm_scale
    row_token = block_start + lax.broadcasted_iota(jnp.int32, (rows, page_size), 0) // group_padded
    key_slot = lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
    slot_1d = lax.broadcasted_iota(jnp.int32, (page_size,), 0)

    def one_sequence(seq, state):
        q_start, q_end, kv_len = cu_ref[seq], cu_ref[seq + 1], kv_lens_ref[seq]
        first_pos = kv_len - (q_end - q_start)
        rows_lo = jnp.maximum(q_start, block_start)
        rows_hi = jnp.minimum(q_end, block_start + block)
        page_lo = jnp.int32(0)
        if sliding_window is not None:
            lowest_pos = first_pos + rows_lo - q_start
            page_lo = jnp.maximum(lowest_pos - sliding_window + 1, 0) // page_size
        highest_pos = first_pos + rows_hi - 1 - q_start
        page_hi = jnp.where(rows_hi > rows_lo, highest_pos // page_size + 1, page_lo)
        chunk = (page_hi - page_lo + num_splits - 1) // num_splits
        split_lo = jnp.minimum(page_lo + split * chunk, page_hi)
        split_hi = jnp.minimum(split_lo + chunk, page_hi)
        in_seq = (row_token >= q_start) & (row_token < q_end)
        q_pos = first_pos + row_token - q_start

        def one_page(page_col, state):
            page = jnp.clip(pages_ref[seq, page_col], 0, num_pages - 1)
            k = kv_ref[page, :, 2 * h, :].astype(jnp.float32)
            v = kv_ref[page, :, 2 * h + 1, :].astype(jnp.float32)
            v = jnp.where((page_col * page_size + slot_1d < kv_len)[:, None], v, 0.0)
            logits = pltriton.dot(q, k, trans_b=True, precision=precision)
            if soft_cap is not None:
                logits = soft_cap * jnp.tanh(logits / soft_cap)
            key_pos = page_col * page_size + key_slot
            mask = in_seq & (key_pos <= q_pos)
            if sliding_window is not None:
                mask = mask & (key_pos > q_pos - sliding_window)
            return online_softmax_update(
                state, logits, mask, v,
                functools.partial(pltriton.dot, precision=precision), keepdims=False,
            )  # fmt: skip

        return lax.fori_loop(split_lo, split_hi, one_page, state)

    state = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l_sum = lax.fori_loop(seq_lo_ref[i], seq_hi_ref[i], one_sequence, state)
    acc_out_ref[...] = acc
    m_out_ref[...] = m
    l_out_ref[...] = l_sum


def _merge_splits(acc: jax.Array, m: jax.Array, l_sum: jax.Array) -> jax.Array:
    """Combine per-split online-softmax partials: [K, ..., D], [K, ...], [K, ...] -> [..., D]."""
    m_all = jnp.max(m, axis=0)
    weight = jnp.exp(m - m_all[None])
    denom = jnp.sum(weight * l_sum, axis=0)
    num = jnp.sum(weight[..., None] * acc, axis=0)
    return num / jnp.where(denom > 0, denom, 1.0)[..., None]


def dot_precision(dtype) -> lax.Precision | None:
    """HIGHEST (IEEE float32 dots, no TF32) for float32 inputs; None (the fast default) else."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def ragged_paged_attention_gpu(
    q: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attend q over a cache that already holds the new K/V (gpu_paged.paged_attention_gpu).
    Inputs are assumed validated. Returns out [T, Hq, D] in q's dtype."""
    return paged_attention_gpu(q, kv_cache, md, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap,
                               interpret=interpret)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret"))
def query_block_attention_gpu(
    q: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attend q over a cache that already holds the new K/V; md prepared (its token layout
    set). Inputs are assumed validated. Returns out [T, Hq, D] in q's dtype."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_cache.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    for name, size in (("head_dim", head_dim), ("page_size", page_size)):
        if size & (size - 1):
            raise ValueError(f"the GPU kernel needs a power-of-two {name}, got {size}")
    group_padded = next_pow2(group)
    # Full precision when either side is float32 (a float32 cache or float32 queries).
    full = jnp.float32 in (jnp.dtype(q.dtype), jnp.dtype(kv_cache.dtype))

    block = gpu_query_block(num_tokens, group_padded)
    num_splits = gpu_kv_splits(md.page_indices.shape[1])
    num_blocks, seq_lo, seq_hi = query_blocks(md, num_tokens, block)
    padded = num_blocks * block
    q_rows = fold_query_rows(q, num_kv_heads, padded, group_padded)

    rows = block * group_padded
    kernel = functools.partial(
        _kernel, block=block, group_padded=group_padded, num_splits=num_splits,
        num_pages=num_pages, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap, precision=dot_precision(jnp.float32 if full else jnp.bfloat16),
    )  # fmt: skip
    whole = pl.no_block_spec  # whole array in global memory; indexed in the kernel
    total_rows = padded * group_padded
    acc, m, l_sum = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads, num_splits),
        in_specs=[whole] * 5
        + [pl.BlockSpec((None, rows, head_dim), lambda i, h, k: (h, i, 0)), whole],
        out_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda i, h, k: (k, h, i, 0)),
            pl.BlockSpec((None, None, rows), lambda i, h, k: (k, h, i)),
            pl.BlockSpec((None, None, rows), lambda i, h, k: (k, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, num_kv_heads, total_rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, num_kv_heads, total_rows), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, num_kv_heads, total_rows), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxllm_ragged_paged_attention_gpu",
    )(md.kv_lens, md.page_indices, md.cu_q_lens, seq_lo, seq_hi, q_rows, kv_cache)
    out = _merge_splits(acc, m, l_sum).astype(q.dtype)
    return unfold_query_rows(out, num_tokens, group, group_padded)
