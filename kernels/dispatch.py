"""Run ragged paged attention through the backend registry (backends.py) by name.

`impl=None` picks the platform's default (backends.default_impl); a Pallas kernel forced on a
platform that cannot compile it runs in interpret mode.
"""

from __future__ import annotations

import jax

from jaxllm.kernels.backends import IMPLEMENTATIONS, default_impl, get_backend
from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.validation import validate_inputs

__all__ = [
    "IMPLEMENTATIONS",
    "default_impl",
    "get_backend",
    "ragged_paged_attention",
    "ragged_paged_attention_from_metadata",
]


def ragged_paged_attention(
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
    impl: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attend a flattened ragged batch over a paged cache, writing the new K/V first.

    Returns (out [T, Hq, D] in q's dtype, updated kv_cache). See the package docstring for
    the full contract. k_new / v_new must have the cache's dtype.
    """
    validate_inputs(
        q, k_new, v_new, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    md = AttentionMetadata(kv_lens, page_indices, cu_q_lens, num_seqs)
    return get_backend(impl)(q, k_new, v_new, kv_cache, md, sm_scale=sm_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap)


def ragged_paged_attention_from_metadata(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    impl: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """ragged_paged_attention with the step's page tables and lengths taken from `md` (prepared
    by the backend's prepare_metadata or not). The new K/V are stored in the cache's dtype
    (EngineConfig.kv_cache_dtype may differ from the model's)."""
    return get_backend(impl)(q, k_new, v_new, kv_cache, md, sm_scale=sm_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap)
