"""Time one full engine step (model + attention + sampler) on the default model.

Usage: python benchmarks/step_profile.py [--impl reference|cpu|...] [--batches 1,8,32]
           [--ctx 192] [--kv-dtype float32|bfloat16] [--iters 10] [--repeats 3] [--compile]

For each batch size it runs decode steps (every sequence one new token at context --ctx, page
table width = the bucket's) through `ModelRunner.execute` and prints the median step time, the
same with attention replaced by a no-op (the floor: what the rest of the step costs) and the
attention share. --compile also times the first call of one bucket (trace + compile) per impl.
Median of --repeats medians: the machine is shared, so single runs drift.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jaxllm.buckets import BucketSet
from jaxllm.cache.kv_cache import allocate_kv_caches
from jaxllm.config import EngineConfig
from jaxllm.loading import load_engine_parts
from jaxllm.runner import ModelRunner
from jaxllm.step_inputs import SamplingTensorBuilder

PAGE = 16
NUM_PAGES = 1200


def no_attention(_attn):
    """attention_wrapper that skips attention and the cache write (the step's floor)."""

    def attn(q, k, v, cache, md, **_kw):
        return q, cache

    return attn


def decode_arrays(batch: int, ctx: int, buckets: BucketSet) -> dict[str, np.ndarray]:
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
    return dict(input_ids=ids, positions=positions, kv_lens=kv_lens, page_indices=pages,
                cu_q_lens=cu, num_seqs=np.array([batch], np.int32),
                logits_indices=logits_indices)


def time_steps(runner: ModelRunner, arrays, tensors, iters: int, repeats: int) -> float:
    """Median over repeats of the median step time (ms); first call compiles."""
    jax.block_until_ready(runner.execute(arrays, tensors)[0])
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(runner.execute(arrays, tensors)[0])
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return 1e3 * statistics.median(medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="cpu")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--ctx", type=int, default=192)
    parser.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: model's)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-floor", action="store_true", help="skip the no-attention run")
    parser.add_argument("--compile", action="store_true", help="time one bucket's compile")
    args = parser.parse_args()
    parts = load_engine_parts(EngineConfig())
    cfg = parts.model_config
    kv_dtype = args.kv_dtype or parts.dtype
    buckets = BucketSet(512, 64, 4096, PAGE)
    tensors = SamplingTensorBuilder(cfg.vocab_size)
    batches = [int(b) for b in args.batches.split(",")]
    variants = [(args.impl, None)] + ([] if args.no_floor else [("no-attn", no_attention)])
    print(f"impl={args.impl} kv_dtype={kv_dtype} ctx={args.ctx} {buckets.describe()}")
    print(f"{'variant':10s} {'batch':>5s} {'bucket':>14s} {'step ms':>8s} {'tok/s':>7s}")
    for name, wrapper in variants:
        kv = allocate_kv_caches(cfg, NUM_PAGES, PAGE, kv_dtype)
        impl = None if name == "no-attn" else args.impl
        runner = ModelRunner(parts.model, kv, attention_impl=impl, attention_wrapper=wrapper)
        for batch in batches:
            arrays = decode_arrays(batch, args.ctx, buckets)
            rows = arrays["page_indices"].shape[0]
            if args.compile:
                start = time.perf_counter()
                jax.block_until_ready(runner.execute(arrays, tensors.dummy(rows))[0])
                print(f"{name:10s} {batch:5d} first call (compile) {time.perf_counter() - start:.2f} s")
            ms = time_steps(runner, arrays, tensors.dummy(rows), args.iters, args.repeats)
            shape = f"{len(arrays['input_ids'])}x{rows}x{arrays['page_indices'].shape[1]}"
            print(f"{name:10s} {batch:5d} {shape:>14s} {ms:8.1f} {1e3 * batch / ms:7.0f}")


if __name__ == "__main__":
    main()
