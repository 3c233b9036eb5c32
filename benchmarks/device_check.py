"""One device check: the GPU test tier and the accelerator benchmarks, each under its own
deadline, within 8 minutes, summarised in one JSON + Markdown file.

    python benchmarks/device_check.py --out OUT_DIR          # = make device-check OUT=...
    python benchmarks/device_check.py --tiny --out OUT_DIR   # the same, tiny shapes, on CPU

Made for a machine with an accelerator and only this repository: it installs nothing and reads
nothing from the network (random-weight models, a tokenizer made on the spot or the default
model's when installed; benchmarks/random_model.py). Stages, each a subprocess (one device
user at a time: JAX preallocates most of a GPU's memory):
  probe       backend, device, versions
  gpu_tier    pytest tests/gpu (skipped cleanly where JAX sees no GPU; not run on TPU)
  attention   benchmarks/attention_bench.py (reference vs the platform's kernel, xla_dense peer)
  decode      benchmarks/gpu_decode.py (8B-shaped decode step; HF peer with --decode-hf)
  make_model  a random 1B-shaped Llama (bf16) + tokenizer, written with save_pretrained
  e2e_jaxllm  LLM.generate, N requests x 128 prompt / 128 output tokens, platform defaults:
              load + warm-up seconds (cold, saving programs to OUT/compile_cache), output tok/s
  restart     the same engine started again from OUT/compile_cache: start-up seconds
  e2e_hf      HF transformers generate on the same checkpoint, same prompts, same device
              (one batch of N equal-length prompts; CUDA only: skipped on TPU)
A stage that fails or runs out of time is recorded as such; the next one still runs. --tiny
runs every stage on CPU with tiny shapes (tests/test_device_check.py) so it cannot rot unseen.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
TOTAL_BUDGET_S = 480.0


@dataclass(frozen=True)
class Plan:
    """What each stage runs with: the full check or the --tiny CPU one."""

    tiny: bool
    shape: str  # benchmarks/random_model.SHAPES key
    dtype: str
    requests: int
    prompt_len: int
    output_len: int
    budgets: dict[str, float]
    engine_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, tiny: bool, requests: int | None, engine_args: dict[str, Any]) -> Plan:
        if tiny:
            budgets = dict(probe=60, gpu_tier=90, attention=90, decode=120, make_model=90,
                           e2e_jaxllm=120, restart=90, e2e_hf=90)
            small = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=32)
            return cls(True, "tiny", "float32", requests or 8, 16, 16, budgets,
                       {**small, **engine_args})
        budgets = dict(probe=20, gpu_tier=125, attention=40, decode=70, make_model=45,
                       e2e_jaxllm=110, restart=30, e2e_hf=40)
        return cls(False, "1b", "bfloat16", requests or 256, 128, 128, budgets, engine_args)


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    summary: str = ""  # one line for the Markdown table
    data: dict[str, Any] = field(default_factory=dict)
    output_tail: str = ""


# -- stages run in their own process --------------------------------------------------------
def stage_probe(plan: Plan, out: Path) -> dict[str, Any]:
    import jax

    info: dict[str, Any] = {"backend": jax.default_backend(),
                            "device_kind": jax.devices()[0].device_kind,
                            "device_count": jax.device_count(), "jax": jax.__version__,
                            "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    from jaxllm.config import EngineConfig
    from jaxllm.platform_defaults import describe, resolve_engine_config

    for package in ("torch", "transformers", "flax"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None

    info["defaults"] = describe(resolve_engine_config(EngineConfig()))
    info["commit"] = _git_commit()
    return info


def stage_make_model(plan: Plan, out: Path) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.random_model import SHAPES, make_random_model

    device = "cuda" if torch.cuda.is_available() and not plan.tiny else "cpu"
    t = time.perf_counter()
    # tiny: a trained BPE (vocab 2048) keeps every program small; else SmolLM2's when installed
    path = make_random_model(out / "model", SHAPES[plan.shape], dtype=plan.dtype, seed=0,
                             device=device, prefer_default_tokenizer=not plan.tiny)
    config = json.loads((path / "config.json").read_text())
    return {"path": str(path), "seconds": time.perf_counter() - t, "vocab_size":
            config["vocab_size"], "shape": plan.shape, "dtype": plan.dtype}


def _prompts(plan: Plan, vocab_size: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(3, vocab_size, size=(plan.requests, plan.prompt_len)).tolist()


def _start_engine(plan: Plan, out: Path):
    """(LLM, seconds to construct it, model info): the engine with the plan's arguments and
    its programs saved to / loaded from OUT/compile_cache."""
    from jaxllm import LLM

    model = json.loads((out / "stage_make_model.json").read_text())
    args = {"compilation_cache_dir": str(out / "compile_cache"), **plan.engine_args}
    t = time.perf_counter()
    llm = LLM(model["path"], **args)
    return llm, time.perf_counter() - t, model


def stage_e2e_jaxllm(plan: Plan, out: Path) -> dict[str, Any]:
    from jaxllm import SamplingParams
    from jaxllm.platform_defaults import describe, resolve_engine_config

    llm, start_s, model = _start_engine(plan, out)
    stats = llm.engine.get_stats()
    prompts = _prompts(plan, model["vocab_size"])
    params = SamplingParams(temperature=0.0, max_tokens=plan.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tok_s": tokens / seconds, "output_tokens": tokens, "seconds": seconds,
            "start_s": start_s, "warmup_s": stats.warmup_time_s,
            "programs": llm.engine.get_stats().compile_count,
            "recompiles": llm.engine.runner.recompiles,
            "defaults": describe(resolve_engine_config(llm.engine.config)),
            "engine_args": plan.engine_args}


def stage_restart(plan: Plan, out: Path) -> dict[str, Any]:
    from jaxllm import SamplingParams

    llm, start_s, model = _start_engine(plan, out)
    stats = llm.engine.get_stats()
    outs = llm.generate(_prompts(plan, model["vocab_size"])[:4],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    return {"start_s": start_s, "warmup_s": stats.warmup_time_s,
            "loaded_programs": llm.engine.runner.loaded_programs,
            "programs": stats.compile_count, "recompiles": llm.engine.runner.recompiles}


def stage_e2e_hf(plan: Plan, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model_info = json.loads((out / "stage_make_model.json").read_text())
    device = "cuda" if torch.cuda.is_available() and not plan.tiny else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_info["path"],
                                                 dtype=getattr(torch, plan.dtype)).to(device)
    model.eval()
    ids = torch.tensor(_prompts(plan, model_info["vocab_size"]), device=device)
    mask = torch.ones_like(ids)

    def generate(new_tokens: int):
        with torch.no_grad():
            out_ids = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out_ids

    generate(2)
    t = time.perf_counter()
    out_ids = generate(plan.output_len)
    seconds = time.perf_counter() - t
    tokens = (out_ids.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"output_tok_s": tokens / seconds, "output_tokens": int(tokens), "seconds": seconds,
            "device": device, "torch": torch.__version__}


IN_PROCESS = {"probe": stage_probe, "make_model": stage_make_model,
              "e2e_jaxllm": stage_e2e_jaxllm, "restart": stage_restart, "e2e_hf": stage_e2e_hf}


# -- the orchestrator -----------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _env(plan: Plan) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if plan.tiny:  # JAX's and CUDA's own switches: the tiny check never touches a device
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(name: str, cmd: list[str], plan: Plan, budget: float) -> tuple[str, float, str]:
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(plan), capture_output=True, text=True,
                              timeout=budget)
        status = "ok" if proc.returncode == 0 else "failed"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "")
                         for x in (e.stdout, e.stderr))
    return status, time.perf_counter() - t, output


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")
            or re.match(r"^\S.*\s[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", line)]


def run_stage(name: str, plan: Plan, out: Path, budget: float, args: argparse.Namespace,
              backend: str | None) -> StageResult:
    py = sys.executable
    if name in IN_PROCESS:
        cmd = [py, str(SCRIPT), "--stage", name, "--out", str(out), "--requests",
               str(plan.requests), *(["--tiny"] if plan.tiny else []),
               *[f"--engine-arg={k}={json.dumps(v)}" for k, v in args.engine_arg]]
        if name == "e2e_hf" and backend == "tpu":
            return StageResult(name, "skipped", 0.0, "HF transformers has no TPU path here")
    elif name == "gpu_tier":
        if backend == "tpu":
            return StageResult(name, "skipped", 0.0, "GPU tier: not a GPU")
        cmd = [py, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-rs"]
    elif name == "attention":
        cmd = [py, "benchmarks/attention_bench.py", "--dtype", "bfloat16"]
        cmd += ["--iters", "2", "--shapes", "decode 32x256", "--impl", "reference,cpu"] \
            if plan.tiny else ["--iters", "20"]
    elif name == "decode":
        cmd = [py, "benchmarks/gpu_decode.py"]
        cmd += ["--tiny", "--skip-hf", "--batches", "1"] if plan.tiny else (
            ["--batches", "1,64"] + ([] if args.decode_hf else ["--skip-hf"]))
    else:
        raise ValueError(f"unknown stage {name}")
    status, seconds, output = _run(name, cmd, plan, budget)
    result = StageResult(name, status, seconds, output_tail=_tail(output))
    stage_json = out / f"stage_{name}.json"
    if name in IN_PROCESS and status == "ok" and stage_json.is_file():
        result.data = json.loads(stage_json.read_text())
    if name == "gpu_tier":
        counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", output)
        result.data = {kind: int(n) for n, kind in counts}
        result.summary = ", ".join(f"{n} {k}" for k, n in result.data.items())
        if status == "ok" and result.data.get("skipped") and not result.data.get("passed"):
            result.status = "skipped"
    elif name in ("attention", "decode"):
        result.data = {"table": _table_lines(output)}
        result.summary = f"{len(result.data['table'])} rows"
    elif name == "probe" and result.data:
        result.summary = (f"{result.data['backend']} {result.data['device_kind']}, jax "
                          f"{result.data['jax']}, commit {result.data['commit']}")
    elif name in ("e2e_jaxllm", "e2e_hf") and result.data:
        d = result.data
        result.summary = f"{d['output_tok_s']:.1f} output tok/s"
        if name == "e2e_jaxllm":
            result.summary += f", start {d['start_s']:.1f} s (warm-up {d['warmup_s']:.1f} s)"
    elif name == "restart" and result.data:
        d = result.data
        result.summary = (f"start {d['start_s']:.1f} s, {d['loaded_programs']} of "
                          f"{d['programs']} programs loaded")
    elif name == "make_model" and result.data:
        result.summary = f"{result.data['shape']} {result.data['dtype']} in " \
                         f"{result.data['seconds']:.1f} s"
    return result


def write_summary(out: Path, plan: Plan, results: list[StageResult], total_s: float) -> dict:
    by_name = {r.name: r for r in results}
    jl, hf = by_name.get("e2e_jaxllm"), by_name.get("e2e_hf")
    ratio = None
    if jl and hf and jl.data.get("output_tok_s") and hf.data.get("output_tok_s"):
        ratio = jl.data["output_tok_s"] / hf.data["output_tok_s"]
    summary = {"tiny": plan.tiny, "total_s": total_s, "budget_s": TOTAL_BUDGET_S,
               "plan": asdict(plan), "jaxllm_vs_hf": ratio,
               "stages": [asdict(r) for r in results]}
    (out / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    probe = by_name.get("probe")
    lines = ["# Device check", ""]
    if probe and probe.data:
        p = probe.data
        lines += [f"{p['backend']} / {p['device_kind']} x{p['device_count']}, jax {p['jax']}, "
                  f"torch {p.get('torch')}, commit {p.get('commit')}; defaults: {p['defaults']}", ""]
    lines += [f"Total {total_s:.0f} s of {TOTAL_BUDGET_S:.0f} s. End to end: {plan.requests} "
              f"requests x {plan.prompt_len}/{plan.output_len} tokens, {plan.shape} "
              f"{plan.dtype}" + (f": jaxllm / HF = **{ratio:.2f}x**" if ratio else ""), "",
              "| stage | status | seconds | summary |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.summary} |" for r in results]
    for r in results:
        if r.data.get("table"):
            lines += ["", f"## {r.name}", "", "```", *r.data["table"], "```"]
        if r.status in ("failed", "timeout"):
            lines += ["", f"## {r.name}: {r.status}", "", "```", r.output_tail, "```"]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    return summary


STAGE_ORDER = ("probe", "gpu_tier", "attention", "decode", "make_model", "e2e_jaxllm", "restart",
               "e2e_hf")


def _engine_arg(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for device_check.json/.md")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds)")
    ap.add_argument("--requests", type=int, default=None, help="end-to-end requests (256)")
    ap.add_argument("--engine-arg", action="append", default=[], type=_engine_arg,
                    help="KEY=VALUE passed to LLM(...) in e2e_jaxllm (repeatable)")
    ap.add_argument("--decode-hf", action="store_true", help="gpu_decode.py with its HF peer")
    ap.add_argument("--only", default=None, help="comma-separated stages (default: all)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.make(args.tiny, args.requests, dict(args.engine_arg))
    if args.stage:
        data = IN_PROCESS[args.stage](plan, out)
        (out / f"stage_{args.stage}.json").write_text(json.dumps(data, indent=2) + "\n")
        return 0
    stages = args.only.split(",") if args.only else list(STAGE_ORDER)
    for stale in out.glob("stage_*.json"):  # a previous check's results are not this one's
        stale.unlink()
    shutil.rmtree(out / "compile_cache", ignore_errors=True)  # e2e_jaxllm starts cold
    start = time.perf_counter()
    results: list[StageResult] = []
    backend = None
    for name in stages:
        left = TOTAL_BUDGET_S - (time.perf_counter() - start)
        if left < 5:
            results.append(StageResult(name, "skipped", 0.0, "no time left"))
            continue
        if name in ("e2e_jaxllm", "restart", "e2e_hf") and not (
                out / "stage_make_model.json").is_file():
            results.append(StageResult(name, "skipped", 0.0, "no model (make_model failed)"))
            continue
        result = run_stage(name, plan, out, min(plan.budgets[name], left), args, backend)
        if name == "probe" and result.data:
            backend = result.data["backend"]
        results.append(result)
        print(f"[device-check] {name}: {result.status} in {result.seconds:.1f} s  {result.summary}",
              flush=True)
    summary = write_summary(out, plan, results, time.perf_counter() - start)
    print((out / "device_check.md").read_text())
    return 0 if all(s["status"] in ("ok", "skipped") for s in summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
