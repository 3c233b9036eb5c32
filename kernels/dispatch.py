"""Choose and run one ragged paged attention implementation.

Default by backend: TPU -> Pallas TPU kernel; CPU -> the native C++ kernel (the pure-JAX
"cpu" impl where it cannot be built); GPU -> reference, because the
Pallas GPU kernel becomes a default only after a passing on-hardware run is recorded in
benchmarks/RESULTS.md and none is yet (force it with impl="gpu"). Forcing a kernel on a backend
that cannot compile it (CPU) runs it in Pallas interpret mode.
"""

from __future__ import annotations

import jax

from jaxllm.kernels.cpu import ragged_paged_attention_cpu
from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.reference import ragged_paged_attention_reference
from jaxllm.kernels.validation import validate_inputs

IMPLEMENTATIONS = ("reference", "cpu", "cpu_native", "tpu", "gpu")


def default_impl(backend: str | None = None) -> str:
    """Implementation used when impl=None on the given (or default) JAX backend."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        # The native kernel (C++ through the XLA FFI, built on first use) reads pages in place:
        # the batch-32 decode step 1.6x faster than the "cpu" impl's (benchmarks/RESULTS.md).
        # Without a working C++ compiler, the pure-JAX "cpu" impl (1.34x the reference's).
        from jaxllm.kernels.native_build import native_attention_available

        return "cpu_native" if native_attention_available() else "cpu"
    # TPU and GPU: a Pallas kernel becomes the default only after a passing run on that
    # hardware is recorded in benchmarks/RESULTS.md. None is yet, so the reference serves.
    return "reference"


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
    the full contract.
    """
    validate_inputs(
        q, k_new, v_new, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    impl = impl or default_impl()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS} or None, got {impl!r}")
    args = (q, k_new, v_new, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    opts = dict(sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, **opts)
    if impl == "cpu":
        return ragged_paged_attention_cpu(*args, **opts)
    if impl == "cpu_native":
        if jax.default_backend() != "cpu":
            raise ValueError(f"impl='cpu_native' runs on the CPU backend only, not "
                             f"{jax.default_backend()!r}")
        # Native C++ kernel via the XLA FFI (CPU only); built on first use (native_build.py).
        from jaxllm.kernels.cpu_native import ragged_paged_attention_cpu_native

        return ragged_paged_attention_cpu_native(*args, **opts)
    backend = jax.default_backend()
    if impl == "tpu":
        from jaxllm.kernels.tpu import ragged_paged_attention_tpu

        return ragged_paged_attention_tpu(*args, **opts, interpret=backend != "tpu")
    from jaxllm.kernels.gpu import ragged_paged_attention_gpu

    return ragged_paged_attention_gpu(*args, **opts, interpret=backend not in ("gpu", "cuda"))


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
    """ragged_paged_attention with the step's page tables and lengths taken from `md`. The new
    K/V are stored in the cache's dtype (EngineConfig.kv_cache_dtype may differ from the
    model's)."""
    k_new, v_new = k_new.astype(kv_cache.dtype), v_new.astype(kv_cache.dtype)
    return ragged_paged_attention(
        q, k_new, v_new, kv_cache, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, impl=impl,
    )  # fmt: skip
