"""Weights kept in GGUF blocks: packing is exact (bit-identical to gguf's own dequantization)
and the native quantized matmul equals its pure-JAX twin and a float64 oracle, on fresh random
blocks, ragged row and column counts, q4 and q8."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.native_build import quantized_matmul_available
from jaxllm.kernels.quantized_matmul import (
    PRECISIONS,
    default_impl,
    quantize_rows_int8,
    quantized_matmul,
)
from jaxllm.kernels.quantized_weights import (
    PackedWeight,
    dequantize,
    fuse_columns,
    gather_columns,
    pack_gguf_rows,
    random_gguf_rows,
)

TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _fresh_rng() -> tuple[int, np.random.Generator]:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    return seed, np.random.default_rng(seed)


def _arrays(w: PackedWeight) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    return (jnp.asarray(w.codes), jnp.asarray(w.scales),
            None if w.mins is None else jnp.asarray(w.mins))


def _gguf_dense(gguf_type: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    """gguf's own dequantization of the raw rows: W [k, n] float32."""
    rows = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[gguf_type])
    return np.asarray(rows, np.float32).reshape(n, k).T


@pytest.mark.parametrize("gguf_type", TYPES)
def test_packing_is_bit_exact(gguf_type):
    seed, rng = _fresh_rng()
    for n, k in ((16, 32), (40, 96), (200, 64), (7, 160)):
        raw_type, raw = random_gguf_rows(rng.standard_normal((n, k)), gguf_type, rng)
        packed = pack_gguf_rows(raw_type, raw, k)
        assert packed.shape == (k, n) and packed.codes.shape[0] == -(-n // 16)
        got = np.asarray(dequantize(packed.kind, *_arrays(packed), n))
        want = _gguf_dense(gguf_type, raw, n, k)
        assert np.count_nonzero(want) > want.size // 2  # never a trivially zero weight
        np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} n={n} k={k}")
        ids = jnp.asarray(rng.integers(0, n, 9), jnp.int32)
        table = np.asarray(gather_columns(packed.kind, *_arrays(packed), ids))
        np.testing.assert_array_equal(table, want.T[np.asarray(ids)], err_msg=f"seed={seed}")


def test_packing_follows_reordered_rows():
    """Rows may be permuted before packing (the loader un-permutes q/k that way)."""
    _, rng = _fresh_rng()
    n, k = 48, 64
    _, raw = random_gguf_rows(rng.standard_normal((n, k)), "Q4_1", rng)
    order = rng.permutation(n)
    packed = pack_gguf_rows("Q4_1", raw[order], k)
    got = np.asarray(dequantize(packed.kind, *_arrays(packed), n))
    np.testing.assert_array_equal(got, _gguf_dense("Q4_1", raw, n, k)[:, order])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("gguf_type", TYPES)
def test_matmul_matches_float64_oracle(gguf_type, impl, precision):
    """bfloat16 precision: the oracle multiplies x rounded to bfloat16, exactly; int8: x
    quantized per block of 32 (numpy's own quantizer), exactly."""
    if impl == "native" and not quantized_matmul_available():
        pytest.skip("native kernel unavailable (no C++ compiler or build failed; see log)")
    seed, rng = _fresh_rng()
    # rows: one, a ragged register tile, exactly one tile (12 or 16 rows), one past it,
    # several tiles; columns not a multiple of the 16-column group; one block to many.
    for m, k, n in ((1, 32, 16), (3, 96, 40), (12, 64, 48), (16, 64, 33), (17, 576, 192),
                    (45, 160, 300), (0, 64, 32)):
        raw_type, raw = random_gguf_rows(rng.standard_normal((n, k)), gguf_type, rng)
        packed = pack_gguf_rows(raw_type, raw, k)
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = np.asarray(quantized_matmul(jnp.asarray(x), *_arrays(packed), kind=packed.kind,
                                          n=n, impl=impl, precision=precision))
        assert got.shape == (m, n) and np.all(np.isfinite(got))
        if m == 0:
            continue
        if precision == "bfloat16":
            x = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
        if precision == "int8":
            q, d = _quantize_rows_numpy(x)
            x = (q * d[..., None].astype(np.float64)).reshape(m, k)
        want = x.astype(np.float64) @ _gguf_dense(gguf_type, raw, n, k).astype(np.float64)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-6, (f"seed={seed} {gguf_type} {precision} m={m} k={k} n={n}: "
                            f"rel err {err:.2e}")


def _quantize_rows_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 precision's quantizer in numpy float32: (q [M, B, 32], d [M, B])."""
    blocks = x.astype(np.float32).reshape(x.shape[0], x.shape[1] // 32, 32)
    d = np.abs(blocks).max(axis=-1) * np.float32(1 / 127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    return np.clip(np.rint(blocks * inv[..., None]), -127, 127), d


def test_int8_quantizer_matches_numpy_with_ties_and_zero_blocks():
    """Both twins quantize as numpy does: round half to even (blocks whose scale is exactly 1
    put x on ties), all-zero blocks give zeros and no NaN."""
    seed, rng = _fresh_rng()
    m, k = 7, 128
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1))
    ties = rng.integers(-126, 126, 31) + 0.5
    x[0, :32] = np.concatenate([[127.0], ties]).astype(np.float32)  # d = 1: x * 1/d is a tie
    x[1, 32:64] = 0.0
    q, d = quantize_rows_int8(jnp.asarray(x))
    want_q, want_d = _quantize_rows_numpy(x)
    np.testing.assert_array_equal(np.asarray(q), want_q, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(d), want_d, err_msg=f"seed={seed}")
    assert np.asarray(q)[0, 0, 1:].tolist() == np.rint(ties).tolist()  # half to even
    if not quantized_matmul_available():
        return
    # The kernel quantizes inside; equal products (to float32 order) show it rounds the same.
    for gguf_type in ("Q4_1", "Q8_0"):
        packed = pack_gguf_rows(*random_gguf_rows(rng.standard_normal((48, k)), gguf_type, rng), k)
        got, want = (np.asarray(quantized_matmul(jnp.asarray(x), *_arrays(packed), kind=packed.kind,
                                                 n=48, impl=impl, precision="int8"))
                     for impl in ("native", "reference"))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"seed={seed} {gguf_type}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_native_equals_reference_under_jit_with_other_ops(precision):
    """Both impls inside one jitted program, fed by and feeding ordinary XLA ops."""
    if not quantized_matmul_available():
        pytest.skip("native kernel unavailable")
    seed, rng = _fresh_rng()
    k, n = 128, 80
    layers = [pack_gguf_rows(*random_gguf_rows(rng.standard_normal((n, k)), t, rng), k)
              for t in ("Q4_1", "Q8_0")]

    def run(x, impl):
        h = jnp.tanh(x)
        a = quantized_matmul(h, *_arrays(layers[0]), kind="q4", n=n, impl=impl,
                             precision=precision)
        b = quantized_matmul(h * 0.5, *_arrays(layers[1]), kind="q8", n=n, impl=impl,
                             precision=precision)
        return jax.nn.silu(a) * b

    x = jnp.asarray(rng.standard_normal((24, k)), jnp.float32)
    got = jax.jit(lambda x: run(x, "native"))(x)
    want = jax.jit(lambda x: run(x, "reference"))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5,
                               atol=2e-5 * float(jnp.abs(want).max()), err_msg=f"seed={seed}")


def test_errors():
    _, rng = _fresh_rng()
    raw_type, raw = random_gguf_rows(rng.standard_normal((16, 64)), "Q4_1", rng)
    packed = pack_gguf_rows(raw_type, raw, 64)
    with pytest.raises(ValueError, match="cannot be kept in blocks"):
        pack_gguf_rows("Q6_K", raw, 64)
    with pytest.raises(ValueError, match="multiple of the 32"):
        pack_gguf_rows(raw_type, raw, 48)
    with pytest.raises(ValueError, match="expected"):
        pack_gguf_rows(raw_type, raw[:, :-1], 64)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        quantized_matmul(jnp.ones((2, 32)), *_arrays(packed), kind="q4", n=16, impl="reference")
    with pytest.raises(ValueError, match="impl must be one of"):
        quantized_matmul(jnp.ones((2, 64)), *_arrays(packed), kind="q4", n=16, impl="fast")
    with pytest.raises(ValueError, match="precision must be one of"):
        quantized_matmul(jnp.ones((2, 64)), *_arrays(packed), kind="q4", n=16, precision="int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows_int8(jnp.ones((2, 48)))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rows_int8(jnp.ones((64,)))
    with pytest.raises(ValueError, match="need mins"):
        PackedWeight("q4", packed.codes, packed.scales, None, 64, 16)
    big = np.full((16, 2), 60000.0, np.float16)  # -8 * d overflows float16
    q4_0 = np.concatenate([big[..., None].view(np.uint8).reshape(16, 2, 2),
                           np.zeros((16, 2, 16), np.uint8)], axis=-1).reshape(16, -1)
    with pytest.raises(ValueError, match="too large"):
        pack_gguf_rows("Q4_0", q4_0, 64)


def test_default_impl_by_backend():
    assert default_impl("gpu") == "reference" and default_impl("tpu") == "reference"
    assert default_impl("cpu") == ("native" if quantized_matmul_available() else "reference")


def test_fused_columns_are_the_parts_side_by_side():
    seed, rng = _fresh_rng()
    k = 96
    parts = [pack_gguf_rows(*random_gguf_rows(rng.standard_normal((n, k)), "Q4_1", rng), k)
             for n in (48, 16, 40)]  # the last may be off the 16-column grid
    fused = fuse_columns(parts)
    assert fused is not None and fused.shape == (k, 104)
    got = np.asarray(dequantize(fused.kind, *_arrays(fused), fused.n))
    want = np.concatenate([np.asarray(dequantize(p.kind, *_arrays(p), p.n)) for p in parts], 1)
    np.testing.assert_array_equal(got, want, err_msg=f"seed={seed}")
    q8 = pack_gguf_rows(*random_gguf_rows(rng.standard_normal((16, k)), "Q8_0", rng), k)
    assert fuse_columns([parts[0], q8]) is None  # different kinds
    assert fuse_columns([parts[2], parts[0]]) is None  # padding would fall between the parts
    other_k = pack_gguf_rows(*random_gguf_rows(rng.standard_normal((16, 64)), "Q4_1", rng), 64)
    assert fuse_columns([parts[0], other_k]) is None


_PORTABLE_CHECK = """
import dataclasses, sys
import numpy as np, jax, jax.numpy as jnp
from pathlib import Path
from jaxllm.kernels import native_build
from jaxllm.kernels.quantized_matmul import quantized_matmul
from jaxllm.kernels.quantized_weights import pack_gguf_rows, random_gguf_rows
flags = tuple(f for f in native_build.DEFAULT_FLAGS if not f.startswith("-march"))
config = native_build.NativeBuildConfig(cache_dir=Path(sys.argv[1]),
                                        flags=flags + ("-march=x86-64-v2",))
target = native_build.register_native_kernel(native_build.QUANTIZED_MATMUL, config)
native_build.register_quantized_matmul = lambda config=None: target  # keep this build
rng = np.random.default_rng(int(sys.argv[2]))
for gguf_type in ("Q4_1", "Q8_0"):
    for precision in ("float32", "bfloat16", "int8"):
        m, k, n = 13, 96, 40
        packed = pack_gguf_rows(*random_gguf_rows(rng.standard_normal((n, k)), gguf_type, rng), k)
        arrays = [jnp.asarray(a) if a is not None else None
                  for a in (packed.codes, packed.scales, packed.mins)]
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        got, want = (np.asarray(quantized_matmul(x, *arrays, kind=packed.kind, n=n, impl=impl,
                                                 precision=precision))
                     for impl in ("native", "reference"))
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-6, (gguf_type, precision, err)
print("ok")
"""


def test_portable_build_matches_reference(tmp_path):
    """The kernel built without AVX-512 (plain x86-64-v2: the portable loops) gives the same
    products, at every precision; in a subprocess, since the FFI target has one name."""
    import subprocess
    import sys

    if not quantized_matmul_available() or not sys.platform.startswith("linux"):
        pytest.skip("native kernel unavailable")
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only (-march=x86-64-v2)")
    seed, _ = _fresh_rng()
    res = subprocess.run([sys.executable, "-c", _PORTABLE_CHECK, str(tmp_path), str(seed)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (
        f"seed={seed}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
