"""Up-front checks of ragged paged attention inputs, so bad calls fail with a readable ValueError.

Only static properties (ranks, shapes, dtypes, option ranges) are checked: the functions run under
jit, where the values of kv_lens / page_indices / cu_q_lens are not known.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MIN_PAGE_SIZE = 2
MAX_PAGE_SIZE = 256


def _shape(name: str, x: Any) -> tuple[int, ...]:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape)


def _check_int32(name: str, x: Any) -> None:
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"{name} must be int32, got {x.dtype}")


def validate_inputs(
    q: Any,
    k_new: Any,
    v_new: Any,
    kv_cache: Any,
    kv_lens: Any,
    page_indices: Any,
    cu_q_lens: Any,
    num_seqs: Any,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    """Raise ValueError describing the first inconsistency among the attention inputs."""
    q_shape = _shape("q", q)
    if len(q_shape) != 3:
        raise ValueError(f"q must have rank 3 [T, Hq, D], got shape {q_shape}")
    num_tokens, num_q_heads, head_dim = q_shape
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        shape = _shape(name, x)
        if len(shape) != 3:
            raise ValueError(f"{name} must have rank 3 [T, Hkv, D], got shape {shape}")
    if tuple(k_new.shape) != tuple(v_new.shape):
        raise ValueError(f"k_new {k_new.shape} and v_new {v_new.shape} must have the same shape")
    t_kv, num_kv_heads, d_kv = k_new.shape
    if t_kv != num_tokens:
        raise ValueError(f"k_new/v_new have {t_kv} tokens but q has {num_tokens}")
    if d_kv != head_dim:
        raise ValueError(f"k_new/v_new head_dim {d_kv} != q head_dim {head_dim}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})"
        )
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")

    cache_shape = _shape("kv_cache", kv_cache)
    if len(cache_shape) != 4:
        raise ValueError(
            f"kv_cache must have rank 4 [num_pages, page_size, 2*Hkv, D], got {cache_shape}"
        )
    num_pages, page_size, cache_heads, cache_dim = cache_shape
    # A backend's layout may pad the kv heads and head_dim (kernels/kv_layout.py).
    if cache_heads < 2 * num_kv_heads or cache_heads % 2 or cache_dim < head_dim:
        raise ValueError(
            f"kv_cache last dims {(cache_heads, cache_dim)} must be (2*Hkv, D) = "
            f"{(2 * num_kv_heads, head_dim)}, or padded to more heads / a longer head_dim"
        )
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(
            f"page_size must be in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}], got {page_size}"
        )
    if num_pages < 1:
        raise ValueError("kv_cache must have at least one page")

    for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new), ("kv_cache", kv_cache)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be float32 or bfloat16, got {x.dtype}")
    if jnp.dtype(k_new.dtype) != jnp.dtype(kv_cache.dtype) or jnp.dtype(v_new.dtype) != jnp.dtype(
        kv_cache.dtype
    ):
        raise ValueError(
            f"k_new/v_new dtype ({k_new.dtype}/{v_new.dtype}) must equal kv_cache dtype "
            f"({kv_cache.dtype})"
        )

    lens_shape = _shape("kv_lens", kv_lens)
    if len(lens_shape) != 1:
        raise ValueError(f"kv_lens must have rank 1 [S], got shape {lens_shape}")
    max_seqs = lens_shape[0]
    pi_shape = _shape("page_indices", page_indices)
    if len(pi_shape) != 2 or pi_shape[0] != max_seqs or pi_shape[1] < 1:
        raise ValueError(f"page_indices must have shape [S={max_seqs}, P>=1], got {pi_shape}")
    cu_shape = _shape("cu_q_lens", cu_q_lens)
    if cu_shape != (max_seqs + 1,):
        raise ValueError(f"cu_q_lens must have shape [S+1] = ({max_seqs + 1},), got {cu_shape}")
    ns_shape = _shape("num_seqs", num_seqs)
    if ns_shape not in ((), (1,)):
        raise ValueError(f"num_seqs must be a scalar or shape [1], got {ns_shape}")
    for name, x in (
        ("kv_lens", kv_lens),
        ("page_indices", page_indices),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
    ):
        _check_int32(name, x)

    if not isinstance(sm_scale, int | float) or not sm_scale > 0:
        raise ValueError(f"sm_scale must be a positive float, got {sm_scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if soft_cap is not None and (not isinstance(soft_cap, int | float) or not soft_cap > 0):
        raise ValueError(f"soft_cap must be None or a positive float, got {soft_cap!r}")
