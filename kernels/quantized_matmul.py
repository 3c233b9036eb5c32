"""y = x @ W for a weight kept in GGUF quantization blocks (kernels/quantized_weights.py).

impl "native": the C++ kernel through the XLA FFI (CPU only; kernels/native/quantized_matmul.cc)
rebuilds each weight in registers and reads the blocks once per call. impl "reference": the
pure-JAX twin, which dequantizes the whole matrix and calls jnp.dot (any backend; slow on CPU,
where the dequantized matrix is written and read again every call). Both compute in float32 on
bit-identical weights; they differ only in summation order. At int8 precision both quantize x
the same way and sum integers exactly; again only the float32 sum over blocks is ordered
differently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import QUANTIZED_ACTIVATIONS
from jaxllm.kernels.quantized_weights import BLOCK, COLUMNS, codes_as_integers, dequantize

IMPLEMENTATIONS = ("native", "reference")
# "float32": exact products of float32 x and the weights. "bfloat16": x rounded to bfloat16 first
# (weights stay exact, sums float32): twice the multiply-add rate on CPUs with AVX512-BF16.
# "int8": x quantized per row and block of 32 (quantize_rows_int8), exact integer block sums:
# four times the multiply-add rate with AVX512-VNNI (what llama.cpp computes for Q4/Q8 weights).
PRECISIONS = QUANTIZED_ACTIVATIONS
_PRECISION_CODES = {"float32": 0, "bfloat16": 1, "int8": 2}


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
        if precision == "int8":
            return _int8_reference(x, codes, scales, mins, kind=kind, n=n)
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
    # x row-major: the kernel lays it out in its register tiles (float32), rounds and pairs it
    # (bfloat16) or quantizes it (int8) itself, cheaper than XLA ops before each call.
    return call(x, codes, scales, mins, precision=np.int32(_PRECISION_CODES[precision]))


def quantize_rows_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x f32 [M, K] -> (q int32 [M, K/32, 32] in [-127, 127], d f32 [M, K/32]) with
    x ~ d * q per block of 32: d = max|x| * float32(1/127), q = round_half_even(x * (1 / d))
    (0 where d = 0). The kernel's QuantizeRows does the same float32 operations, so both get
    the same q. (A multiply, not max|x| / 127: XLA rewrites division by a constant into that.)"""
    if x.ndim != 2 or x.shape[1] % BLOCK:
        raise ValueError(f"x must be [M, K] with K a multiple of {BLOCK}, got {x.shape}")
    blocks = x.reshape(x.shape[0], x.shape[1] // BLOCK, BLOCK)
    d = jnp.max(jnp.abs(blocks), axis=-1) * jnp.float32(1 / 127)
    inv = jnp.where(d != 0, jnp.float32(1) / jnp.where(d != 0, d, 1), 0)
    q = jnp.clip(jnp.round(blocks * inv[..., None]), -127, 127).astype(jnp.int32)
    return q, d


def _int8_reference(x, codes, scales, mins, *, kind: str, n: int) -> jax.Array:
    """The int8 precision in plain JAX: integer block sums S [B, M, N], then
    sum_b S * (d_w * d_x) + m_w * (d_x * sum q_x), the kernel's arithmetic per block."""
    q, d = quantize_rows_int8(x)
    w = codes_as_integers(kind, codes).astype(jnp.int32)  # [G, B, 32, 16]
    groups, blocks = codes.shape[:2]
    w = w.transpose(1, 2, 0, 3).reshape(blocks, BLOCK, groups * COLUMNS)  # [B, 32, N]
    sums = jax.lax.dot_general(q.transpose(1, 0, 2), w, (((2,), (1,)), ((0,), (0,))),
                               preferred_element_type=jnp.int32)  # [B, M, N]
    d_w = scales.astype(jnp.float32).transpose(1, 0, 2).reshape(blocks, 1, -1)
    terms = sums.astype(jnp.float32) * (d_w * d.T[:, :, None])
    if mins is not None:
        m_w = mins.astype(jnp.float32).transpose(1, 0, 2).reshape(blocks, 1, -1)
        offset = d * jnp.sum(q, axis=-1).astype(jnp.float32)  # [M, B]
        terms = terms + m_w * offset.T[:, :, None]
    return jnp.sum(terms, axis=0)[:, :n]
