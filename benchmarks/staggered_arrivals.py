"""Continuous arrivals: the scheduler's bucket-aligned prefill on and off, same workload.

    python benchmarks/staggered_arrivals.py [--requests 96] [--slots 32]

Keeps `--slots` requests in flight on one `LLMEngine` (a new one arrives as soon as one
finishes), 128-token random prompts and output lengths drawn from 64..192, so prompts join
steps full of decodes at staggered times — what a server sees, unlike the offline benchmark
whose prompts all come first. Runs the workload with `align_prefill_to_buckets` on and off
and prints output tok/s and step counts; JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def run(engine, prompts: list[list[int]], lengths: np.ndarray, slots: int) -> dict:
    from jaxllm import SamplingParams

    steps_before = engine.get_stats().steps_total
    next_up, active, generated = 0, 0, 0
    start = time.perf_counter()
    while next_up < len(prompts) or engine.has_unfinished_requests():
        while active < slots and next_up < len(prompts):
            params = SamplingParams(temperature=0.0, max_tokens=int(lengths[next_up]),
                                    ignore_eos=True)
            engine.add_request(prompts[next_up], params, f"r{next_up}")
            next_up, active = next_up + 1, active + 1
        for out in engine.step():
            if out.finished:
                active -= 1
                generated += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    return {"output_tok_s": generated / elapsed, "elapsed_s": elapsed,
            "steps": engine.get_stats().steps_total - steps_before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from jaxllm import LLM

    llm = LLM(max_num_seqs=args.slots, max_model_len=512)
    engine = llm.engine
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(64, 193, args.requests)
    prompts = [rng.integers(100, 40000, 128).tolist() for _ in range(args.requests)]
    results = {}
    for align in (True, False):
        engine.scheduler.config = dataclasses.replace(engine.scheduler.config,
                                                      align_prefill_to_buckets=align)
        results["on" if align else "off"] = run(engine, prompts, lengths, args.slots)
    on, off = results["on"], results["off"]
    print(f"\nStaggered arrivals, default model, {args.requests} requests, {args.slots} in flight")
    print("| align_prefill_to_buckets | output tok/s | steps | vs off |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['output_tok_s']:.1f} | {r['steps']} | "
              f"{r['output_tok_s'] / off['output_tok_s']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"staggered_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                "results": results, "ratio_on_off":
                                on["output_tok_s"] / off["output_tok_s"]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
