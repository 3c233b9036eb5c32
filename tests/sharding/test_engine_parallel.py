"""The engine under tensor / data parallelism and across two processes, on simulated CPU devices.

One subprocess with 8 host devices runs every single-process case (engine_parallel_worker.py);
two more processes run the multi-host leader and follower (engine_two_process_worker.py).
Reference: the same engine with tensor_parallel_size=1, greedy, token-identical.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.sharding.tiny import REPO, fresh_seed, run_python, run_worker, worker_case


@pytest.fixture(scope="module")
def seed() -> int:
    return fresh_seed()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, seed):
    """Tiny random HF checkpoints (weights large enough that greedy tokens vary) + tokenizer."""
    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer
    from tests.models.hf_tiny import make_tiny_hf_model

    tokenizer = load_tokenizer(default_model_path())
    dirs = {}
    for kind in ("llama", "llama3_scaled_untied"):
        path = tmp_path_factory.mktemp(kind)
        make_tiny_hf_model(kind, seed=seed, vocab_size=512, initializer_range=0.3).save_pretrained(path)
        tokenizer.save(path)
        dirs[kind] = str(path)
    return dirs


@pytest.fixture(scope="module")
def results(tmp_path_factory, model_dirs, seed):
    out = tmp_path_factory.mktemp("engine-parallel") / "results.json"
    return run_worker("tests.sharding.engine_parallel_worker", out,
                      [str(seed), model_dirs["llama"], model_dirs["llama3_scaled_untied"]],
                      timeout=400)


@pytest.mark.parametrize("name,ref", [("llama_tp2", "llama_tp1"), ("llama_tp4", "llama_tp1"),
                                      ("mqa_tp2", "mqa_tp1")])
def test_tensor_parallel_greedy_tokens_match_one_device(results, name, ref):
    got, want = worker_case(results, name), worker_case(results, ref)
    assert got["tokens"] == want["tokens"], (results["seed"], got["tokens"], want["tokens"])
    assert len({t for seq in want["tokens"] for t in seq}) > 2, "degenerate reference outputs"
    assert got["recompiles"] == 0


def _expected_param_spec(name: str) -> list:
    """The rules table written out by hand (all tiny dims divide the TP sizes used here)."""
    suffix = ".".join(name.split(".")[-2:])
    m = "model"
    return {
        "q_proj.kernel": [None, m], "k_proj.kernel": [None, m], "v_proj.kernel": [None, m],
        "o_proj.kernel": [m, None], "gate_proj.kernel": [None, m], "up_proj.kernel": [None, m],
        "down_proj.kernel": [m, None], "embed_tokens.embedding": [m, None],
        "lm_head.kernel": [None, m],
    }.get(suffix, [None] * (2 if suffix.endswith(("kernel", "embedding")) else 1))


@pytest.mark.parametrize("name,tp", [("llama_tp2", 2), ("llama_tp4", 4), ("mqa_tp2", 2)])
def test_engine_param_and_kv_cache_shardings_follow_rules(results, name, tp):
    r = worker_case(results, name)
    for pname, spec in r["params"].items():
        assert spec == _expected_param_spec(pname), (pname, spec)
    assert r["devices"] == list(range(tp))
    hq, hkv = r["heads"]
    assert hkv % tp == 0 and hq % hkv == 0
    assert r["cache_spec"] == [None, None, "model", None]
    assert r["cache_shape"][2] == 2 * hkv
    assert r["cache_shard"][2] == 2 * hkv // tp  # whole K/V pairs on each device


def test_tp_larger_than_kv_heads_replicates_kv_heads(results):
    assert worker_case(results, "llama_tp4")["heads"] == [4, 4]  # 2 KV heads, each on 2 devices
    assert worker_case(results, "mqa_tp2")["heads"] == [4, 2]  # 1 KV head, one copy per device


def test_data_parallel_serving_matches_one_engine(results):
    r, ref = worker_case(results, "llama_dp2_tp2"), worker_case(results, "llama_tp1")
    assert r["tokens"] == ref["tokens"] * 2, (results["seed"], r["tokens"])
    assert r["devices"] == [[0, 1], [2, 3]]
    assert all(n > 0 for n in r["per_replica"]), r["per_replica"]  # both replicas served


def test_offline_llm_rejects_data_parallel_clearly(results):
    msg = worker_case(results, "llm_dp")["error_message"]
    assert msg is not None and "serving feature" in msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path, procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            return
        time.sleep(0.2)


def test_two_processes_serve_like_one_and_leader_notices_dead_follower(tmp_path, model_dirs,
                                                                       results, seed):
    out = str(tmp_path / "two")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.sharding.engine_two_process_worker", str(pid), str(port),
         out, str(seed), model_dirs["llama"]], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    leader, follower = procs
    try:
        _wait_for(out + ".tokens.json", procs, 300)
        if not os.path.exists(out + ".tokens.json"):
            for p in procs:
                p.kill()
            logs = [p.communicate()[0][-3000:] for p in procs]
            pytest.fail("leader wrote no tokens:\n" + "\n---\n".join(logs))
        got = json.loads(open(out + ".tokens.json").read())
        with open(out + ".killed", "w") as f:
            f.write(repr(time.time()))
        follower.send_signal(signal.SIGKILL)
        log = leader.communicate(timeout=90)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert got["tokens"] == worker_case(results, "llama_tp1")["tokens"], (seed, got["tokens"])
    assert os.path.exists(out + ".health.json"), log[-3000:]
    health = json.loads(open(out + ".health.json").read())
    assert health["error"] is not None and "follower" in health["error"], (health, log[-3000:])
    # "Within seconds", not a timing measurement: the leader must not hang on the dead peer.
    assert health["detected_after_s"] < 30, health


@pytest.mark.slow
def test_default_model_tensor_parallel_2_matches_one_device(tmp_path):
    out = tmp_path / "smollm2.json"
    proc = run_python(["-m", "tests.sharding.engine_parallel_worker", "smollm2", str(out)],
                      timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["tp2"] == r["tp1"], r
    assert all(len(t) == 8 for t in r["tp1"]), r
