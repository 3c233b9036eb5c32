"""Ragged paged attention as a Pallas Mosaic TPU kernel.

Grid: one step per block of consecutive query tokens (all query heads of a KV head folded into
the rows: rows = tokens x queries_per_kv, laid out [Hkv, T*G, D]). Page tables, lengths and
the first/last sequence touching each block are scalar-prefetched into SMEM. A step walks the
sequences its tokens belong to; for each, it streams just the pages its tokens can see (causal
end, sliding-window start) from HBM into a two-slot VMEM buffer with async DMA, computing on one
slot while the next page is in flight, and folds every page into an online softmax per row.
A page holds all KV heads, so one DMA per page serves every head.

The new K/V are written before the kernel by the shared XLA scatter (ragged_layout.write_new_kv),
which runs in place on a donated cache; the kernel then sees them like any cached token.

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
from jaxllm.kernels.ragged_layout import (
    block_sequence_ranges,
    scalar_num_seqs,
    token_layout,
    write_new_kv,
)

_MASK_VALUE = -1e30


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
    m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
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
                logits = jnp.where(mask, logits, _MASK_VALUE)
                m_prev = m_ref[h]
                m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
                probs = jnp.where(mask, jnp.exp(logits - m_new), 0.0)
                alpha = jnp.exp(m_prev - m_new)
                l_ref[h] = alpha * l_ref[h] + jnp.sum(probs, axis=1, keepdims=True)
                acc_ref[h] = alpha * acc_ref[h] + jnp.dot(
                    probs, v, preferred_element_type=jnp.float32
                )
                m_ref[h] = m_new
            return carry

        return lax.fori_loop(page_lo, page_hi, one_page, carry)

    lax.fori_loop(seq_lo_ref[i], seq_hi_ref[i], one_sequence, 0)
    denom = l_ref[...]
    out = acc_ref[...] / jnp.where(denom > 0, denom, 1.0)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret"))
def ragged_paged_attention_tpu(
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
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Write the new K/V, then run the TPU kernel. Inputs are assumed validated."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_cache.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    pages_per_seq = page_indices.shape[1]

    layout = token_layout(num_tokens, kv_lens, cu_q_lens, num_seqs)
    kv_cache = write_new_kv(kv_cache, k_new, v_new, page_indices, layout)

    block = tpu_query_block(num_tokens, group)
    num_blocks = -(-num_tokens // block)
    padded = num_blocks * block
    num_valid = cu_q_lens[jnp.clip(scalar_num_seqs(num_seqs), 0, kv_lens.shape[0])]
    seq_lo, seq_hi = block_sequence_ranges(layout.seq_ids, num_valid, num_blocks, block)

    q_rows = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q_rows = jnp.pad(q_rows, ((0, padded - num_tokens), (0, 0), (0, 0), (0, 0)))
    q_rows = q_rows.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded * group, head_dim)

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
        kv_lens, page_indices.reshape(-1), cu_q_lens, seq_lo, seq_hi, q_rows, kv_cache,
    )  # fmt: skip
    out = out.reshape(num_kv_heads, padded, group, head_dim).transpose(1, 0, 2, 3)
    return out[:num_tokens].reshape(num_tokens, num_q_heads, head_dim), kv_cache
