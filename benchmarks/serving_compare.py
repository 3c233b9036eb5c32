"""Serving benchmark: `python -m jaxllm.server` against llama.cpp's `llama-server`, same run.

    python benchmarks/serving_compare.py [--concurrency 1,8,32,64] [--requests-per-slot 4]
        [--skip-peer] [--llama-server PATH] [--max-num-batched-tokens 512]

Both servers serve the very same GGUF (jaxllm's embedded default model) on 127.0.0.1, one at
a time, and aiperf drives each at every concurrency with 128-token prompts, 128 output tokens
and ignore_eos (streamed /v1/completions). llama-server is restarted per concurrency with
`-np` equal to it and `-t 2`; jaxllm is started once with --max-num-seqs = the largest
concurrency. Prints one table with jaxllm/peer ratios, writes JSON under benchmarks/results/
and a PNG of throughput and TTFT against concurrency. The load tool's CPU share (its process
tree's CPU seconds over wall seconds) is reported, since it competes with the servers on a
small machine. llama-server is built from the llama-cpp-python sdist on the first run and
cached under ~/.cache/jaxllm-bench (about 6 minutes; refused when CI is set).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (  # noqa: E402
    CACHE_DIR,
    LLAMA_CPP_PYTHON_VERSION,
    LoadRun,
    ServerProcess,
    aiperf_command,
    build_llama_server,
    ensure_aiperf,
    free_port,
    run_aiperf,
)

logger = logging.getLogger("serving_compare")
RESULTS = Path(__file__).resolve().parent / "results"
MODEL_NAME = "smol"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,8,32,64",
                   help="comma-separated concurrency levels")
    p.add_argument("--requests-per-slot", type=int, default=4,
                   help="request count = this x concurrency (at least --min-requests)")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--request-count", type=int, default=None,
                   help="fixed request count for every level (overrides the two above)")
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=None, help="base random seed (default: time)")
    p.add_argument("--skip-peer", action="store_true", help="only run jaxllm")
    p.add_argument("--skip-jaxllm", action="store_true", help="only run the peer")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="use this llama-server binary instead of the cached build")
    p.add_argument("--threads", type=int, default=2, help="llama-server -t")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="jaxllm server flag")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="jaxllm server flag (default: 2 x (input + output) tokens)")
    p.add_argument("--jaxllm-arg", action="append", default=[],
                   help="extra flag for python -m jaxllm.server (repeatable, e.g. "
                        "--jaxllm-arg=--dtype=bfloat16)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def concurrency_levels(spec: str) -> list[int]:
    levels = sorted({int(c) for c in spec.split(",") if c.strip()})
    if not levels or levels[0] < 1:
        raise ValueError(f"--concurrency needs positive integers, got {spec!r}")
    return levels


def request_count(args: argparse.Namespace, concurrency: int) -> int:
    if args.request_count is not None:
        return args.request_count
    return max(args.min_requests, args.requests_per_slot * concurrency)


def save_tokenizer(gguf: Path, directory: Path) -> Path:
    """aiperf needs a local tokenizer directory: write the default model's there."""
    from jaxllm.tokenizer import load_tokenizer

    if not (directory / "tokenizer.json").is_file():
        load_tokenizer(gguf).save(directory)
    return directory


def drive(aiperf: Path, server_url: str, tokdir: Path, levels: list[int], args: argparse.Namespace,
          work: Path, label: str, seed: int, extra_inputs=()) -> dict[int, LoadRun]:
    runs = {}
    for c in levels:
        n = request_count(args, c)
        art = work / f"{label}-c{c}"
        argv = aiperf_command(aiperf, server_url, MODEL_NAME, tokdir, c, n, seed + c, art,
                              args.input_tokens, args.output_tokens, extra_inputs,
                              args.warmup_requests)
        logger.info("%s: concurrency %d, %d requests", label, c, n)
        runs[c] = run_aiperf(argv, art, c, n)
        logger.info("%s c=%d: %.1f tok/s, TTFT p50 %.0f ms, %d failed, aiperf %.2f cores",
                    label, c, runs[c].output_tok_s, runs[c].ttft_p50_ms, runs[c].failed,
                    runs[c].load_tool_cores)
    return runs


def run_jaxllm(gguf: Path, tokdir: Path, levels: list[int], args, work: Path, seed: int):
    max_len = args.max_model_len or 2 * (args.input_tokens + args.output_tokens)
    port = free_port()
    argv = [sys.executable, "-m", "jaxllm.server", "--model", str(gguf), "--port", str(port),
            "--served-model-name", MODEL_NAME, "--max-num-seqs", str(max(levels)),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--max-model-len", str(max_len),
            "--compilation-cache-dir", str(CACHE_DIR / "xla-cache"),
            "--log-level", "warning", *args.jaxllm_arg]
    with ServerProcess("jaxllm", argv, port, work / "jaxllm-server.log") as server:
        runs = drive(args.aiperf, server.url, tokdir, levels, args, work, "jaxllm", seed)
        return runs, {"argv": argv[1:], "ready_s": server.ready_s}


def run_peer(binary: Path, gguf: Path, tokdir: Path, levels: list[int], args, work: Path,
             seed: int):
    runs, info = {}, {"binary": str(binary), "argv": {}}
    per_slot_ctx = 2 * (args.input_tokens + args.output_tokens)
    for c in levels:
        port = free_port()
        argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(c), "-c", str(c * per_slot_ctx), "-t", str(args.threads),
                "--no-webui", "--alias", MODEL_NAME]
        info["argv"][c] = argv[1:]
        with ServerProcess("llama-server", argv, port, work / f"llama-server-c{c}.log") as server:
            # cache_prompt false: otherwise repeated prefixes are served from its cache.
            runs.update(drive(args.aiperf, server.url, tokdir, [c], args, work, "llama-server", seed,
                              extra_inputs=["cache_prompt:false"]))
    return runs, info


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def format_table(jax_runs: dict[int, LoadRun], peer_runs: dict[int, LoadRun]) -> str:
    cols = ("server", "conc", "reqs", "fail", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
            "ITL p50 ms", "ITL p99 ms", "aiperf cores")
    rows = []
    for c in sorted(set(jax_runs) | set(peer_runs)):
        for name, runs in (("jaxllm", jax_runs), ("llama-server", peer_runs)):
            r = runs.get(c)
            if r is not None:
                rows.append((name, c, r.request_count, r.failed, f"{r.output_tok_s:.1f}",
                             f"{r.ttft_p50_ms:.0f}", f"{r.ttft_p99_ms:.0f}",
                             f"{r.itl_p50_ms:.1f}", f"{r.itl_p99_ms:.1f}",
                             f"{r.load_tool_cores:.2f}"))
        if c in jax_runs and c in peer_runs:
            j, p = jax_runs[c], peer_runs[c]
            rows.append(("jaxllm/peer", c, "", "", f"{_ratio(j.output_tok_s, p.output_tok_s):.2f}x",
                         f"{_ratio(j.ttft_p50_ms, p.ttft_p50_ms):.2f}x",
                         f"{_ratio(j.ttft_p99_ms, p.ttft_p99_ms):.2f}x",
                         f"{_ratio(j.itl_p50_ms, p.itl_p50_ms):.2f}x",
                         f"{_ratio(j.itl_p99_ms, p.itl_p99_ms):.2f}x", ""))
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=False)]
    line = lambda r: "| " + " | ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep, *(line(r) for r in rows)])


def plot(jax_runs: dict[int, LoadRun], peer_runs: dict[int, LoadRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator, ScalarFormatter

    fig, (ax_tput, ax_ttft) = plt.subplots(1, 2, figsize=(10, 4))
    levels = sorted(set(jax_runs) | set(peer_runs))
    for name, runs, marker, color in (("jaxllm", jax_runs, "o", "C0"),
                                      ("llama-server", peer_runs, "s", "C1")):
        if not runs:
            continue
        cs = sorted(runs)
        ax_tput.plot(cs, [runs[c].output_tok_s for c in cs], marker + "-", color=color, label=name)
        ax_ttft.plot(cs, [runs[c].ttft_p50_ms / 1e3 for c in cs], marker + "-", color=color,
                     label=f"{name} p50")
        ax_ttft.plot(cs, [runs[c].ttft_p99_ms / 1e3 for c in cs], marker + ":", color=color,
                     alpha=0.6, label=f"{name} p99")
    ax_tput.set(xlabel="concurrency", ylabel="output tokens / s", title="throughput")
    ax_tput.set_ylim(bottom=0)
    ax_ttft.set(xlabel="concurrency", ylabel="seconds", title="time to first token",
                yscale="log")
    ax_ttft.yaxis.set_major_formatter(ScalarFormatter())
    ax_ttft.yaxis.set_minor_formatter(ScalarFormatter())
    for ax in (ax_tput, ax_ttft):
        ax.set_xscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured levels as ticks
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION}
    for dist in ("jax", "jaxlib", "flax", "aiperf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    try:
        import os

        out["cpu_count"] = str(os.cpu_count())
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                              "")
    except OSError:
        pass
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    levels = concurrency_levels(args.concurrency)
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    from jaxllm.default_model import default_model_path

    gguf = default_model_path()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = CACHE_DIR / "runs" / stamp
    tokdir = save_tokenizer(gguf, CACHE_DIR / "tokenizer")
    args.aiperf = ensure_aiperf()
    binary = None
    if not args.skip_peer:
        binary = args.llama_server or build_llama_server()
    jax_runs, peer_runs, info = {}, {}, {}
    if not args.skip_jaxllm:
        jax_runs, info["jaxllm"] = run_jaxllm(gguf, tokdir, levels, args, work, seed)
    if binary is not None:
        peer_runs, info["llama_server"] = run_peer(binary, gguf, tokdir, levels, args, work, seed)
    table = format_table(jax_runs, peer_runs)
    print(table)
    for c, r in sorted(jax_runs.items()):
        e = r.engine
        if e:
            print(f"jaxllm c={c}: {e['steps_per_s']:.2f} steps/s = {e['ms_per_step']:.0f} ms/step, "
                  f"{e['tokens_per_step']:.1f} generated tokens/step, mean running "
                  f"{e['mean_running']:.1f}, compilations during the run {e['compiles_during_run']:.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "serving_compare", "date": stamp, "seed": seed, "model": str(gguf),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": _versions(), "servers": info, "artifacts": str(work),
        "jaxllm": {c: _summary(r) for c, r in jax_runs.items()},
        "llama_server": {c: _summary(r) for c, r in peer_runs.items()},
        "table": table,
    }
    json_path = args.out / f"serving_{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2))
    png_path = args.out / f"serving_{stamp}.png"
    plot(jax_runs, peer_runs, png_path)
    print(f"wrote {json_path} and {png_path}; aiperf artifacts and server logs in {work}")
    return 0


def _summary(r: LoadRun) -> dict:
    return {"request_count": r.request_count, "completed": r.completed, "failed": r.failed,
            "output_tok_s": r.output_tok_s, "ttft_p50_ms": r.ttft_p50_ms,
            "ttft_p99_ms": r.ttft_p99_ms, "itl_p50_ms": r.itl_p50_ms, "itl_p99_ms": r.itl_p99_ms,
            "output_tokens_mean": r.output_tokens_mean, "wall_s": r.wall_s, "load_tool_cpu_s": r.load_tool_cpu_s,
            "load_tool_cores": r.load_tool_cores, "engine": r.engine}


if __name__ == "__main__":
    sys.exit(main())
