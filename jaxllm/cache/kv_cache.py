"""Device arrays of the paged KV cache: sizes and allocation.

One array per layer, shaped [num_pages, page_size, 2 * num_kv_heads, head_dim]: K of kv-head h
at index 2h and V at 2h+1 (the layout `jaxllm.kernels` reads and writes). Page 0 is the null
page that padded page-table entries point at; the allocator never hands it out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig


def kv_cache_shape(model_config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (num_pages, page_size, 2 * model_config.num_kv_heads, model_config.head_dim)


def bytes_per_page(model_config: ModelConfig, page_size: int, dtype: jnp.dtype | str) -> int:
    """Bytes one page costs across all layers: layers * page_size * 2 * Hkv * head_dim * itemsize."""
    itemsize = np.dtype(dtype).itemsize
    return (model_config.num_layers * page_size * 2 * model_config.num_kv_heads
            * model_config.head_dim * itemsize)


def pages_for_budget(
    model_config: ModelConfig, page_size: int, dtype: jnp.dtype | str, budget_bytes: int
) -> int:
    """How many pages (null page included) fit in budget_bytes; at least 2 or ValueError."""
    per_page = bytes_per_page(model_config, page_size, dtype)
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
) -> list[jax.Array]:
    """One zero-filled cache array per layer (placed with `sharding` when given)."""
    if num_pages < 2:
        raise ValueError(f"num_pages must be >= 2 (one is the null page), got {num_pages}")
    shape = kv_cache_shape(model_config, num_pages, page_size)
    return [jnp.zeros(shape, dtype=dtype, device=sharding) for _ in range(model_config.num_layers)]
