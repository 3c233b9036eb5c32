"""HF safetensors read straight into device shards (jaxllm.conversions.sharded_hf): the same
values as the host loader, bfloat16 kept bfloat16, and host memory bounded by tensor size."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.conversions import load_checkpoint
from jaxllm.conversions.sharded_hf import load_hf_dir_into
from tests.conversions.random_hf_dir import write_random_hf_dir
from tests.sharding.moe_worker import moe_config
from tests.sharding.tiny import fresh_seed, hf_tiny_config, run_python

CONFIGS = {
    "qwen3": lambda: hf_tiny_config("qwen3"),
    "mixtral": lambda: moe_config("MixtralForCausalLM", 6, 2),
    "qwen2_moe_shared": lambda: moe_config("Qwen2MoeForCausalLM", 4, 2, shared=16),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("stored,dtype", [("bfloat16", "bfloat16"), ("bfloat16", "float32"),
                                          ("float32", "float32")])
def test_placed_values_equal_host_load(tmp_path, kind, stored, dtype):
    seed = fresh_seed()
    path = write_random_hf_dir(tmp_path / kind, CONFIGS[kind](), seed, stored,
                               max_shard_bytes=30_000)  # several files + index
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = load_hf_dir_into(path, lambda name, shape: device, dtype)
    host = load_checkpoint(path, dtype)
    assert placed.config == host.config and set(placed.params) == set(host.params)
    for name, a in placed.params.items():
        assert isinstance(a, jax.Array) and a.sharding == device
        assert a.dtype == host.params[name].dtype == np.dtype(jax.numpy.dtype(dtype)), name
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8),
                                      host.params[name].view(np.uint8), err_msg=f"{name} seed={seed}")


def test_missing_expert_fails_with_its_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = write_random_hf_dir(tmp_path / "m", moe_config("MixtralForCausalLM", 6, 2), 1)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.4.w3.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match="missing tensor"):
        load_hf_dir_into(path, lambda name, shape: device)


def _memory(path, mode: str, dtype: str, tp: int) -> dict:
    proc = run_python(["-m", "tests.conversions.load_memory_worker", str(path), mode, dtype,
                       str(tp)], devices=tp, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_memory_is_about_one_tensor_not_the_checkpoint(tmp_path):
    """bf16 on disk loaded as bf16, every matrix split over 8 simulated CPU devices:
    anonymous memory grows by at most the device buffers (host memory on CPU) plus 3 tensors,
    and stays bfloat16. A full host copy kept beside the shards (or a float32 one) exceeds it.

    (On CPU the old host path mostly passes too: jax aliases the host arrays as device
    buffers, so its copy is the devices' memory; on accelerators it is a second copy.)
    """
    cfg = dataclasses.replace(hf_tiny_config("llama"), hidden_size=1024, intermediate_size=4096,
                              num_layers=3, vocab_size=2048, num_heads=8, num_kv_heads=8,
                              head_dim=128, tie_word_embeddings=False)
    path = write_random_hf_dir(tmp_path / "ckpt", cfg, fresh_seed(), "bfloat16")
    placed = _memory(path, "placed", "bfloat16", 8)
    assert placed["dtypes"] == ["bfloat16"]  # never widened to float32
    bound = placed["placed_bytes"] + 3 * placed["largest"]
    assert placed["checkpoint_bytes"] > 3 * bound / 4  # matrices are split, not copied 8 times
    assert placed["anon_growth"] < bound, (placed, bound)
    assert placed["anon_growth"] > 0.9 * placed["placed_bytes"], placed  # the sampler sees them
    assert ModelConfig.from_file(path) == dataclasses.replace(cfg, torch_dtype="bfloat16")


def test_load_checkpoint_with_shardings_reads_hf_straight_into_them(tmp_path, monkeypatch):
    import jaxllm.conversions.hf as hf

    path = write_random_hf_dir(tmp_path / "m", CONFIGS["qwen2_moe_shared"](), fresh_seed(), "bfloat16")
    host = load_checkpoint(path, "bfloat16").params
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    monkeypatch.setattr(hf, "_read_params", None)  # the whole-checkpoint read is not used
    placed = load_checkpoint(path, "bfloat16", shardings={n: device for n in host}).params
    for name, a in host.items():
        assert placed[name].sharding == device
        np.testing.assert_array_equal(np.asarray(placed[name]).view(np.uint8), a.view(np.uint8))
    with pytest.raises(ValueError, match="no sharding given"):
        load_checkpoint(path, shardings={})
