"""The engine's defaults by backend: what an unset (None) EngineConfig field becomes.

Every number here is tied to a recorded run (benchmarks/RESULTS.md) or says why it is not:
- max_num_batched_tokens: CPU 512 (a step is bound by reading the weights; bigger steps only
  add latency). GPU/TPU 4096: on the H200 run (1B shape, 256 x 128/128) 4096 with the Pallas
  attention took `LLM.generate` from 3,006 to 12,009 output tok/s (prefill of many prompts in
  one step instead of eight).
- page_size: CPU 16 (the native attention reads a page per token run), accelerators 64 (fewer,
  longer contiguous reads per gather).
- memory_fraction: CPU 0.5 of kv_cache_memory_bytes (the host's RAM is shared with everything
  else). Accelerators 0.8 of the device memory left free after the weights (JAX's allocator
  already reserves its own pool): the rest is room for step activations and XLA workspace. Not
  yet tuned on hardware; benchmarks/device_check.py records the pages it gives.
- compile_threads: warm-up compiles its programs in parallel. A GPU/TPU host has many cores and
  each program costs ~2.3 s to compile on the H200 run: min(cpu count, 16). CPU: 2 (this
  project's CI machine has two cores, and the model runs on them too).
- token buckets: CPU ratio 4 plus a 1-token bucket (benchmarks/step_profile.py: ratio 4 nearly
  halves warm-up; a lone decode runs 24 -> 17 ms at 1 token instead of 8). Accelerators ratio 4
  and no 1-token bucket: a decode step there costs the same at 1 or 8 tokens (bound by the
  weight read), so every bucket saved is ~2.3 s of cold start (issue 17 asks <= 30 s; ratio 2
  gave 36 programs and 62 s on the H200 run).
The attention implementation's default is the kernels' backend registry
(`jaxllm.kernels.default_impl`), only reported here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from jaxllm.config import EngineConfig

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclass(frozen=True)
class PlatformDefaults:
    """What one backend's unset settings become (see the module doc for each reason)."""

    platform: str
    max_num_batched_tokens: int
    page_size: int
    memory_fraction: float
    compile_threads: int
    token_bucket_ratio: int
    single_token_bucket: bool


def canonical_platform(name: str) -> str:
    """The platform family of a JAX backend name: cpu, gpu (cuda, rocm) or tpu."""
    name = name.lower()
    if name in ("cuda", "rocm", "gpu"):
        return "gpu"
    if name in PLATFORMS:
        return name
    raise ValueError(f"unknown platform {name!r}; expected one of cpu, gpu (cuda, rocm), tpu")


def current_platform() -> str:
    """The default JAX backend's platform (initialises JAX's backends)."""
    import jax

    return canonical_platform(jax.default_backend())


def defaults_for(platform: str, cpu_count: int | None = None) -> PlatformDefaults:
    """The defaults of `platform`; `cpu_count` (default: this host's) sizes compile threads."""
    platform = canonical_platform(platform)
    if platform == "cpu":
        return PlatformDefaults(platform, max_num_batched_tokens=512, page_size=16,
                                memory_fraction=0.5, compile_threads=2, token_bucket_ratio=4,
                                single_token_bucket=True)
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return PlatformDefaults(platform, max_num_batched_tokens=4096, page_size=64,
                            memory_fraction=0.8, compile_threads=max(1, min(cores, 16)),
                            token_bucket_ratio=4, single_token_bucket=False)


@dataclass(frozen=True)
class ResolvedConfig:
    """An EngineConfig with every platform-dependent field set, and the bucket policy."""

    config: EngineConfig
    defaults: PlatformDefaults
    defaulted: frozenset[str]  # the fields that were None and took the platform's value

    @property
    def token_bucket_ratio(self) -> int:
        return self.defaults.token_bucket_ratio

    @property
    def single_token_bucket(self) -> bool:
        return self.defaults.single_token_bucket


_RESOLVED_FIELDS = ("max_num_batched_tokens", "page_size", "memory_fraction", "compile_threads")


def resolve_engine_config(config: EngineConfig, platform: str | None = None,
                          cpu_count: int | None = None) -> ResolvedConfig:
    """A copy of `config` with its None platform fields (max_num_batched_tokens, page_size,
    memory_fraction, compile_threads) set from `platform`'s defaults (default: JAX's backend).
    Fields the user set are kept. Idempotent."""
    defaults = defaults_for(platform or current_platform(), cpu_count)
    changes = {name: getattr(defaults, name) for name in _RESOLVED_FIELDS
               if getattr(config, name) is None}
    return ResolvedConfig(dataclasses.replace(config, **changes) if changes else config,
                          defaults, frozenset(changes))


def describe(resolved: ResolvedConfig, attention_impl: str | None = None) -> str:
    """The start-up line naming what this engine runs with, and which values are defaults.
    `attention_impl`: the implementation in use (default: the config's, else the kernels'
    default for the platform)."""
    cfg, d = resolved.config, resolved.defaults
    if attention_impl is None:
        attention_impl = cfg.attention_impl
    if attention_impl is None:
        from jaxllm.kernels import default_impl

        attention_impl = default_impl(d.platform)
    parts = [f"{name}={getattr(cfg, name)}" + ("" if name in resolved.defaulted else " (set)")
             for name in _RESOLVED_FIELDS]
    buckets = f"token buckets x{d.token_bucket_ratio}" + (
        " + 1-token" if d.single_token_bucket else "")
    return f"platform {d.platform}: " + ", ".join(parts) + f", {buckets}, attention {attention_impl}"
