"""jaxllm's own ragged paged attention as a Pallas Mosaic TPU kernel (attention_impl="tpu_own").

TPUs serve on JAX's tuned kernel by default (jax_tpu.py); this one stays selectable to compare
against it and serves the shapes that kernel refuses (see docs/architecture.md).

Grid: one step per block of consecutive query tokens (all query heads of a KV head folded into
the rows: rows = tokens x queries_per_kv, laid out [Hkv, T*G, D]). Page tables, lengths and
the first/last sequence touching each block are scalar-prefetched into SMEM. A step walks the
sequences its tokens belong to; for each, it streams just the pages its tokens can see (causal
end, sliding-window start) from HBM into a two-slot VMEM buffer with async DMA, computing on one
slot while the next page is in flight, and folds every page into an online softmax per row.
A page holds all KV heads, so one DMA per page serves every head.

The new K/V are written before the kernel by the backend wrapper's shared XLA scatter
(ragged_layout.write_new_kv), in place on a donated cache; the kernel sees them like any
cached token.

Tested on CPU in TPU interpret mode (pltpu.InterpretParams); the interpreter supports the DMA
and semaphore primitives used here. Known limits (no TPU was available to tune): one page per
DMA, the double buffer restarts at each sequence boundary, m/l scratch is one lane wide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels.block_sizes import tpu_query_block
from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.pallas_common import (
    MASK_VALUE,
    fold_query_rows,
    online_softmax_update,
    query_blocks,
    unfold_query_rows,
)


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref, pages_ref, cu_ref, seq_lo_ref, seq_hi_ref,
    # inputs / outputs
    q_ref, kv_hbm_ref, o_ref,
    # scratch
    kv_buf, sems, m_ref, l_ref, acc_ref,
    *, block: int, group: int, pages_per_seq: int, num_pages: int,
    sm_scale: float, sliding_window: int | None, soft_cap: float | None,
):  # fmt: skip
    num_kv_heads, rows, _ = q_ref.shape
    page_size = kv_buf.shape[1]
    i = pl.program_id(0)
    block_start = i * block
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    row_token = block_start + lax.broadcasted_iota(jnp.int32, (rows, page_size), 0) // group
    key_slot = lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)

    def copy(seq, page_col, slot):
        page = jnp.clip(pages_ref[seq * pages_per_seq + page_col], 0, num_pages - 1)
        return pltpu.make_async_copy(kv_hbm_ref.at[page], kv_buf.at[slot], sems.at[slot])

    def one_sequence(seq, carry):
        q_start, q_end, kv_len = cu_ref[seq], cu_ref[seq + 1], kv_lens_ref[seq]
        first_pos = kv_len - (q_end - q_start)
        rows_lo = jnp.maximum(q_start, block_start)
        rows_hi = jnp.minimum(q_end, block_start + block)
        lowest_pos = first_pos + rows_lo - q_start
        highest_pos = first_pos + rows_hi - 1 - q_start
        page_lo = 0
        if sliding_window is not None:
            page_lo = jnp.maximum(lowest_pos - sliding_window + 1, 0) // page_size
        page_hi = jnp.where(rows_hi > rows_lo, highest_pos // page_size + 1, page_lo)
        page_hi = jnp.minimum(page_hi, pages_per_seq)
        in_seq = (row_token >= q_start) & (row_token < q_end)
        q_pos = first_pos + row_token - q_start

        @pl.when(page_lo < page_hi)
        def _():
            copy(seq, page_lo, 0).start()

        def one_page(page_col, carry):
            slot = (page_col - page_lo) % 2
            copy(seq, page_col, slot).wait()

            @pl.when(page_col + 1 < page_hi)
            def _():
                copy(seq, page_col + 1, 1 - slot).start()

            key_pos = page_col * page_size + key_slot
            mask = in_seq & (key_pos <= q_pos)
            if sliding_window is not None:
                mask = mask & (key_pos > q_pos - sliding_window)
            key_real = (page_col * page_size + key_slot[0]) < kv_len  # [page_size]
            for h in range(num_kv_heads):
                k = kv_buf[slot, :, 2 * h, :].astype(jnp.float32)
                v = kv_buf[slot, :, 2 * h + 1, :].astype(jnp.float32)
                v = jnp.where(key_real[:, None], v, 0.0)  # slots past kv_len may be garbage
                q = q_ref[h].astype(jnp.float32) * sm_scale
                logits = lax.dot_general(
                    q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
                if soft_cap is not None:
                    logits = soft_cap * jnp.tanh(logits / soft_cap)
                acc_ref[h], m_ref[h], l_ref[h] = online_softmax_update(
                    (acc_ref[h], m_ref[h], l_ref[h]), logits, mask, v,
                    functools.partial(jnp.dot, preferred_element_type=jnp.float32),
                    keepdims=True,
                )  # fmt: skip
            return carry

        return lax.fori_loop(page_lo, page_hi, one_page, carry)

    lax.fori_loop(seq_lo_ref[i], seq_hi_ref[i], one_sequence, 0)
    denom = l_ref[...]
    out = acc_ref[...] / jnp.where(denom > 0, denom, 1.0)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret"))
def ragged_paged_attention_tpu(
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
    pages_per_seq = md.page_indices.shape[1]

    block = tpu_query_block(num_tokens, group)
    num_blocks, seq_lo, seq_hi = query_blocks(md, num_tokens, block)
    padded = num_blocks * block
    q_rows = fold_query_rows(q, num_kv_heads, padded, group)

    rows = block * group
    kernel = functools.partial(
        _kernel, block=block, group=group, pages_per_seq=pages_per_seq, num_pages=num_pages,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(num_blocks,),
        in_specs=[
            pl.BlockSpec((num_kv_heads, rows, head_dim), lambda i, *_: (0, i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((num_kv_heads, rows, head_dim), lambda i, *_: (0, i, 0)),
        scratch_shapes=[
            pltpu.VMEM((2, page_size, two_hkv, head_dim), kv_cache.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_kv_heads, padded * group, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxllm_ragged_paged_attention",
    )(
        md.kv_lens, md.page_indices.reshape(-1), md.cu_q_lens, seq_lo, seq_hi, q_rows, kv_cache,
    )  # fmt: skip
    return unfold_query_rows(out, num_tokens, group, group)
