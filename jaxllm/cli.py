"""The `jaxllm` console script: serve, convert, generate, bench."""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxllm generate", description="Generate from a prompt.")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--model", default=None, help="HF dir, jaxllm dir or .gguf (default: embedded)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = p.parse_args(argv)

    from jaxllm import LLM, SamplingParams

    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, dtype=args.dtype,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": t}] for t in args.prompt], params)
    else:
        outs = llm.generate(args.prompt, params)
    for prompt, out in zip(args.prompt, outs, strict=True):
        sys.stdout.write(f"### {prompt}\n{out.outputs[0].text}\n")
    return 0


def _bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxllm bench", description="Run a benchmark script.")
    p.add_argument("which", choices=["offline", "serve", "attention"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    scripts = {"offline": "offline_throughput.py", "serve": "serving_compare.py",
               "attention": "attention_bench.py"}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / scripts[args.which]
    if not script.is_file():
        sys.stderr.write(f"benchmark script {script} not found (benchmarks/ ships with the "
                         "source checkout)\n")
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("serve", "convert", "generate", "bench")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        sys.stderr.write(f"usage: jaxllm {{{','.join(commands)}}} ...\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from jaxllm.server.__main__ import main as serve_main

        return serve_main(rest)
    if cmd == "convert":
        from jaxllm.conversions import main as convert_main

        return convert_main(rest)
    if cmd == "generate":
        return _generate(rest)
    return _bench(rest)


if __name__ == "__main__":
    raise SystemExit(main())
