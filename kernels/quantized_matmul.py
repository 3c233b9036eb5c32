"""y = x @ W for a weight kept in GGUF quantization blocks (kernels/quantized_weights.py).

impl "native": the C++ kernel through the XLA FFI (CPU only; kernels/native/quantized_matmul.cc)
rebuilds each weight in registers and reads the blocks once per call. impl "reference": the
pure-JAX twin, which dequantizes the whole matrix and calls jnp.dot (any backend; slow on CPU,
where the dequantized matrix is written and read again every call). Both compute in float32 on
bit-identical weights; they differ only in summation order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import QUANTIZED_ACTIVATIONS
from jaxllm.kernels.quantized_weights import dequantize

IMPLEMENTATIONS = ("native", "reference")
# "float32": exact products of float32 x and the weights. "bfloat16": x rounded to bfloat16 first
# (weights stay exact, sums float32): twice the multiply-add rate on CPUs with AVX512-BF16.
PRECISIONS = QUANTIZED_ACTIVATIONS


def default_impl(backend: str | None = None) -> str:
    """"native" on CPU when the kernel builds here, else "reference"."""
    if (backend or jax.default_backend()) != "cpu":
        return "reference"
    from jaxllm.kernels.native_build import quantized_matmul_available

    return "native" if quantized_matmul_available() else "reference"


@functools.partial(jax.jit, static_argnames=("kind", "n", "impl", "precision"))
def quantized_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, mins: jax.Array | None,
                     *, kind: str, n: int, impl: str = "reference",
                     precision: str = "float32") -> jax.Array:
    """x [M, k] (any float dtype) times the packed [k, n] weight -> float32 [M, n]."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"quantized matmul impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"quantized matmul precision must be one of {PRECISIONS}, "
                         f"got {precision!r}")
    k = codes.shape[1] * 32
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {x.shape}")
    x = x.astype(jnp.float32)
    if impl == "reference":
        if precision == "bfloat16":
            x = x.astype(jnp.bfloat16).astype(jnp.float32)
        w = dequantize(kind, codes, scales, mins, n)
        return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    if jax.default_backend() != "cpu":
        raise ValueError("the native quantized matmul runs on CPU only")
    from jaxllm.kernels.native_build import register_quantized_matmul

    target = register_quantized_matmul()
    m = x.shape[0]
    if m == 0:
        return jnp.zeros((0, n), jnp.float32)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))
    mins = scales if mins is None else mins
    # x row-major: the kernel lays it out in its register tiles (float32) or rounds and pairs
    # it (bfloat16) itself, cheaper than an XLA transpose before each call.
    return call(x, codes, scales, mins, precision=np.int32(1 if precision == "bfloat16" else 0))
