"""Time the quantized matmul (GGUF blocks, kernels/quantized_matmul.py) against XLA's float32 dot.

Usage: python benchmarks/quantized_matmul_bench.py [--rows 1,8,32,128,512] [--iters N]

Shapes are SmolLM2-135M's: the attention projections (576 -> 576 / 192), the MLP (576 -> 1536,
1536 -> 576) in Q4_1, and the tied LM head (576 -> 49152) in Q8_0, as the default GGUF stores
them. Peer in the same run: `xla_f32`, jnp.dot on the same weights dequantized to float32 (what
the engine runs without the kernel). `native` computes at float32 precision (exact products),
`bf16` at bfloat16 precision (x rounded to bfloat16; vdpbf16ps where the CPU has AVX512-BF16),
`int8` at int8 precision (x quantized per block of 32; vpdpbusd where the CPU has AVX512-VNNI).
Columns: median ms per call, GFLOP/s, weight bytes read per call and the xla_f32 / kernel time
ratios (>1 = kernel faster).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.quantized_matmul import quantized_matmul
from jaxllm.kernels.quantized_weights import dequantize, pack_gguf_rows, random_gguf_rows

SHAPES = [("q_proj", "Q4_1", 576, 576), ("k_proj", "Q4_1", 576, 192),
          ("gate_proj", "Q4_1", 576, 1536), ("down_proj", "Q4_1", 1536, 576),
          ("lm_head", "Q8_0", 576, 49152)]


def _median_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32,128,512")
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    print(f"{'weight':<10}{'type':<6}{'M':>5}{'native ms':>11}{'GFLOP/s':>9}{'bf16 ms':>9}"
          f"{'GFLOP/s':>9}{'int8 ms':>9}{'GFLOP/s':>9}{'xla_f32 ms':>12}{'GFLOP/s':>9}"
          f"{'MB native':>11}{'MB f32':>8}{'x/native':>10}{'x/bf16':>8}{'x/int8':>8}")
    dense_dot = jax.jit(lambda x, w: jnp.dot(x, w))
    for name, gguf_type, k, n in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        packed = pack_gguf_rows(*random_gguf_rows(w, gguf_type, rng), k)
        arrays = [jnp.asarray(packed.codes), jnp.asarray(packed.scales),
                  None if packed.mins is None else jnp.asarray(packed.mins)]
        dense = jax.block_until_ready(dequantize(packed.kind, *arrays, n))
        for m in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            native, bf16, int8 = (
                _median_ms(functools.partial(quantized_matmul, kind=packed.kind, n=n,
                                             impl="native", precision=precision),
                           x, *arrays, iters=args.iters)
                for precision in ("float32", "bfloat16", "int8"))
            xla = _median_ms(dense_dot, x, dense, iters=args.iters)
            gflop = 2 * m * k * n / 1e9
            print(f"{name:<10}{gguf_type:<6}{m:>5}{native:>11.3f}{gflop / native * 1e3:>9.0f}"
                  f"{bf16:>9.3f}{gflop / bf16 * 1e3:>9.0f}{int8:>9.3f}{gflop / int8 * 1e3:>9.0f}"
                  f"{xla:>12.3f}{gflop / xla * 1e3:>9.0f}{packed.nbytes / 1e6:>11.2f}"
                  f"{dense.nbytes / 1e6:>8.2f}{xla / native:>10.2f}{xla / bf16:>8.2f}"
                  f"{xla / int8:>8.2f}")


if __name__ == "__main__":
    main()
