"""The accelerator extras (`pip install -e '.[cuda]'`, `'.[cuda12]'`, `'.[tpu]'`) name jax
extras that exist, at jax versions jaxllm allows, and what they pull in resolves on the package
index (a metadata-only `pip install --dry-run --no-deps`: seconds, nothing installed).
Skipped when the index cannot be reached."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
ACCELERATOR_EXTRAS = {"cuda": "cuda13", "cuda12": "cuda12", "tpu": "tpu"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _jax_requirement(reqs: list[str]) -> Requirement:
    (jax,) = [r for r in map(Requirement, reqs) if r.name == "jax"]
    return jax


def _pinned_jax() -> Version:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("jax=="):
            return Version(line.split("==")[1])
    raise AssertionError("constraints.txt pins no jax")


def test_extras_name_jax_extras_within_the_supported_range():
    project = _project()
    core = _jax_requirement(project["dependencies"])
    assert _pinned_jax() in core.specifier
    for ours, jax_extra in ACCELERATOR_EXTRAS.items():
        req = _jax_requirement(project["optional-dependencies"][ours])
        assert req.extras == {jax_extra}, ours
        assert req.specifier == core.specifier, f"[{ours}] allows other jax versions than jaxllm"


def _index_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path).is_dir()
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=3):
            return True
    except OSError:
        return False


def _dry_run(requirements: list[str]) -> list[dict]:
    """pip's resolution report for `requirements` alone (no dependencies), nothing installed."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
         "--quiet", "--retries", "0", "--timeout", "15", "--report", "-", *requirements],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{requirements} did not resolve:\n{out.stderr[-2000:]}"
    return json.loads(out.stdout)["install"]


def test_extras_resolve_on_the_index():
    if not _index_reachable():
        pytest.skip("package index unreachable")
    pinned = _pinned_jax()
    extras = ",".join(ACCELERATOR_EXTRAS.values())
    (jax_meta,) = [i["metadata"] for i in _dry_run([f"jax[{extras}]=={pinned}"])]
    assert set(ACCELERATOR_EXTRAS.values()) <= set(jax_meta["provides_extra"])
    # What each extra adds on top of jax (the CUDA plugins, libtpu), at the pinned version.
    added: set[str] = set()
    for jax_extra in ACCELERATOR_EXTRAS.values():
        reqs = [Requirement(r) for r in jax_meta["requires_dist"]]
        extra_reqs = [r for r in reqs if r.marker is not None
                      and r.marker.evaluate({"extra": jax_extra})
                      and not r.marker.evaluate({"extra": ""})]
        assert extra_reqs, f"jax {pinned} [{jax_extra}] adds nothing"
        added |= {str(r).split(";")[0].strip() for r in extra_reqs}
    names = {i["metadata"]["name"].lower() for i in _dry_run(sorted(added))}
    assert {Requirement(r).name.lower() for r in added} == names
