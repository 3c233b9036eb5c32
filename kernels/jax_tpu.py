"""TPU attention on JAX's own kernel: jax.experimental.pallas.ops.tpu.ragged_paged_attention.

Same contract and KV layout as ours ([pages, page_size, 2*Hkv, D], K and V interleaved on the
head axis; kv_lens, page_indices, cu_q_lens, num_seqs; sliding window, soft cap), with block
sizes JAX tunes per TPU generation (its table covers v5 and v6). Differences the wrapper
bridges:
- it does not write the new K/V: the backend wrapper scatters them into the cache first, as
  for every other kernel (ragged_layout.write_new_kv, in place on a donated cache);
- it leaves padding tokens' rows unwritten: they are zeroed from the token layout;
- it takes one dtype for q and the cache (Mosaic dots): q is cast to the cache's dtype;
- it needs head_dim a multiple of 128 and kv heads that fill TPU tiles: the backend's cache
  layout pads both (kv_layout.py); a cache that is not so padded runs on jaxllm's own kernel;
- its tuner refuses non-TPU devices: elsewhere explicit block sizes and TPU interpret mode.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

from jaxllm.kernels.kv_layout import tpu_tileable_kv_heads
from jaxllm.kernels.metadata import AttentionMetadata

HEAD_DIM_MULTIPLE = 128


def jax_kernel_accepts(num_kv_heads: int, head_dim: int, cache_dtype) -> bool:
    """Whether JAX's kernel takes a cache of num_kv_heads x head_dim at cache_dtype."""
    return (head_dim % HEAD_DIM_MULTIPLE == 0
            and tpu_tileable_kv_heads(num_kv_heads, cache_dtype) == num_kv_heads)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "block_sizes", "interpret"))
def ragged_paged_attention_jax_tpu(
    q: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_sizes: tuple[int, int] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attend q over a cache that already holds the new K/V (a layout jax_kernel_accepts);
    md prepared. block_sizes: (kv pages, queries) per block, None for JAX's tuned table (TPU
    only). interpret: run in TPU interpret mode (off a TPU)."""
    kv_blocks, q_blocks = block_sizes or (None, None)
    mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with mode:
        out = ragged_paged_attention(
            q.astype(kv_cache.dtype), kv_cache, md.kv_lens, md.page_indices, md.cu_q_lens,
            jnp.reshape(md.num_seqs, (1,)), sm_scale=sm_scale, sliding_window=sliding_window,
            soft_cap=soft_cap, num_kv_pages_per_block=kv_blocks, num_queries_per_block=q_blocks,
        )  # fmt: skip
    return jnp.where(md.layout.valid[:, None, None], out, 0).astype(q.dtype)
