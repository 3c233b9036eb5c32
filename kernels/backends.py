"""The attention-backend registry: one class per ragged paged attention implementation.

A backend declares the platforms it compiles for, its KV-cache layout (kv_layout.py) and a
per-step metadata builder; its call runs the steps every implementation shares once:

    validate -> prepare metadata (if the runner has not) -> fit q/k/v to the cache's layout
    -> write the new K/V into their pages -> the backend's `attend` -> cut the output back.

The runner calls `prepare_metadata` once per step inside its jitted step, before the layers,
so the per-token layout (ragged_layout.token_layout) is computed once, not once per layer.

Defaults per platform (`default_impl`):
- CPU: "cpu_native" (the C++ kernel: the batch-32 decode step 1.6x faster than "cpu"'s,
  benchmarks/RESULTS.md), or "cpu" (pure JAX, 1.34x the reference's) without a C++ compiler.
- NVIDIA GPU: "gpu", the Pallas Triton query-block kernel (gpu.query_block_attention_gpu):
  the first hardware run (one H200, 2026-12-04, ../shared/MEASURING.md "GPU: the first
  hardware run") measured it 7.8x the reference on prefill attention (0.36 vs 2.82 ms, 4 x 512
  tokens over 512 cached) and a batch-256 decode step of a 1B-shaped model at 5.87 ms against
  the reference's 18.65 ms. "gpu_paged" (gpu_paged.py: decode over (sequence, kv head, split)
  + prefill blocks of one sequence, built for HBM speed) is tested in interpret mode only: it
  becomes the default once a hardware run is recorded (docs/architecture.md lists it).
- TPU: "tpu", JAX's own tuned kernel (jax_tpu.py); "tpu_own" is jaxllm's kernel (tpu.py).
- anything else: "reference".
A Pallas backend forced on a platform it does not compile for runs in interpret mode.
"""

from __future__ import annotations

import functools
import logging
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxllm.kernels.block_sizes import jax_tpu_blocks_off_tpu
from jaxllm.kernels.kv_layout import KVCacheLayout, fit_to_cache
from jaxllm.kernels.metadata import AttentionMetadata, with_token_layout
from jaxllm.kernels.ragged_layout import write_new_kv
from jaxllm.kernels.validation import validate_inputs

logger = logging.getLogger(__name__)

GPU_PLATFORMS = ("gpu", "cuda")


class AttentionBackend:
    """One implementation. Subclasses set the class attributes and implement `attend`.

    Call it as `backend(q, k_new, v_new, kv_cache, md, *, sm_scale, sliding_window=None,
    soft_cap=None) -> (out, kv_cache)` (what `attention_fn` returns; the contract is the
    package docstring's). k_new / v_new are stored in the cache's dtype.
    """

    name: ClassVar[str]
    platforms: ClassVar[tuple[str, ...]]  # where it compiles; elsewhere interpret or refuse
    runs_elsewhere: ClassVar[bool] = True  # pure JAX, or a Pallas kernel's interpret mode
    summary: ClassVar[str]
    kv_layout: ClassVar[KVCacheLayout] = KVCacheLayout()
    writes_new_kv: ClassVar[bool] = False  # its kernel writes the new K/V itself

    def __init__(self, platform: str) -> None:
        if platform not in self.platforms and not self.runs_elsewhere:
            raise ValueError(f"impl={self.name!r} runs on {self.platforms} only, not "
                             f"{platform!r}")
        self.platform = platform

    # Equal backends share compiled programs (the shared steps are jitted with it as static).
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.platform == self.platform

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.platform))

    @property
    def native(self) -> bool:
        """Whether it compiles for this platform (False: interpret mode or plain XLA)."""
        return self.platform in self.platforms

    def prepare_metadata(self, md: AttentionMetadata, num_tokens: int) -> AttentionMetadata:
        """The step's metadata with what the kernels precompute (pure JAX, jit-friendly)."""
        return with_token_layout(md, num_tokens)

    def kv_cache_dtype(self, dtype) -> jnp.dtype:
        return self.kv_layout.cache_dtype(dtype)

    def kv_cache_shape(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                       dtype=jnp.bfloat16, head_shards: int = 1) -> tuple[int, int, int, int]:
        """One layer's cache shape for a model of num_kv_heads x head_dim (padded as the
        backend's layout asks; per shard when the heads are split over head_shards devices)."""
        return self.kv_layout.shape(num_pages, page_size, num_kv_heads, head_dim, dtype,
                                    head_shards)

    def block_sizes(self) -> str:
        """How its block sizes are chosen, for the start-up line."""
        return "none (plain XLA)"

    def describe(self) -> str:
        """One line for the start-up log: the implementation and its block sizes."""
        where = "" if self.native or not self.platforms else ", interpret mode"
        return (f"attention: {self.name} ({self.summary}{where}) on {self.platform}; "
                f"block sizes: {self.block_sizes()}")

    @property
    def attention_fn(self):
        """The callable the model's layers take (ragged_paged_attention_from_metadata's
        signature without impl)."""
        return self.__call__

    def __call__(self, q, k_new, v_new, kv_cache, md: AttentionMetadata, *, sm_scale: float,
                 sliding_window: int | None = None, soft_cap: float | None = None):
        k_new, v_new = k_new.astype(kv_cache.dtype), v_new.astype(kv_cache.dtype)
        validate_inputs(
            q, k_new, v_new, kv_cache, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        )  # fmt: skip
        return _shared_steps(self, q, k_new, v_new, kv_cache, md, sm_scale=float(sm_scale),
                             sliding_window=sliding_window, soft_cap=soft_cap)

    def shared_steps(self, q, k_new, v_new, kv_cache, md, *, sm_scale, sliding_window,
                     soft_cap):
        """Prepare, fit, write the new K/V, attend, cut back (traced inside one jit)."""
        md = self.prepare_metadata(md, q.shape[0])
        q, k_new, v_new, unfit = fit_to_cache(q, k_new, v_new, kv_cache)
        if not self.writes_new_kv:
            kv_cache = write_new_kv(kv_cache, k_new, v_new, md.page_indices, md.layout)
        out, kv_cache = self.attend(q, k_new, v_new, kv_cache, md, sm_scale=sm_scale,
                                    sliding_window=sliding_window, soft_cap=soft_cap)
        return unfit(out), kv_cache

    def attend(self, q, k_new, v_new, kv_cache, md, *, sm_scale, sliding_window, soft_cap):
        """(out, kv_cache): q and the new K/V fitted to the cache, the new K/V already in it
        unless `writes_new_kv`, md prepared. Inputs validated."""
        raise NotImplementedError


@functools.partial(jax.jit, static_argnames=("backend", "sm_scale", "sliding_window", "soft_cap"))
def _shared_steps(backend: AttentionBackend, q, k_new, v_new, kv_cache, md, *, sm_scale,
                  sliding_window, soft_cap):
    return backend.shared_steps(q, k_new, v_new, kv_cache, md, sm_scale=sm_scale,
                                sliding_window=sliding_window, soft_cap=soft_cap)


class ReferenceBackend(AttentionBackend):
    name = "reference"
    platforms = ()
    summary = "pure JAX oracle, blocked gathers"

    def block_sizes(self) -> str:
        return "token blocks of up to 64 (block_sizes.reference_token_block)"

    def attend(self, q, k_new, v_new, kv_cache, md, **opts):
        from jaxllm.kernels.reference import attend

        return attend(q, kv_cache, md.page_indices, md.layout, **opts), kv_cache


class CpuBackend(AttentionBackend):
    name = "cpu"
    platforms = ()
    summary = "pure JAX, per-token page reads for decode buckets"

    def block_sizes(self) -> str:
        return "one token per step when T <= S (block_sizes.cpu_single_pass), else reference's"

    def attend(self, q, k_new, v_new, kv_cache, md, **opts):
        from jaxllm.kernels.cpu import attend_cpu

        return attend_cpu(q, kv_cache, md, **opts), kv_cache


class CpuNativeBackend(AttentionBackend):
    name = "cpu_native"
    platforms = ("cpu",)
    runs_elsewhere = False
    summary = "C++ kernel through the XLA FFI"
    writes_new_kv = True

    def block_sizes(self) -> str:
        return "query blocks of kQueryBlock tokens per work unit (native/paged_attention.cc)"

    def attend(self, q, k_new, v_new, kv_cache, md, **opts):
        from jaxllm.kernels.cpu_native import ragged_paged_attention_cpu_native

        return ragged_paged_attention_cpu_native(q, k_new, v_new, kv_cache, md, **opts)


class TpuOwnBackend(AttentionBackend):
    name = "tpu_own"
    platforms = ("tpu",)
    summary = "jaxllm's Pallas Mosaic kernel"

    def block_sizes(self) -> str:
        return "~128 query rows per grid step, one page per DMA (block_sizes.tpu_query_block)"

    def attend(self, q, k_new, v_new, kv_cache, md, **opts):
        from jaxllm.kernels.tpu import ragged_paged_attention_tpu

        return ragged_paged_attention_tpu(q, kv_cache, md, **opts,
                                          interpret=not self.native), kv_cache


class JaxTpuBackend(AttentionBackend):
    name = "tpu"
    platforms = ("tpu",)
    summary = "JAX's ragged_paged_attention (jax.experimental.pallas.ops.tpu)"
    kv_layout = KVCacheLayout(head_dim_multiple=128, tpu_tiled_heads=True)

    def block_sizes(self) -> str:
        if self.native:
            return "JAX's tuned table for this TPU (get_tuned_block_sizes)"
        return ("min(pages per sequence, 4) kv pages x min(tokens, 16) queries "
                "(block_sizes.jax_tpu_blocks_off_tpu; JAX's tuner needs a TPU)")

    def attend(self, q, k_new, v_new, kv_cache, md, **opts):
        from jaxllm.kernels.jax_tpu import jax_kernel_accepts, ragged_paged_attention_jax_tpu

        if not jax_kernel_accepts(kv_cache.shape[2] // 2, kv_cache.shape[3], kv_cache.dtype):
            logger.warning("kv cache %s %s is not in JAX's TPU kernel's layout (allocate it "
                           "with the backend's kv_cache_shape): running tpu_own",
                           kv_cache.shape, kv_cache.dtype)
            return TpuOwnBackend(self.platform).attend(q, k_new, v_new, kv_cache, md, **opts)
        blocks = None  # on a TPU: JAX's tuned table
        if not self.native:  # its tuner refuses other devices
            blocks = jax_tpu_blocks_off_tpu(q.shape[0], md.page_indices.shape[1])
        out = ragged_paged_attention_jax_tpu(q, kv_cache, md, **opts, block_sizes=blocks,
                                             interpret=not self.native)
        return out, kv_cache


class GpuBackend(AttentionBackend):
    """The GPU default: the Pallas Triton query-block kernel (gpu.query_block_attention_gpu),
    the one a recorded hardware run measured (one H200, ../shared/MEASURING.md and
    benchmarks/RESULTS.md: prefill attention 7.8x the reference, a batch-256 decode step
    18.65 -> 5.87 ms). A default needs such a run: `gpu_paged` replaces it after its own."""

    name = "gpu"
    platforms = GPU_PLATFORMS
    summary = "jaxllm's Pallas Triton query-block kernel (gpu.py)"

    def block_sizes(self) -> str:
        return "64-row query blocks of up to 64/G tokens x G heads (block_sizes.gpu_query_block)"

    def attend(self, q, k_new, v_new, kv_cache, md, **opts):
        from jaxllm.kernels.gpu import query_block_attention_gpu

        return query_block_attention_gpu(q, kv_cache, md, **opts,
                                         interpret=not self.native), kv_cache


class GpuPagedBackend(GpuBackend):
    """The Pallas Triton decode (sequence x kv head x split) + prefill kernels (gpu_paged.py),
    built for HBM speed; tested in interpret mode, not yet on hardware (opt in with
    attention_impl="gpu_paged")."""

    name = "gpu_paged"
    summary = "jaxllm's Pallas Triton paged decode + prefill kernels (gpu_paged.py)"

    def block_sizes(self) -> str:
        return ("decode: a kv head's query heads as >= 16 rows, ~64-128 keys per page block, "
                "kv splits to fill the SMs; prefill: 64-row query blocks of one sequence "
                "(block_sizes.gpu_*)")

    def attend(self, q, k_new, v_new, kv_cache, md, **opts):
        from jaxllm.kernels.gpu import ragged_paged_attention_gpu

        return ragged_paged_attention_gpu(q, kv_cache, md, **opts,
                                          interpret=not self.native), kv_cache


BACKENDS: tuple[type[AttentionBackend], ...] = (
    ReferenceBackend, CpuBackend, CpuNativeBackend, JaxTpuBackend, TpuOwnBackend, GpuBackend,
    GpuPagedBackend,
)
IMPLEMENTATIONS = tuple(b.name for b in BACKENDS)


def default_impl(platform: str | None = None) -> str:
    """Implementation used when impl=None on the given (or default) JAX platform."""
    platform = platform or jax.default_backend()
    if platform == "cpu":
        from jaxllm.kernels.native_build import native_attention_available

        return "cpu_native" if native_attention_available() else "cpu"
    if platform in GPU_PLATFORMS:
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "reference"


def get_backend(impl: str | None = None, platform: str | None = None) -> AttentionBackend:
    """The backend named `impl` (None: the platform's default) for `platform` (None: JAX's
    default backend). ValueError for an unknown name or a platform it cannot run on."""
    platform = platform or jax.default_backend()
    impl = impl or default_impl(platform)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS} or None, got {impl!r}")
    return {b.name: b for b in BACKENDS}[impl](platform)
