"""Load time and host memory of a random-weight 1B-shaped bf16 checkpoint: whole checkpoint
read to host then placed (the path GGUF and padded-head models take) vs read straight into
device shards (jaxllm.conversions.sharded_hf, what the engine uses for HF directories).

    python -m benchmarks.load_bench [--dir /tmp/jaxllm-load-bench] [--tp 1 8]

Writes the checkpoint once (hidden 2048, 16 layers, intermediate 8192, vocab 49152, 32/8
heads; ~2.3 GB of bf16 safetensors in 1 GB shards), then loads it in a fresh process per run
(peak RSS is per process) on 1 CPU device and on `tp` simulated CPU devices, as bfloat16.
Reports seconds, peak RSS (includes the file's memory-mapped pages, which are page cache)
and peak anonymous memory (allocations; on CPU this includes the device buffers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxllm.config import ModelConfig
from tests.conversions.random_hf_dir import write_random_hf_dir
from tests.sharding.tiny import run_python

SHAPE_1B = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=2048,
                       intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                       head_dim=64, rope_theta=500000.0, max_position_embeddings=4096,
                       torch_dtype="bfloat16")


def run(path: Path, mode: str, tp: int) -> dict:
    proc = run_python(["-m", "tests.conversions.load_memory_worker", str(path), mode,
                       "bfloat16", str(tp)], devices=tp, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/jaxllm-load-bench")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").is_file():
        write_random_hf_dir(path, SHAPE_1B, seed=0, dtype="bfloat16")
    gib = 1 << 30
    print("| devices | path | seconds | peak RSS GiB | peak anon GiB | placed GiB | largest tensor MiB |")
    print("|---|---|---|---|---|---|---|")
    for tp in args.tp:
        for mode in ("host", "placed"):
            r = run(path, mode, tp)
            print(f"| {tp} | {mode} | {r['seconds']:.1f} | {r['peak_rss'] / gib:.2f} | "
                  f"{r['anon_growth'] / gib:.2f} | {r['placed_bytes'] / gib:.2f} | "
                  f"{r['largest'] / (1 << 20):.0f} |", flush=True)


if __name__ == "__main__":
    main()
