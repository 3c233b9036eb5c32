"""benchmarks/device_check.py has no accelerator here: its --tiny plan runs every stage on CPU
with tiny shapes (~50 s of CPU), so the one-command hardware check cannot rot between the runs
that have a device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.device_check import STAGE_ORDER

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_tiny_device_check_runs_every_stage_and_writes_its_summary(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path),
                          "--requests", "5"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((tmp_path / "device_check.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == list(STAGE_ORDER)
    assert stages["probe"]["data"]["backend"] == "cpu"
    assert "platform cpu:" in stages["probe"]["data"]["defaults"]
    # No GPU here: the GPU tier is collected and skipped, never failed.
    assert stages["gpu_tier"]["status"] == "skipped" and stages["gpu_tier"]["data"]["skipped"] > 0
    for name in ("attention", "decode", "make_model", "e2e_jaxllm", "restart", "e2e_hf"):
        assert stages[name]["status"] == "ok", stages[name]["output_tail"]
    assert stages["attention"]["data"]["table"] and stages["decode"]["data"]["table"]
    jl, hf = stages["e2e_jaxllm"]["data"], stages["e2e_hf"]["data"]
    plan = summary["plan"]
    assert jl["output_tokens"] == hf["output_tokens"] == 5 * plan["output_len"]
    assert jl["recompiles"] == 0 and jl["warmup_s"] > 0 and jl["output_tok_s"] > 0
    assert summary["jaxllm_vs_hf"] == jl["output_tok_s"] / hf["output_tok_s"]
    restart = stages["restart"]["data"]  # from the programs the cold start saved
    assert restart["loaded_programs"] > 0 and restart["recompiles"] == 0
    markdown = (tmp_path / "device_check.md").read_text()
    for name in STAGE_ORDER:
        assert f"| {name} | {stages[name]['status']} |" in markdown
    assert "jaxllm / HF = **" in markdown
