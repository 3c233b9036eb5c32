"""Two processes on 127.0.0.1 (jax.distributed, CPU collectives) run one model across both."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from jaxllm.models import build_model
from tests.oracles.plain_decode import forward_logits, plain_generate
from tests.sharding.tiny import REPO, fresh_seed, random_params, smol_shaped_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(tmp_path, seed: int, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.sharding.two_process_worker", str(pid), str(port), str(out),
         str(seed), mode], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for pid in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert out.exists(), "leader wrote no result:\n" + "\n---\n".join(x[-3000:] for x in logs)
    return json.loads(out.read_text())


def test_two_process_tensor_parallel_matches_single_process(tmp_path):
    seed = fresh_seed()
    got = _run_pair(tmp_path, seed, "run")
    cfg = smol_shaped_config()
    model = build_model(cfg, random_params(cfg, seed), "float32")
    ref_logits = forward_logits(model, got["prompts"])
    for a, b in zip(got["logits"], ref_logits, strict=True):
        err = float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())
        assert err < 1e-5, (seed, err)
    assert got["tokens"] == plain_generate(model, got["prompts"], max_new_tokens=4), seed


def test_leader_reports_a_dead_follower_instead_of_hanging(tmp_path):
    got = _run_pair(tmp_path, 0, "die")
    assert got["lost"] is not None and "follower" in got["lost"], got
