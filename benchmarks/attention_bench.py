"""Time ragged paged attention per implementation on the current backend.

Usage: python benchmarks/attention_bench.py [--dtype float32|bfloat16] [--iters N]
           [--impl reference,gpu,gpu_query_blocks,gpu_paged,...] [--shapes decode,prefill]
           [--page-sizes 16,32,64,128] [--pages-per-block N] [--single-bf16-probs]

Shapes (SmolLM2-135M heads: 9 query / 3 KV heads, head_dim 64, unless named "8B heads":
Llama-3-8B's 32 / 8, head_dim 128; page_size 16 unless --page-sizes lists others: each shape
then runs at each page size):
  decode : S sequences x 1 new token over a cached context (64 x 2048, 8 x 8192 and, with
           8B heads, 64 x 512 and 64 x 2048 on accelerators,
           32 x 256 -- the 32x32x16 decode bucket -- and 32 x 1024 on CPU; on CPU also
           32 x 192 over 30 layers' own caches, as a decode step reads them: from DRAM, where
           the single-cache shapes stay in L3 between iterations and are timed one call at a
           time, dispatch latency included)
  prefill: 4 chunks x 512 new tokens continuing a 512-token cached prefix (cap of causal work);
           on CPU also one fresh 512-token prompt (the engine's 512-token prefill bucket)
Columns: median time, achieved KV-read bandwidth (bytes of the pages each token must read,
counted once per sequence), attention FLOP rate (4*Hq*D per query-key pair actually attended),
the ratio of the first impl's time to this implementation's time (>1 = faster), and on
accelerators the KV-read bandwidth as a percentage of a device-to-device copy measured in the
same run (the header prints the copy rate).
Peer in the same run: `xla_dense`, jax.nn.dot_product_attention over the same K/V already laid
out contiguously per sequence (no paging, no cache write) -- what paging costs on this backend.
Kernels run only where they compile (Pallas TPU on TPU, Pallas GPU on GPU); interpret mode is a
correctness tool, not timed. On CPU the `cpu` (kernels/cpu.py) and `cpu_native` (kernels/
cpu_native.py, the C++ FFI kernel) implementations are timed too; --impl picks a subset (the
first one listed is the "vs" baseline). "gpu" (the GPU default) and `gpu_query_blocks` run
the query-block kernel (gpu.query_block_attention_gpu, the one the recorded H200 run
measured); `gpu_paged` runs kernels/gpu_paged.py (decode kernel over (sequence, kv head,
split) + one-sequence prefill blocks), called directly so that --pages-per-block can override
its block size (block_sizes.gpu_pages_per_block) and --single-bf16-probs its bfloat16 P.V
(gpu_paged.paged_attention_gpu's split_probs=False) for sweeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels import ragged_paged_attention

SMOLLM2_HEADS = (9, 3, 64)  # query heads, kv heads, head_dim
LLAMA3_8B_HEADS = (32, 8, 128)


@dataclass
class Shape:
    name: str
    num_seqs: int
    q_len: int
    kv_len: int  # after this step
    layers: int = 1  # > 1: that many caches, all dispatched before waiting (a step's DRAM traffic)
    page_size: int = 16
    heads: tuple[int, int, int] = SMOLLM2_HEADS


def shapes_for(backend: str) -> list[Shape]:
    if backend == "cpu":
        return [
            Shape("decode 32x256", 32, 1, 256),
            Shape("decode 32x1024", 32, 1, 1024),
            Shape("decode 32x192 x 30 layers", 32, 1, 192, layers=30),
            Shape("prefill 1x512", 1, 512, 512),
            Shape("prefill 4x512 (+512 cached)", 4, 512, 1024),
        ]
    return [
        Shape("decode 64x2048", 64, 1, 2048),
        Shape("decode 8x8192", 8, 1, 8192),
        Shape("prefill 4x512 (+512 cached)", 4, 512, 1024),
        Shape("decode 64x512 8B heads", 64, 1, 512, heads=LLAMA3_8B_HEADS),
        Shape("decode 64x2048 8B heads", 64, 1, 2048, heads=LLAMA3_8B_HEADS),
    ]


def build(shape: Shape, dtype, rng: np.random.Generator):
    pages_per_seq = -(-shape.kv_len // shape.page_size)
    num_pages = shape.num_seqs * pages_per_seq + 1
    page_indices = rng.permutation(num_pages)[: shape.num_seqs * pages_per_seq]
    page_indices = page_indices.reshape(shape.num_seqs, pages_per_seq).astype(np.int32)
    tokens = shape.num_seqs * shape.q_len
    hq, hkv, d = shape.heads
    cache = rng.standard_normal((num_pages, shape.page_size, 2 * hkv, d), np.float32)
    args = (
        jnp.asarray(rng.standard_normal((tokens, hq, d), np.float32), dtype),
        jnp.asarray(rng.standard_normal((tokens, hkv, d), np.float32), dtype),
        jnp.asarray(rng.standard_normal((tokens, hkv, d), np.float32), dtype),
        jnp.asarray(cache, dtype),
        jnp.full((shape.num_seqs,), shape.kv_len, jnp.int32),
        jnp.asarray(page_indices),
        jnp.arange(shape.num_seqs + 1, dtype=jnp.int32) * shape.q_len,
        jnp.array([shape.num_seqs], jnp.int32),
    )
    return args


def gpu_kernel_attention(impl: str, q, k, v, cache, kv_lens, pages, cu, n, *, sm_scale: float,
                         pages_per_block: int | None, split_probs: bool):
    """The shared K/V write, then a GPU kernel called directly (interpret mode off a GPU):
    gpu_paged (kernels/gpu_paged.py, with the block-size override) or gpu_query_blocks (the
    first kernel, gpu.query_block_attention_gpu, which the recorded H200 run measured)."""
    from jaxllm.kernels.gpu import query_block_attention_gpu
    from jaxllm.kernels.gpu_paged import paged_attention_gpu
    from jaxllm.kernels.metadata import AttentionMetadata
    from jaxllm.kernels.ragged_layout import token_layout, write_new_kv

    layout = token_layout(q.shape[0], kv_lens, cu, n)
    cache = write_new_kv(cache, k.astype(cache.dtype), v.astype(cache.dtype), pages, layout)
    md = AttentionMetadata(kv_lens, pages, cu, n)
    interpret = jax.default_backend() not in ("gpu", "cuda")
    if impl == "gpu_query_blocks":
        out = query_block_attention_gpu(q, cache, md.replace(layout=layout), sm_scale=sm_scale,
                                        interpret=interpret)
    else:
        out = paged_attention_gpu(q, cache, md, sm_scale=sm_scale,
                                  pages_per_block=pages_per_block, split_probs=split_probs,
                                  interpret=interpret)
    return out, cache


def paged_fn(impl: str, inputs: tuple, pages_per_block: int | None = None,
             split_probs: bool = True):
    """A no-argument step that, like the runner, donates the cache and keeps the result."""

    @functools.partial(jax.jit, donate_argnums=(3,))
    def run(q, k, v, cache, kv_lens, pages, cu, n):
        sm_scale = q.shape[-1] ** -0.5
        if impl in ("gpu_paged", "gpu_query_blocks"):
            return gpu_kernel_attention(impl, q, k, v, cache, kv_lens, pages, cu, n,
                                        sm_scale=sm_scale, pages_per_block=pages_per_block,
                                        split_probs=split_probs)
        return ragged_paged_attention(
            q, k, v, cache, kv_lens, pages, cu, n, sm_scale=sm_scale, impl=impl
        )

    state = {"cache": jnp.array(inputs[3])}

    def step():
        out, state["cache"] = run(*inputs[:3], state["cache"], *inputs[4:])
        return out

    return step


def dense_peer(shape: Shape, args):
    """Same attention over contiguous per-sequence K/V with XLA's dot_product_attention."""
    q, _, _, cache, _, pages, _, _ = args
    hq, hkv, d = shape.heads
    kv = cache[pages].reshape(shape.num_seqs, -1, hkv, 2, d)[:, : shape.kv_len]
    k, v = kv[..., 0, :], kv[..., 1, :]
    q = q.reshape(shape.num_seqs, shape.q_len, hq, d)
    first = shape.kv_len - shape.q_len
    mask = jnp.arange(shape.kv_len)[None, :] <= first + jnp.arange(shape.q_len)[:, None]
    mask = mask[None, None]

    @jax.jit
    def run(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=d**-0.5)

    return lambda: run(q, k, v)


def copy_bandwidth(iters: int) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted), the attainable HBM
    rate the KV-read bandwidth is compared with."""
    src = jnp.ones((1 << 28,), jnp.float32)
    copy = jax.jit(lambda x: x + 0.0)
    return 2 * src.nbytes / median_time(lambda: copy(src), iters)


def all_layers(fns: list) -> callable:
    """One call of every layer's function, dispatched before any is waited for."""
    return lambda: [fn() for fn in fns]


def median_time(fn, iters: int) -> float:
    jax.block_until_ready(fn())  # compile + warm
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def work(shape: Shape, itemsize: int) -> tuple[float, float]:
    """(bytes of KV each sequence must read, attention FLOPs) for a shape."""
    hq, hkv, d = shape.heads
    kv_bytes = shape.num_seqs * shape.kv_len * 2 * hkv * d * itemsize
    first = shape.kv_len - shape.q_len
    pairs = shape.num_seqs * sum(first + j + 1 for j in range(shape.q_len))
    return kv_bytes * shape.layers, 4.0 * pairs * hq * d * shape.layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impl", default=None, help="comma-separated impls (first = baseline)")
    parser.add_argument("--page-sizes", default="16",
                        help="comma-separated page sizes; each shape runs at each")
    parser.add_argument("--pages-per-block", type=int, default=None,
                        help="gpu_paged: pages per K/V load (default: block_sizes')")
    parser.add_argument("--single-bf16-probs", action="store_true",
                        help="gpu_paged: bf16 P.V in one MMA, not a hi + lo pair")
    parser.add_argument(
        "--shapes",
        default=None,
        help="only shapes whose name starts with one "
        "of these comma-separated prefixes (e.g. decode,prefill 1x)",
    )
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    backend = jax.default_backend()
    defaults = {"tpu": ["tpu"], "gpu": ["gpu", "gpu_paged"]}.get(backend,
                                                                      ["cpu", "cpu_native"])
    impls = args.impl.split(",") if args.impl else ["reference", *defaults]
    prefixes = tuple(args.shapes.split(",")) if args.shapes else ("",)
    rng = np.random.default_rng(0)
    copy_rate = copy_bandwidth(args.iters) if backend != "cpu" else None
    print(f"backend={backend} device={jax.devices()[0].device_kind} dtype={args.dtype}"
          + (f" copy={copy_rate / 1e9:.0f} GB/s" if copy_rate else ""))
    header = (f"{'shape':30s} {'impl':16s} {'ms':>9s} {'KV GB/s':>9s} {'GFLOP/s':>9s} "
              f"{'vs 1st':>7s}" + (f" {'% copy':>7s}" if copy_rate else ""))
    print(header)
    print("-" * len(header))
    page_sizes = [int(p) for p in args.page_sizes.split(",")]
    chosen = [s for s in shapes_for(backend) if s.name.startswith(prefixes)]
    if page_sizes != [16]:
        chosen = [dataclasses.replace(s, name=f"{s.name} p{p}", page_size=p)
                  for s in chosen for p in page_sizes]
    for shape in chosen:
        layer_inputs = [build(shape, dtype, rng) for _ in range(shape.layers)]
        kv_bytes, flops = work(shape, dtype.itemsize)
        ref_time = None
        runs = [(impl, all_layers([paged_fn(impl, inputs, args.pages_per_block,
                                            not args.single_bf16_probs)
                                   for inputs in layer_inputs]))
                for impl in impls]
        runs.append(("xla_dense", all_layers([dense_peer(shape, inputs)
                                              for inputs in layer_inputs])))
        for impl, fn in runs:
            seconds = median_time(fn, args.iters)
            ref_time = ref_time or seconds
            share = f" {100 * kv_bytes / seconds / copy_rate:7.1f}" if copy_rate else ""
            print(
                f"{shape.name:30s} {impl:16s} {seconds * 1e3:9.3f} "
                f"{kv_bytes / seconds / 1e9:9.2f} {flops / seconds / 1e9:9.2f} "
                f"{ref_time / seconds:7.2f}{share}"
            )


if __name__ == "__main__":
    main()
