"""How an attention backend lays out one layer's KV cache, and fitting a call to that layout.

Every backend stores [num_pages, page_size, 2 * Hkv', D'] with K of kv-head h at index 2h and V
at 2h+1. A backend may ask for padding: D' = head_dim rounded up to a multiple, Hkv' = the
fewest kv heads >= Hkv whose K/V axis a TPU tile takes whole (JAX's TPU kernel refuses other
head counts and head dims that are not multiples of 128). On a TPU the padding costs no HBM:
XLA tiles the two minor axes there to (8 or 16, 128) whatever their logical size.

Padded heads and lanes hold zeros (the new K/V are padded with zeros before they are written),
so they add nothing to any logit or output: `fit_to_cache` pads a call's q / k_new / v_new to
the cache it is given and returns how to cut the output back, which is why any backend can run
on any backend's cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllm.kernels.validation import SUPPORTED_DTYPES


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tpu_tileable_kv_heads(num_kv_heads: int, dtype) -> int:
    """Fewest kv heads >= num_kv_heads whose 2*Hkv K/V rows fill whole TPU sublane tiles at
    `dtype`'s packing (rows / packing in 1, 2, 4, 8 or a multiple of 8), JAX's kernel's rule."""
    packing = 4 // jnp.dtype(dtype).itemsize
    heads = num_kv_heads
    while True:
        rows = 2 * heads
        if rows % packing == 0 and (rows // packing in (1, 2, 4, 8) or (rows // packing) % 8 == 0):
            return heads
        heads += 1


@dataclass(frozen=True)
class KVCacheLayout:
    """A backend's cache layout rules.

    head_dim_multiple: D' = head_dim rounded up to this (1: unpadded).
    tpu_tiled_heads: pad the kv heads to tpu_tileable_kv_heads for the cache dtype.
    """

    head_dim_multiple: int = 1
    tpu_tiled_heads: bool = False

    def cache_dtype(self, dtype) -> jnp.dtype:
        """The cache dtype for a requested one: float32 or bfloat16, else ValueError."""
        dtype = jnp.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"KV-cache dtype must be float32 or bfloat16, got {dtype}")
        return dtype

    def shape(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
              dtype, head_shards: int = 1) -> tuple[int, int, int, int]:
        """[num_pages, page_size, 2 * Hkv', D'] for a model with num_kv_heads x head_dim.

        head_shards: devices the head axis is split over (tensor parallelism); heads are
        padded per shard, so each shard's slice holds its own heads first, then zeros."""
        dtype = self.cache_dtype(dtype)
        if num_kv_heads % head_shards:
            raise ValueError(f"{num_kv_heads} kv heads do not split over {head_shards} shards")
        heads = num_kv_heads // head_shards
        if self.tpu_tiled_heads:
            heads = tpu_tileable_kv_heads(heads, dtype)
        return (num_pages, page_size, 2 * heads * head_shards,
                _round_up(head_dim, self.head_dim_multiple))


def fit_to_cache(
    q: jax.Array, k_new: jax.Array, v_new: jax.Array, kv_cache: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, Callable[[jax.Array], jax.Array]]:
    """Zero-pad q [T, Hq, D] and k_new / v_new [T, Hkv, D] to the cache's kv heads and head
    dim (query heads padded per kv group, so head h still reads kv head h // group); returns
    them and the function taking an output [T, Hq', D'] back to [T, Hq, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    cache_heads, cache_dim = kv_cache.shape[2] // 2, kv_cache.shape[3]
    if (cache_heads, cache_dim) == (num_kv_heads, head_dim):
        return q, k_new, v_new, lambda out: out
    group = num_q_heads // num_kv_heads
    extra_heads, extra_dim = cache_heads - num_kv_heads, cache_dim - head_dim

    def pad_kv(x):
        return jnp.pad(x, ((0, 0), (0, extra_heads), (0, extra_dim)))

    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q4 = jnp.pad(q4, ((0, 0), (0, extra_heads), (0, 0), (0, extra_dim)))

    def unfit(out: jax.Array) -> jax.Array:
        out = out.reshape(num_tokens, cache_heads, group, cache_dim)[:, :num_kv_heads, :, :head_dim]
        return out.reshape(num_tokens, num_q_heads, head_dim)

    return q4.reshape(num_tokens, cache_heads * group, cache_dim), pad_kv(k_new), pad_kv(v_new), unfit
