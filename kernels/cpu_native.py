"""Ragged paged attention on CPU through a native C++ kernel (kernels/native/paged_attention.cc).

XLA CPU spends most of a paged decode on the math over freshly gathered pages, not on the
bytes. The native kernel reads each sequence's K/V rows straight from the cache buffer with an
online softmax in float32, and blocks a prefill chunk's queries so each loaded page serves
several of them. It also writes the new K/V itself, into the cache it gets back aliased (in
place under a donated cache), at the slots ragged_layout.new_kv_slots computes: XLA CPU's
scatter into a bfloat16 cache converts the whole cache, so a bfloat16 cache only pays off
this way.

Same contract, masking and float32 math as kernels/reference.py, which stays its oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.native_build import register_native_attention
from jaxllm.kernels.ragged_layout import new_kv_slots


def ragged_paged_attention_cpu_native(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Write the new K/V into their pages, then attend natively; md prepared (its token
    layout set). Inputs are assumed validated.

    Raises native_build.NativeBuildError (at trace time) when the kernel cannot be built.
    """
    target = register_native_attention()
    slots = new_kv_slots(kv_cache.shape, md.page_indices, md.layout)
    call = jax.ffi.ffi_call(
        target,
        (jax.ShapeDtypeStruct(q.shape, jnp.float32),
         jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype)),
        input_output_aliases={4: 1},
    )
    out, kv_cache = call(
        q.astype(jnp.float32),
        k_new.astype(jnp.float32),  # rounded back to the cache's dtype by the kernel
        v_new.astype(jnp.float32),
        slots,
        kv_cache,
        md.kv_lens,
        md.page_indices,
        md.cu_q_lens,
        jnp.reshape(md.num_seqs, (1,)),
        sm_scale=np.float32(sm_scale),
        sliding_window=np.int64(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
    )
    return out.astype(q.dtype), kv_cache
