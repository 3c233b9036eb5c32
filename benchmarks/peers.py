"""Serving-benchmark plumbing: build llama.cpp's `llama-server`, run servers, run aiperf.

Kept apart from `serving_compare.py` so the comparison script reads as the experiment:
build the peer (cached under ~/.cache/jaxllm-bench, never in CI), start one server at a time
on 127.0.0.1, drive it with aiperf, and measure the load tool's own CPU while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_DIR = Path.home() / ".cache" / "jaxllm-bench"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
AIPERF_VERSION = "0.13.0"
CMAKE_FLAGS = ("-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DCMAKE_BUILD_TYPE=Release")


# -- the peer's build ---------------------------------------------------------------------------
def llama_cpp_source_dir(version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path = CACHE_DIR) -> Path:
    return cache / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def llama_server_binary(version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path = CACHE_DIR) -> Path:
    return llama_cpp_source_dir(version, cache) / "build" / "bin" / "llama-server"


def build_llama_server(version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path = CACHE_DIR,
                       jobs: int = 2) -> Path:
    """The cached `llama-server` binary, building it first if absent (about 6 min on 2 cores).

    The sources come from the llama-cpp-python sdist on PyPI (it vendors llama.cpp), so the
    build needs only PyPI, cmake and a C++ compiler.
    """
    binary = llama_server_binary(version, cache)
    if binary.is_file():
        return binary
    if os.environ.get("CI"):
        raise RuntimeError("refusing to build llama-server in CI (about 6 minutes); "
                           "build it once outside CI or pass --llama-server PATH")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama-server needs {tool!r} on PATH")
    src_root = cache / "src"
    src_root.mkdir(parents=True, exist_ok=True)
    sdist = src_root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        logger.info("downloading the llama-cpp-python %s sdist", version)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                        "--no-deps", f"llama-cpp-python=={version}", "-d", str(src_root)],
                       check=True)
    source = llama_cpp_source_dir(version, cache)
    if not source.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(src_root, filter="data")
    logger.info("building llama-server in %s (about 6 minutes)", source)
    subprocess.run(["cmake", "-B", "build", *CMAKE_FLAGS], cwd=source, check=True)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"],
                   cwd=source, check=True)
    if not binary.is_file():
        raise RuntimeError(f"the build finished but {binary} is missing")
    return binary


# -- servers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess that is ready (GET health_path answers 200) inside the `with`."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_path: Path,
                 health_path: str = "/health", start_timeout_s: float = 900.0) -> None:
        self.name, self.argv, self.port = name, list(argv), port
        self.log_path, self.health_path = log_path, health_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = t0 + self.start_timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was "
                                   f"ready; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - t0
                        logger.info("%s ready after %.1f s", self.name, self.ready_s)
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self._stop()
        raise TimeoutError(f"{self.name} not ready after {self.start_timeout_s} s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- the load tool ------------------------------------------------------------------------------
def ensure_aiperf(version: str = AIPERF_VERSION, cache: Path = CACHE_DIR) -> Path:
    """The `aiperf` executable from its own virtualenv under the cache (created on first use).

    aiperf pins older huggingface_hub / prometheus-client / rich than the project uses, so it
    never goes into the project's environment.
    """
    venv = cache / f"aiperf-{version}-venv"
    exe = venv / "bin" / "aiperf"
    if exe.is_file():
        return exe
    logger.info("installing aiperf %s into %s", version, venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    f"aiperf=={version}"], check=True)
    return exe


@dataclass
class LoadRun:
    """One aiperf run's summary: latencies in ms, throughput in output tokens per second."""

    concurrency: int
    request_count: int
    completed: int
    failed: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    output_tok_s: float
    output_tokens_mean: float  # per request, as aiperf's tokenizer counts the streamed text
    wall_s: float
    load_tool_cpu_s: float
    raw: dict = field(default_factory=dict, repr=False)
    engine: dict = field(default_factory=dict)  # jaxllm's own /metrics as aiperf scraped them

    @property
    def load_tool_cores(self) -> float:
        """Average cores the load tool used while it ran (CPU seconds / wall seconds)."""
        return self.load_tool_cpu_s / self.wall_s if self.wall_s else 0.0


class TreeCpuSampler:
    """Samples the CPU seconds of a process and all its descendants (psutil), in a thread.

    Children that exit between samples keep their last reading, so short-lived workers count.
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        ps = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self._seen[p.pid] = t.user + t.system
            except ps.Error:
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> TreeCpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self._seen.values())


def aiperf_command(aiperf: Path, url: str, model: str, tokenizer_dir: Path, concurrency: int,
                   request_count: int, seed: int, artifact_dir: Path, input_tokens: int,
                   output_tokens: int, extra_inputs: Sequence[str] = (),
                   warmup_requests: int = 2) -> list[str]:
    """aiperf 0.13 `profile` argv; paced (--request-rate) so its scheduler does not spin."""
    argv = [str(aiperf), "profile", "--model", model,
            "--url", url, "--endpoint-type", "completions", "--streaming",
            "--tokenizer", str(tokenizer_dir),
            "--synthetic-input-tokens-mean", str(input_tokens),
            "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(output_tokens), "--output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true",
            "--request-rate", "100", "--arrival-pattern", "constant",
            "--concurrency", str(concurrency), "--request-count", str(request_count),
            "--warmup-request-count", str(warmup_requests), "--random-seed", str(seed),
            "--artifact-dir", str(artifact_dir), "--ui-type", "simple"]
    for extra in extra_inputs:
        argv += ["--extra-inputs", extra]
    return argv


def run_aiperf(argv: Sequence[str], artifact_dir: Path, concurrency: int, request_count: int,
               timeout_s: float = 3600.0) -> LoadRun:
    """Run aiperf, sampling its process tree's CPU; parse its JSON export into a LoadRun."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    # A fresh connection per request (aiperf wants keepalive_timeout 0 = unset for that):
    # servers close idle keep-alive connections on their own schedule, and a request written
    # into one that is closing counts as failed ("Cannot write to closing transport"), which
    # is the load tool's race, not the server's failure.
    env = dict(os.environ, AIPERF_HTTP_FORCE_CLOSE="true", AIPERF_HTTP_KEEPALIVE_TIMEOUT="0")
    env.pop("HF_HUB_OFFLINE", None)  # aiperf rejects local tokenizer paths with it set
    log_path = artifact_dir / "aiperf.log"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env)
        with TreeCpuSampler(proc.pid) as cpu:
            try:
                rc = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"aiperf exited with {rc}; see {log_path}")
    summary = parse_aiperf_export(find_export(artifact_dir))
    return LoadRun(concurrency=concurrency, request_count=request_count, wall_s=wall,
                   load_tool_cpu_s=cpu.cpu_s, engine=parse_engine_metrics(artifact_dir),
                   **summary)


def find_export(artifact_dir: Path) -> Path:
    """The profiling phase's summary (aiperf 0.13 also writes one per phase under phases/)."""
    for candidate in (artifact_dir / "profile_export_aiperf.json",
                      artifact_dir / "phases" / "profiling" / "profile_export_aiperf.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no profile_export_aiperf.json in {artifact_dir}")


def _metric(data: dict, name: str, stat: str) -> float:
    m = data.get(name)
    if not isinstance(m, dict) or m.get(stat) is None:
        return float("nan")
    return float(m[stat])


def parse_aiperf_export(path: Path) -> dict:
    """TTFT/ITL percentiles (ms), output tok/s, completed and failed request counts."""
    data = json.loads(path.read_text())
    completed = _metric(data, "request_count", "avg")
    errors = _metric(data, "error_request_count", "avg")
    if errors != errors:  # absent when nothing failed; the summary lists errors by kind
        errors = sum(int(e.get("count", 0)) for e in data.get("error_summary") or [])
    return {
        "completed": 0 if completed != completed else int(completed),
        "failed": int(errors),
        "output_tokens_mean": _metric(data, "output_sequence_length", "avg"),
        "ttft_p50_ms": _metric(data, "time_to_first_token", "p50"),
        "ttft_p99_ms": _metric(data, "time_to_first_token", "p99"),
        "itl_p50_ms": _metric(data, "inter_token_latency", "p50"),
        "itl_p99_ms": _metric(data, "inter_token_latency", "p99"),
        "output_tok_s": _metric(data, "output_token_throughput", "avg"),
        "raw": data,
    }


def _series_stats(metrics: dict, name: str) -> dict:
    series = (metrics.get(name) or {}).get("series") or []
    return series[0].get("stats", {}) if series else {}


def parse_engine_metrics(artifact_dir: Path) -> dict:
    """Where jaxllm's time went, from its Prometheus counters that aiperf scraped during the
    profiling phase: steps per second, tokens per step, mean running batch. Empty for servers
    without jaxllm's metrics."""
    path = artifact_dir / "server_metrics_export.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("metrics") or {}
    steps = _series_stats(metrics, "jaxllm_engine_steps")
    tokens = _series_stats(metrics, "jaxllm_engine_generation_tokens")
    running = _series_stats(metrics, "jaxllm_num_requests_running")
    compiles = _series_stats(metrics, "jaxllm_compile_count")
    if not steps.get("total"):
        return {}
    out = {"steps": steps["total"], "steps_per_s": steps.get("rate", float("nan")),
           "generated_tokens": tokens.get("total", float("nan")),
           "mean_running": running.get("avg", float("nan")),
           "compiles_during_run": compiles.get("total", float("nan"))}
    out["tokens_per_step"] = out["generated_tokens"] / out["steps"]
    out["ms_per_step"] = 1e3 / out["steps_per_s"] if out["steps_per_s"] else float("nan")
    return out
