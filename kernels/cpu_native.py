"""Ragged paged attention on CPU through a native C++ kernel (kernels/native/paged_attention.cc).

XLA CPU spends most of a paged decode on the math over freshly gathered pages, not on the
bytes. The native kernel reads each sequence's K/V rows straight from the cache buffer with an
online softmax in float32, and blocks a prefill chunk's queries so each loaded page serves
several of them. The new K/V are still written by XLA (ragged_layout.write_new_kv, in place
under a donated cache) before the custom call, which only reads the cache.

Same contract, masking and float32 math as kernels/reference.py, which stays its oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.native_build import register_native_attention
from jaxllm.kernels.ragged_layout import token_layout, write_new_kv


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def ragged_paged_attention_cpu_native(
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
) -> tuple[jax.Array, jax.Array]:
    """Write the new K/V into their pages, then attend natively. Inputs are assumed validated.

    Raises native_build.NativeBuildError (at trace time) when the kernel cannot be built.
    """
    target = register_native_attention()
    layout = token_layout(q.shape[0], kv_lens, cu_q_lens, num_seqs)
    kv_cache = write_new_kv(kv_cache, k_new, v_new, page_indices, layout)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(
        q.astype(jnp.float32),
        kv_cache,
        kv_lens,
        page_indices,
        cu_q_lens,
        jnp.reshape(num_seqs, (1,)),
        sm_scale=np.float32(sm_scale),
        sliding_window=np.int64(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
    )
    return out.astype(q.dtype), kv_cache
