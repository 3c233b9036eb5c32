"""Device arrays of the paged KV cache: sizes and allocation.

One array per layer, shaped [num_pages, page_size, 2 * num_kv_heads, head_dim]: K of kv-head h
at index 2h and V at 2h+1 (the layout `jaxllm.kernels` reads and writes), as the attention
backend's layout asks: JAX's TPU kernel's pads kv heads and head_dim with zeros
(jaxllm.kernels.kv_layout). `backend=None` means the platform's default backend. Page 0 is
the null page that padded page-table entries point at; the allocator never hands it out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.kernels import AttentionBackend, get_backend


def kv_cache_shape(model_config: ModelConfig, num_pages: int, page_size: int,
                   dtype: jnp.dtype | str = jnp.float32,
                   backend: AttentionBackend | None = None, head_shards: int = 1
                   ) -> tuple[int, ...]:
    """One layer's cache shape in `backend`'s layout (head_shards: the tensor-parallel size
    the head axis is split over; a layout pads heads per shard)."""
    backend = backend or get_backend()
    return backend.kv_cache_shape(num_pages, page_size, model_config.num_kv_heads,
                                  model_config.head_dim, dtype, head_shards)


def bytes_per_page(model_config: ModelConfig, page_size: int, dtype: jnp.dtype | str,
                   backend: AttentionBackend | None = None, head_shards: int = 1) -> int:
    """Bytes one page costs across all layers: layers * page_size * 2 * Hkv * head_dim *
    itemsize (with the backend layout's padded heads / head_dim)."""
    _, _, heads, head_dim = kv_cache_shape(model_config, 1, page_size, dtype, backend,
                                           head_shards)
    return model_config.num_layers * page_size * heads * head_dim * np.dtype(dtype).itemsize


def pages_for_budget(
    model_config: ModelConfig, page_size: int, dtype: jnp.dtype | str, budget_bytes: int,
    backend: AttentionBackend | None = None, head_shards: int = 1,
) -> int:
    """How many pages (null page included) fit in budget_bytes; at least 2 or ValueError."""
    per_page = bytes_per_page(model_config, page_size, dtype, backend, head_shards)
    num_pages = int(budget_bytes) // per_page
    if num_pages < 2:
        raise ValueError(
            f"KV-cache budget of {budget_bytes} bytes holds {num_pages} pages of {per_page} bytes "
            f"(page_size {page_size}, {model_config.num_layers} layers, "
            f"{model_config.num_kv_heads} KV heads x {model_config.head_dim}, {np.dtype(dtype)}); "
            "need at least 2 (one is the null page)")
    return num_pages


def allocate_kv_caches(
    model_config: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype: jnp.dtype | str,
    sharding: jax.sharding.Sharding | None = None,
    backend: AttentionBackend | None = None,
    head_shards: int = 1,
) -> list[jax.Array]:
    """One zero-filled cache array per layer (placed with `sharding` when given) in
    `backend`'s layout (None: the platform's default backend)."""
    if num_pages < 2:
        raise ValueError(f"num_pages must be >= 2 (one is the null page), got {num_pages}")
    backend = backend or get_backend()
    dtype = backend.kv_cache_dtype(dtype)
    shape = kv_cache_shape(model_config, num_pages, page_size, dtype, backend, head_shards)
    return [jnp.zeros(shape, dtype=dtype, device=sharding) for _ in range(model_config.num_layers)]
