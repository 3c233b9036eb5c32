"""Tiny random models for the sharding tests, built without torch (fast in subprocesses).

Shapes follow tests/models/hf_tiny.py (same config dicts, read by ModelConfig.from_hf_dict)
plus one with SmolLM2's head structure (9 query / 3 KV heads); weights are random numpy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models.params import expected_param_shapes
from tests.models.hf_tiny import ARCH_CONFIGS

REPO = Path(__file__).resolve().parents[2]

_ARCH_OF_CLS = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def hf_tiny_config(kind: str) -> ModelConfig:
    """The ModelConfig of tests/models/hf_tiny.py's `kind`, without building the torch model."""
    spec = dict(ARCH_CONFIGS[kind])
    d = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    d["architectures"] = [_ARCH_OF_CLS[spec.pop("cls")]]
    d.update(spec)
    return ModelConfig.from_hf_dict(d)


def smol_shaped_config(num_layers: int = 2) -> ModelConfig:
    """SmolLM2's attention structure (9 q / 3 KV heads, tied embeddings) at toy width."""
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=48,
                       intermediate_size=64, num_layers=num_layers, num_heads=9,
                       num_kv_heads=3, head_dim=16, tie_word_embeddings=True,
                       rope_theta=10000.0)


def random_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Random weights of the right shapes; norms and biases perturbed away from 1 and 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_param_shapes(cfg).items():
        if name.endswith(".scale"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith(".bias"):
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    return out


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def run_python(args: list[str], devices: int = 8, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python args...` from the repo root with `devices` simulated CPU devices."""
    import os

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_worker(module: str, out: Path, args: list[str], timeout: float = 300) -> dict:
    """Run a worker module that writes its per-case results as JSON to `out`; return them."""
    import json

    proc = run_python(["-m", module, str(out), *args], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def worker_case(results: dict, name: str) -> dict:
    """One case of a worker's results; its error (with the run's seed) fails the test."""
    r = results[name]
    assert "error" not in r, f"seed={results['seed']}\n{r.get('error')}"
    return r
