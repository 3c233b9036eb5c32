"""Run from the checkout's root, `import kernels` reaches Hugging Face's `kernels` package
(transformers >= 5.25 imports it), not this repository's kernels/ folder; without that package
it fails as a missing module. jaxllm.kernels is unaffected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_from_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after '' (the checkout): the folder comes first
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _fake_hf_kernels(site: Path, marker: str) -> None:
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from kernels.layer import CUDAProperties\n"
        f"MARKER = {marker!r}\n")
    (pkg / "layer.py").write_text("class CUDAProperties:\n    pass\n")


def test_top_level_import_hands_over_to_the_installed_package(tmp_path):
    marker = os.urandom(6).hex()
    _fake_hf_kernels(tmp_path, marker)
    code = ("import sys, kernels\n"
            "from kernels import CUDAProperties\n"
            "from kernels.layer import CUDAProperties as C2\n"
            "assert CUDAProperties is C2 and sys.modules['kernels'] is kernels\n"
            "print(kernels.MARKER, kernels.__file__)\n")
    out = _run_from_root(code, tmp_path)
    assert out.returncode == 0, out.stderr
    got_marker, got_file = out.stdout.split()
    assert got_marker == marker
    assert Path(got_file).resolve().is_relative_to(tmp_path.resolve())


def test_without_the_package_top_level_kernels_reads_as_not_installed(tmp_path):
    """No HF `kernels`: the name resolves to an empty stand-in with no __file__ (what
    transformers' availability check takes for "not installed") that names the mix-up."""
    name = "x" + os.urandom(4).hex()
    code = ("import kernels\n"
            "assert kernels.__file__ is None and getattr(kernels, '__version__', 'N/A') == 'N/A'\n"
            "try:\n"
            f"    kernels.{name}\n"
            "except AttributeError as e:\n"
            "    print(e)\n"
            "try:\n"
            f"    from kernels import {name}\n"
            "except ImportError:\n"
            "    print('import refused')\n")
    out = _run_from_root(code, tmp_path)  # tmp_path holds no `kernels`
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"kernels.{name} does not exist" in lines[0] and "jaxllm.kernels" in lines[0]
    assert lines[1] == "import refused"


def test_transformers_imports_from_the_root():
    """transformers probes `kernels` on import (importing it when no metadata is found)."""
    out = _run_from_root("from transformers import LlamaConfig, PreTrainedTokenizerFast\n"
                         "print(LlamaConfig.__module__)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "transformers.models.llama.configuration_llama"


def test_jaxllm_kernels_still_imports_from_the_root(tmp_path):
    _fake_hf_kernels(tmp_path, "hf")
    out = _run_from_root("import jaxllm.kernels as k, kernels\n"
                         "print(k.__name__, callable(k.ragged_paged_attention), kernels.MARKER)",
                         tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jaxllm.kernels", "True", "hf"]
