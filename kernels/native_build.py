"""Build, load and register the native CPU kernels (kernels/native/*.cc) on first use.

Two kernels: ragged paged attention (kernels/cpu_native.py) and the matmul over GGUF
quantization blocks (kernels/quantized_matmul.py); each is its own library and FFI target.

The shared library is compiled with the system C++ compiler into a cache directory, under a
file name keyed on everything that decides its machine code: the source and the headers beside
it, the compiler and its flags, the jaxlib version (FFI headers) and the CPU's feature flags, so
a -march=native build is never loaded on a different CPU. Builds go to a temporary file renamed
into place, so parallel processes never see a half-written library. Failures raise
NativeBuildError with the compiler's output; native_attention_available() turns that into False
(and one warning).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jaxlib

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeKernel:
    """One C++ source file exporting one XLA FFI handler symbol, registered under `target`."""

    source: Path
    symbol: str
    target: str


_NATIVE_DIR = Path(__file__).parent / "native"
PAGED_ATTENTION = NativeKernel(
    _NATIVE_DIR / "paged_attention.cc", "JaxllmRaggedPagedAttention",
    "jaxllm_ragged_paged_attention")
QUANTIZED_MATMUL = NativeKernel(
    _NATIVE_DIR / "quantized_matmul.cc", "JaxllmQuantizedMatmul", "jaxllm_quantized_matmul")
NATIVE_KERNELS = (PAGED_ATTENTION, QUANTIZED_MATMUL)
# No -ffast-math: it lets the compiler assume no NaN/inf, which the masking relies on seeing.
DEFAULT_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


class NativeBuildError(RuntimeError):
    """The native kernel could not be compiled or loaded (message holds the compiler output)."""


@dataclass(frozen=True)
class NativeBuildConfig:
    """Where and how the kernel library is built. cache_dir None = ~/.cache/jaxllm/native."""

    cache_dir: Path | None = None
    compiler: str = "g++"
    flags: tuple[str, ...] = field(default=DEFAULT_FLAGS)

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or Path.home() / ".cache" / "jaxllm" / "native"


def cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0] if result.stdout else ""


def library_path(config: NativeBuildConfig, kernel: NativeKernel = PAGED_ATTENTION) -> Path:
    """The cached library's path for this source, toolchain, jaxlib and CPU."""
    key = hashlib.sha256()
    headers = sorted(kernel.source.parent.glob("*.h"))  # what the source may include
    for part in (
        kernel.source.read_bytes(),
        *(h.read_bytes() for h in headers),
        config.compiler.encode(),
        _compiler_version(config.compiler).encode(),
        " ".join(config.flags).encode(),
        jaxlib.__version__.encode(),
        cpu_features().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    return config.resolved_cache_dir() / f"{kernel.source.stem}-{key.hexdigest()[:20]}.so"


def build_native_library(config: NativeBuildConfig | None = None,
                         kernel: NativeKernel = PAGED_ATTENTION) -> Path:
    """Compile the kernel unless a matching build is cached; return the library's path."""
    config = config or NativeBuildConfig()
    if shutil.which(config.compiler) is None:
        raise NativeBuildError(f"C++ compiler {config.compiler!r} not found on PATH")
    path = library_path(config, kernel)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [
        config.compiler,
        *config.flags,
        "-isystem",
        jax.ffi.include_dir(),
        str(kernel.source),
        "-o",
        tmp,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NativeBuildError(
                f"building {kernel.source.name} failed ({' '.join(cmd)}):\n{result.stderr}"
            )
        os.replace(tmp, path)  # atomic: concurrent builders write identical files
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built native kernel %s", path)
    return path


@functools.cache
def register_native_kernel(kernel: NativeKernel, config: NativeBuildConfig | None = None) -> str:
    """Build (if needed), load and register the FFI target once per config; return its name."""
    path = build_native_library(config, kernel)
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        handler = getattr(lib, kernel.symbol)
    except (OSError, AttributeError) as e:
        raise NativeBuildError(f"loading {path} failed: {e}") from e
    jax.ffi.register_ffi_target(kernel.target, jax.ffi.pycapsule(handler), platform="cpu")
    return kernel.target


@functools.cache
def native_kernel_available(kernel: NativeKernel, config: NativeBuildConfig | None = None) -> bool:
    """Whether the kernel builds and registers here (warns once with the reason if not)."""
    try:
        register_native_kernel(kernel, config)
    except NativeBuildError as e:
        logger.warning("native CPU kernel %s unavailable: %s", kernel.source.name, e)
        return False
    return True


def native_targets_used(program_text: str) -> list[str]:
    """FFI targets of the native kernels that a lowered program's text calls."""
    return [k.target for k in NATIVE_KERNELS if k.target in program_text]


def register_native_target(target: str, config: NativeBuildConfig | None = None) -> None:
    """Register the native kernel behind `target` (a program loaded from disk calls it: the
    handler must be registered before XLA loads the program)."""
    for kernel in NATIVE_KERNELS:
        if kernel.target == target:
            register_native_kernel(kernel, config)
            return
    raise ValueError(f"no native kernel has FFI target {target!r}")


def register_native_attention(config: NativeBuildConfig | None = None) -> str:
    """The paged attention kernel's FFI target name (built and registered on first call)."""
    return register_native_kernel(PAGED_ATTENTION, config)


def native_attention_available(config: NativeBuildConfig | None = None) -> bool:
    return native_kernel_available(PAGED_ATTENTION, config)


def register_quantized_matmul(config: NativeBuildConfig | None = None) -> str:
    """The quantized matmul kernel's FFI target name (built and registered on first call)."""
    return register_native_kernel(QUANTIZED_MATMUL, config)


def quantized_matmul_available(config: NativeBuildConfig | None = None) -> bool:
    return native_kernel_available(QUANTIZED_MATMUL, config)
