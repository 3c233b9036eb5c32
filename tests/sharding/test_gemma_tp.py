"""Gemma 2 and Gemma 3 under tensor parallelism (2 simulated CPU devices) equal the plain
decode, greedy, token for token (per-layer sliding windows, soft caps and both rotary bases
through the sharded attention)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def test_gemma_tensor_parallel_greedy_equals_plain_decode():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-m", "tests.sharding.gemma_tp_worker", str(seed)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"seed={seed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(lines[-1][len("RESULT "):])
    assert len(results) >= 2
    for kind, r in results.items():
        assert r["got"] == r["expected"], f"seed={seed} {kind}"
        assert r["recompiles"] == 0, f"seed={seed} {kind}"
