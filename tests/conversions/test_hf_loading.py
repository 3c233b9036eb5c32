"""HF safetensors directories -> flat params: exact tensors, dtypes, sharding, clear errors."""

from __future__ import annotations

import json
import re
import struct

import ml_dtypes
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.conversions import LoadedCheckpoint, detect_format, load_checkpoint
from tests.conversions.tiny_hf import VARIANTS, expected_flat, make_model, save_model


def _assert_exact(loaded: dict, expected: dict, bf16: bool = False) -> None:
    assert set(loaded) == set(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert got.shape == want.shape, name
        if bf16:
            assert got.dtype == ml_dtypes.bfloat16, name
            got = got.view(np.int16)
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_tensor_matches_hf(tmp_path, variant):
    seed = np.random.SeedSequence().entropy % (2**31)
    model = make_model(variant, seed)
    save_model(model, tmp_path)
    loaded = load_checkpoint(tmp_path, "float32")
    assert isinstance(loaded, LoadedCheckpoint) and loaded.source_format == "hf"
    assert loaded.config == ModelConfig.from_file(tmp_path)
    assert loaded.tokenizer_path == tmp_path
    assert loaded.generation_config == json.loads((tmp_path / "generation_config.json").read_text())
    _assert_exact(loaded.params, expected_flat(model))
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in loaded.params.values())
    cfg, params = loaded  # tuple-style unpacking
    assert cfg is loaded.config and params is loaded.params


def test_sharded_checkpoint(tmp_path):
    model = make_model("llama3_scaled_untied", seed=11)
    save_model(model, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _assert_exact(load_checkpoint(tmp_path, "float32").params, expected_flat(model))


def test_bfloat16_checkpoint_dtypes(tmp_path):
    model = make_model("qwen2_bias", seed=5)
    save_model(model, tmp_path, dtype="bfloat16")
    want_bits = expected_flat(model)  # int16 views of the bf16 tensors
    _assert_exact(load_checkpoint(tmp_path, "checkpoint").params, want_bits, bf16=True)
    _assert_exact(load_checkpoint(tmp_path, "bfloat16").params, want_bits, bf16=True)
    as_f32 = load_checkpoint(tmp_path, "auto").params  # CPU backend: auto means float32
    for name, bits in want_bits.items():
        assert as_f32[name].dtype == np.float32
        np.testing.assert_array_equal(as_f32[name], bits.view(ml_dtypes.bfloat16).astype(np.float32))


def test_float32_to_bfloat16_cast(tmp_path):
    model = make_model("mistral", seed=3)
    save_model(model, tmp_path)
    got = load_checkpoint(tmp_path, "bfloat16").params
    for name, want in expected_flat(model).items():
        np.testing.assert_array_equal(got[name], want.astype(ml_dtypes.bfloat16), err_msg=name)


# ---- errors ------------------------------------------------------------------------------

def _rewrite_safetensors(path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_model(make_model("llama_tied", seed=1), tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_safetensors(tmp_path / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor.*{name}"):
        load_checkpoint(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    save_model(make_model("llama_tied", seed=2), tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(t):
        t[name] = t[name][:-1]
    _rewrite_safetensors(tmp_path / "model.safetensors", shrink)
    with pytest.raises(ValueError, match=rf"{name} has shape"):
        load_checkpoint(tmp_path)


def test_unrecognized_tensor_is_named(tmp_path):
    save_model(make_model("llama_tied", seed=2), tmp_path)

    def add(t):
        t["model.layers.0.self_attn.rotary_mixer.weight"] = np.ones(3, np.float32)
    _rewrite_safetensors(tmp_path / "model.safetensors", add)
    with pytest.raises(ValueError, match="unrecognized tensor model.layers.0.self_attn.rotary_mixer"):
        load_checkpoint(tmp_path)


def test_unknown_architecture(tmp_path):
    save_model(make_model("llama_tied", seed=4), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'.*LlamaForCausalLM"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "huge_header"])
def test_corrupt_safetensors(tmp_path, damage):
    save_model(make_model("llama_tied", seed=6), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage_header":
        (n,) = struct.unpack("<Q", data[:8])
        data = data[:8] + b"\xff" * n + data[8 + n:]
    else:
        data = struct.pack("<Q", 1 << 40) + data[8:]
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: corrupt"):
        load_checkpoint(tmp_path)


def test_sharded_errors_name_the_shard(tmp_path):
    save_model(make_model("llama_tied", seed=9), tmp_path, max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    rng = np.random.default_rng()
    victim = tmp_path / shards[rng.integers(len(shards))]
    victim.write_bytes(victim.read_bytes()[: -int(rng.integers(1, 64))])
    with pytest.raises(ValueError, match=rf"{re.escape(str(victim))}: corrupt or truncated"):
        load_checkpoint(tmp_path)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(victim))):
        load_checkpoint(tmp_path)


def test_index_entry_absent_from_its_shard(tmp_path):
    save_model(make_model("llama_tied", seed=10), tmp_path, max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = sorted(index["weight_map"].values())[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight is listed in"):
        load_checkpoint(tmp_path)


def test_non_float_tensor_is_named(tmp_path):
    save_model(make_model("llama_tied", seed=12), tmp_path)
    name = "model.norm.weight"

    def to_int(t):
        t[name] = np.arange(t[name].size, dtype=np.int32)
    _rewrite_safetensors(tmp_path / "model.safetensors", to_int)
    with pytest.raises(ValueError, match=rf"{name} has non-float dtype I32"):
        load_checkpoint(tmp_path)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        detect_format(tmp_path)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_checkpoint(tmp_path / "weights.txt")


def test_bad_dtype(tmp_path):
    save_model(make_model("llama_tied", seed=8), tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_checkpoint(tmp_path, "int8")
