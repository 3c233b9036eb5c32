"""benchmarks/gpu_decode.py (issue 6's GPU variant) has no GPU here: its --tiny shape runs the
same code path on CPU, so the script cannot rot unseen between the runs that have a device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_decode.py"


def test_gpu_decode_tiny_runs_and_prints_its_table():
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--skip-hf", "--batches", "1,8"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "tok/s" not in line]
    rows = [r for r in rows if not r.startswith("|---")]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "8"], res.stdout
    for r in rows:
        tok_s = float(r.split("|")[2])
        assert tok_s > 0, r
