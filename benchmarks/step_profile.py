"""Time one full engine step (model + attention + sampler) on the default model.

Usage: python benchmarks/step_profile.py [--impl reference,cpu,cpu_native] [--batches 1,8,32]
           [--ctx 192] [--kv-dtype float32|bfloat16] [--iters 5] [--repeats 5] [--compile]
       python benchmarks/step_profile.py --warmup [--impl ...] [--token-bucket-ratio 4]
       add --quantization none for dense float32 weights (default: the GGUF blocks, on CPU),
       --quantized-activations bfloat16 (int8) to round (quantize) activations entering those
       blocks' matmuls,
       --ops N to print the N ops taking most time in the first impl's step (jax.profiler)

For each batch size it runs decode steps (every sequence one new token at context --ctx, page
table width = the bucket's) through `ModelRunner.execute` and prints the median step time, the
same with attention replaced by a no-op (the floor: what the rest of the step costs) and the
attention share. --compile also times the first call of one bucket (trace + compile) per impl.
Median of --repeats medians: the machine is shared, so single runs drift.
--impl takes any of kernels.IMPLEMENTATIONS ("cpu_native": the C++ FFI kernel, built on first use).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm.buckets import BucketSet
from jaxllm.cache.kv_cache import allocate_kv_caches
from jaxllm.config import EngineConfig
from jaxllm.kernels import AttentionMetadata
from jaxllm.loading import load_engine_parts
from jaxllm.model_inputs import StepInputs
from jaxllm.runner import ModelRunner
from jaxllm.step_inputs import SamplingTensorBuilder

PAGE = 16
NUM_PAGES = 1200


def no_attention(_attn):
    """attention_wrapper that skips attention and the cache write (the step's floor)."""

    def attn(q, k, v, cache, md, **_kw):
        return q, cache

    return attn


def decode_arrays(batch: int, ctx: int, buckets: BucketSet) -> StepInputs:
    """A decode step of `batch` sequences at context `ctx`, padded to its bucket."""
    b = buckets.pick(batch, batch, -(-ctx // PAGE))
    t, s, p = b.num_tokens, b.num_seqs, b.pages_per_seq
    rng = np.random.default_rng(batch)
    pages = np.zeros((s, p), np.int32)
    pages[:batch] = 1 + rng.permutation(NUM_PAGES - 1)[: batch * p].reshape(batch, p)
    kv_lens = np.zeros(s, np.int32)
    kv_lens[:batch] = ctx
    cu = np.full(s + 1, batch, np.int32)
    cu[: batch + 1] = np.arange(batch + 1)
    ids = np.zeros(t, np.int32)
    ids[:batch] = rng.integers(0, 1000, batch)
    positions = np.zeros(t, np.int32)
    positions[:batch] = ctx - 1
    logits_indices = np.zeros(s, np.int32)
    logits_indices[:batch] = np.arange(batch)
    return StepInputs(input_ids=ids, positions=positions,
                      attention=AttentionMetadata(kv_lens=kv_lens, page_indices=pages,
                                                  cu_q_lens=cu, num_seqs=np.array([batch], np.int32)),
                      logits_indices=logits_indices, prev_sample_rows=np.full(t, -1, np.int32))


def time_rounds(runs: dict, arrays, tensors, iters: int, repeats: int) -> dict[str, float]:
    """Median over rounds of each variant's median step time (ms). Variants alternate within
    a round, so load from other processes hits them alike; the first call compiles."""
    for runner in runs.values():
        jax.block_until_ready(runner.execute(arrays, tensors)[0])
    medians: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, runner in runs.items():
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                jax.block_until_ready(runner.execute(arrays, tensors)[0])
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
    return {name: 1e3 * statistics.median(m) for name, m in medians.items()}


def op_times(runner: ModelRunner, arrays, tensors, steps: int = 5) -> collections.Counter:
    """Milliseconds per step by XLA op / custom call name, from a jax.profiler trace."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(runner.execute(arrays, tensors)[0])
        trace = next(Path(d).rglob("*.trace.json.gz"))
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    per_op = collections.Counter()
    for e in events:  # op names as XLA gives them: "ffi_call.12" -> "ffi_call"
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(("$", "end:")):
            per_op[e["name"].split(".")[0]] += e["dur"] / 1e3 / steps
    return per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="reference,cpu",
                        help="comma-separated impls, e.g. cpu,cpu_native")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--ctx", type=int, default=192)
    parser.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: model's)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-floor", action="store_true", help="skip the no-attention run")
    parser.add_argument("--compile", action="store_true", help="time each bucket's first call")
    parser.add_argument("--warmup", action="store_true",
                        help="only time ModelRunner.warm_up over every bucket, per impl")
    parser.add_argument("--token-bucket-ratio", type=int, default=2)
    parser.add_argument("--quantization", default="auto",
                        help="EngineConfig.quantization: auto (GGUF blocks on CPU) | none (dense)")
    parser.add_argument("--quantized-activations", default="float32",
                        help="EngineConfig.quantized_activations: float32 | bfloat16 | int8")
    parser.add_argument("--ops", type=int, default=0,
                        help="print the N ops taking most time per step (first impl)")
    args = parser.parse_args()
    parts = load_engine_parts(EngineConfig(quantization=args.quantization,
                                           quantized_activations=args.quantized_activations))
    cfg = parts.model_config
    kv_dtype = args.kv_dtype or parts.dtype
    buckets = BucketSet(512, 64, 4096, PAGE, token_bucket_ratio=args.token_bucket_ratio)
    tensors = SamplingTensorBuilder(cfg.vocab_size)
    if args.warmup:
        for impl in args.impl.split(","):
            runner = ModelRunner(parts.model, allocate_kv_caches(cfg, 64, PAGE, kv_dtype),
                                 attention_impl=impl)
            seconds = runner.warm_up(buckets.all(), tensors.dummy)
            print(f"warm-up impl={impl} {buckets.describe()}: {seconds:.1f} s, "
                  f"{runner.compile_count} programs")
        return
    variants = [(impl, impl, None) for impl in args.impl.split(",")]
    if not args.no_floor:
        variants.append(("no-attn", None, no_attention))
    print(f"kv_dtype={kv_dtype} ctx={args.ctx} {buckets.describe()}")
    runs = {name: ModelRunner(parts.model, allocate_kv_caches(cfg, NUM_PAGES, PAGE, kv_dtype),
                              attention_impl=impl, attention_wrapper=wrapper)
            for name, impl, wrapper in variants}
    print(f"{'variant':10s} {'batch':>5s} {'bucket':>12s} {'step ms':>8s} {'tok/s':>7s} "
          f"{'compile s':>9s}")
    for batch in (int(b) for b in args.batches.split(",")):
        arrays = decode_arrays(batch, args.ctx, buckets)
        rows = arrays.attention.page_indices.shape[0]
        dummy = tensors.dummy(rows)
        compile_s = {}
        for name, runner in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(runner.execute(arrays, dummy)[0])
            compile_s[name] = time.perf_counter() - start
        ms = time_rounds(runs, arrays, dummy, args.iters, args.repeats)
        shape = f"{len(arrays.input_ids)}x{rows}x{arrays.attention.page_indices.shape[1]}"
        for name in runs:
            first = f"{compile_s[name]:9.2f}" if args.compile else ""
            print(f"{name:10s} {batch:5d} {shape:>12s} {ms[name]:8.1f} "
                  f"{1e3 * batch / ms[name]:7.0f} {first}")
        if args.ops:
            name = next(iter(runs))
            top = op_times(runs[name], arrays, dummy).most_common(args.ops)
            print(f"  {name} batch {batch}, ms per step by op: "
                  + ", ".join(f"{op} {t:.2f}" for op, t in top))


if __name__ == "__main__":
    main()
