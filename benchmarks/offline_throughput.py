"""Offline throughput: jaxllm `LLM.generate` against HF transformers `generate`, same run.

    python benchmarks/offline_throughput.py [--num-requests 32] [--prompt-len 128]
        [--output-len 128] [--skip-hf] [--skip-warm-start]
        [--variant default] [--variant quantized_activations=bfloat16,kv_cache_dtype=bfloat16]

Prints one table (output tok/s, ratio to the peer) plus warm-up times (cold and with the
persistent compilation cache) and the host gap between device steps; writes JSON under
benchmarks/results/. Both sides run the default model on the same random prompts, with EOS
ignored so every request makes exactly --output-len tokens. HF dequantizes the GGUF to fp32;
jaxllm keeps its blocks (on CPU) and runs once per --variant: engine options as
`name=value,...` (`default`: none). Without --variant: the exact default (float32 activations
and KV cache), the fast one (activations entering the block matmuls and the KV cache in
bfloat16) and the fastest (those activations quantized to int8, as llama.cpp computes; KV
cache bfloat16).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab - 100, size=length).tolist() for _ in range(n)]


def run_jaxllm(prompts, output_len: int, batch: int, extra: dict) -> dict:
    from jaxllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(max_num_seqs=max(batch, 1), **extra)
    load_s = time.perf_counter() - t0
    stats = llm.engine.get_stats()
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    results = {}
    for b in sorted({1, batch}):
        chunk = prompts[:b] if b > 1 else prompts[:1]
        llm.generate(chunk[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        gaps = []
        t = time.perf_counter()
        # drive the engine directly to sample the host gap between steps
        engine = llm.engine
        for i, p in enumerate(chunk):
            engine.add_request(p, params, f"b{b}-{i}")
        step_times = []
        while engine.has_unfinished_requests():
            engine.step()
            s = engine.get_stats()
            gaps.append(s.host_gap_s)
            step_times.append(s.step_time_s)
        elapsed = time.perf_counter() - t
        results[b] = {"output_tok_s": b * output_len / elapsed, "elapsed_s": elapsed,
                      "host_gap_ms_median": 1e3 * statistics.median(gaps[1:] or [0.0]),
                      "step_ms_median": 1e3 * statistics.median(step_times)}
    return {"load_and_warmup_s": load_s, "warmup_s": stats.warmup_time_s,
            "compiled_shapes": stats.compile_count,
            "recompiles": llm.engine.get_stats().recompile_count, "by_batch": results}


def run_hf(prompts, output_len: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jaxllm.default_model import default_model_path

    torch.set_num_threads(2)
    gguf = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    ids = torch.tensor(prompts[:batch])
    with torch.no_grad():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                       min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - t
    return {"output_tok_s": batch * output_len / elapsed, "elapsed_s": elapsed}


def warm_start_seconds(cache_dir: str) -> list[float]:
    """Warm-up time of two fresh processes sharing a persistent compilation cache."""
    code = ("import json,sys; from jaxllm import LLM; "
            f"llm = LLM(max_num_seqs=32, compilation_cache_dir={cache_dir!r}); "
            "print(json.dumps(llm.engine.get_stats().warmup_time_s))")
    out = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        out.append(float(res.stdout.strip().splitlines()[-1]))
    return out


DEFAULT_VARIANTS = ("default", "quantized_activations=bfloat16,kv_cache_dtype=bfloat16",
                    "quantized_activations=int8,kv_cache_dtype=bfloat16")


def parse_variant(text: str) -> dict:
    """`name=value,...` -> engine keyword arguments (`default`: none); ints stay ints."""
    if text == "default":
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant items are name=value, got {item!r}")
        out[name.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-warm-start", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--variant", action="append", default=None,
                    help="engine options name=value,... for one jaxllm run (repeatable)")
    args = ap.parse_args()

    prompts = random_prompts(args.num_requests, args.prompt_len, 49152, args.seed)
    variants = args.variant or list(DEFAULT_VARIANTS)
    runs = {v: run_jaxllm(prompts, args.output_len, args.num_requests,
                          {"max_num_batched_tokens": args.max_num_batched_tokens,
                           **parse_variant(v)})
            for v in variants}
    hf = None if args.skip_hf else run_hf(prompts, args.output_len, args.num_requests)
    warm = None
    if not args.skip_warm_start:
        with tempfile.TemporaryDirectory() as d:
            warm = warm_start_seconds(d)

    b = args.num_requests
    rows = [(f"jaxllm ({a})", batch, jl["by_batch"][batch]["output_tok_s"])
            for a, jl in runs.items() for batch in (b, 1)]
    if hf:
        rows.append(("HF transformers (fp32, padded)", b, hf["output_tok_s"]))
    peer = hf["output_tok_s"] if hf else None
    print(f"\nOffline throughput, default model, {b} requests x {args.prompt_len} prompt / "
          f"{args.output_len} output tokens, CPU {platform.processor() or platform.machine()}")
    print(f"| engine | batch | output tok/s | vs HF batch {b} |")
    print("|---|---|---|---|")
    for name, batch, tps in rows:
        ratio = f"{tps / peer:.2f}x" if peer else "-"
        print(f"| {name} | {batch} | {tps:.1f} | {ratio} |")
    jl = runs[variants[0]]
    print(f"\nwarm-up ({variants[0]}, compile {jl['compiled_shapes']} programs): cold "
          f"{jl['warmup_s']:.1f} s"
          + (f"; with persistent cache: first {warm[0]:.1f} s, second {warm[1]:.1f} s" if warm else ""))
    for a, jl in runs.items():
        for batch in sorted(jl["by_batch"]):
            r = jl["by_batch"][batch]
            print(f"{a} batch {batch}: median step {r['step_ms_median']:.1f} ms, median host gap "
                  f"between steps {r['host_gap_ms_median']:.2f} ms")
        print(f"{a}: recompilations after warm-up: {jl['recompiles']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"offline_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "jaxllm": runs, "hf": hf,
                               "warm_start_s": warm}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
