"""Ragged paged attention on NVIDIA GPUs: a decode kernel and a prefill kernel, one entry point.

How a mixed ragged step splits. Which rows are decodes is known only on the device (cu_q_lens),
and the trace sees only shapes, so the split is by token role, not by sequence kind:
- gpu_decode.py attends the LAST query token of every sequence: a decode row is exactly that,
  and a prefill chunk's last token is its longest row. Grid (sequence, kv head, kv split), the
  G query heads of the kv head as the tile's rows, split-KV merged in one small pass.
- gpu_prefill.py attends every OTHER query token, in blocks of one sequence each (grid: query
  block, kv head). In a decode-only step it has no tokens: its programs exit at once.
Every real token is attended by exactly one of them; the outputs are stitched by scatter, and
padding tokens come out 0. Both kernels read the cache after the backend wrapper's write of the
new K/V (ragged_layout.write_new_kv), with the layout every backend shares ([pages, page_size,
2*Hkv, D], K of head h at 2h, V at 2h+1).

Precision: float32 when q or the cache is float32 (dots at HIGHEST: IEEE, no TF32); otherwise
bfloat16 tensor-core dots with float32 accumulation and softmax. P enters P.V as a bfloat16
hi + lo pair (two MMAs): the reference's accuracy, so bf16 results match it as closely as the
first kernel's did (flash attention's single bfloat16 P is ~2e-3 off in relative L2, the size of
the output's own rounding). Decode is memory-bound, so the second MMA is free there; whether
prefill should drop it (split_probs=False) is for the hardware run to say.

Coalescing by page size: a K (or V) row of one head is D contiguous elements (128 bytes at
D=64 bf16, 256 at D=128), rows of a page are 2*Hkv*D elements apart, so every page size reads
whole 128-byte lines; larger pages only mean fewer page-table reads and larger contiguous runs
per gathered block (block_sizes.gpu_pages_per_block keeps ~64-128 keys per load). To measure on
hardware: KV-read bandwidth of decode for page sizes 16/32/64/128 and pages per block, decode
rows 16 vs 32, num_stages 2-4, warps 4/8, the split target (block_sizes.GPU_TARGET_PROGRAMS).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxllm.kernels.block_sizes import (
    gpu_decode_rows,
    gpu_pages_per_block,
    gpu_prefill_query_block,
)
from jaxllm.kernels.gpu_decode import decode_attention
from jaxllm.kernels.gpu_prefill import prefill_attention
from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.ragged_layout import scalar_num_seqs


def compute_dtype(q_dtype, cache_dtype) -> tuple[jnp.dtype, lax.Precision | None]:
    """(operand dtype, dot precision): float32 at HIGHEST if either side is float32, else
    bfloat16 at the default (tensor-core) precision."""
    if jnp.float32 in (jnp.dtype(q_dtype), jnp.dtype(cache_dtype)):
        return jnp.dtype(jnp.float32), lax.Precision.HIGHEST
    return jnp.dtype(jnp.bfloat16), None


def last_tokens(md: AttentionMetadata, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """(token index [S], kv_len [S]) of each sequence's last query token; T and 0 for padding
    sequences and sequences without a token this step."""
    max_seqs = md.kv_lens.shape[0]
    n = jnp.clip(scalar_num_seqs(md.num_seqs), 0, max_seqs)
    has_token = (jnp.arange(max_seqs) < n) & (md.cu_q_lens[1:] > md.cu_q_lens[:-1])
    has_token = has_token & (md.cu_q_lens[1:] <= num_tokens)
    token = jnp.where(has_token, md.cu_q_lens[1:] - 1, num_tokens)
    return token.astype(jnp.int32), jnp.where(has_token, md.kv_lens, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "interpret", "pages_per_block", "split_probs"))
def paged_attention_gpu(
    q: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    pages_per_block: int | None = None,
    split_probs: bool = True,
) -> jax.Array:
    """Attend q [T, Hq, D] over a cache that already holds the step's new K/V; md as the
    engine builds it (its token layout is not needed). Inputs are assumed validated.
    pages_per_block overrides block_sizes.gpu_pages_per_block (hardware sweeps; tests that
    need several blocks and kv splits at tiny sizes); split_probs=False gives bfloat16 P.V one
    MMA instead of two (gpu_decode.probs_dot_values; to be measured on prefill). Returns out
    [T, Hq, D] in q's dtype, 0 for padding tokens."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, two_hkv, _ = kv_cache.shape
    group = num_q_heads // (two_hkv // 2)
    for name, size in (("head_dim", head_dim), ("page_size", page_size)):
        if size & (size - 1):
            raise ValueError(f"the GPU kernels need a power-of-two {name}, got {size}")
    dtype, precision = compute_dtype(q.dtype, kv_cache.dtype)
    pages_per_block = pages_per_block or gpu_pages_per_block(page_size, head_dim)
    width = md.page_indices.shape[1]
    pages = jnp.pad(md.page_indices, ((0, 0), (0, -width % pages_per_block)))
    opts = dict(pages_per_block=pages_per_block, sm_scale=sm_scale,
                sliding_window=sliding_window, soft_cap=soft_cap, precision=precision,
                split_probs=split_probs, interpret=interpret)
    q_in = q.astype(dtype)

    token, kv_len = last_tokens(md, num_tokens)
    q_last = jnp.concatenate([q_in, jnp.zeros((1, *q.shape[1:]), dtype)])[token]
    last = decode_attention(q_last, kv_cache, kv_len, pages, rows=gpu_decode_rows(group),
                            **opts)
    out = prefill_attention(q_in, kv_cache, md.kv_lens, pages, md.cu_q_lens, md.num_seqs,
                            block_q=gpu_prefill_query_block(group),
                            out_dtype=q.dtype, **opts)
    return out.at[token].set(last.astype(q.dtype), mode="drop")
