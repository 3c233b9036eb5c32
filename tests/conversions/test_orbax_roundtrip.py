"""HF dir -> jaxllm (orbax) directory -> load: bit-identical; the CLI's contract."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.conversions import load_checkpoint, main, save_checkpoint
from jaxllm.conversions.orbax_io import flatten, model_config_to_hf_dict, nest
from tests.conversions.tiny_hf import VARIANTS, make_model, save_model


def _assert_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(np.asarray(a[name]).view(np.uint8),
                                      np.asarray(b[name]).view(np.uint8), err_msg=name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_to_orbax_is_bit_identical(tmp_path, variant):
    src, dest = tmp_path / "hf", tmp_path / "out"
    save_model(make_model(variant, seed=np.random.SeedSequence().entropy % (2**31)), src)
    assert main([str(src), str(dest)]) == 0
    direct, converted = load_checkpoint(src, "float32"), load_checkpoint(dest, "float32")
    assert converted.source_format == "jaxllm"
    assert converted.config == direct.config
    assert ModelConfig.from_file(dest) == direct.config  # the HF-style config.json agrees
    assert converted.generation_config == direct.generation_config
    _assert_identical(converted.params, direct.params)


def test_bfloat16_conversion_and_auto_dtype(tmp_path):
    src, dest = tmp_path / "hf", tmp_path / "out"
    save_model(make_model("qwen3_qknorm", seed=21), src, dtype="bfloat16")
    assert main([str(src), str(dest)]) == 0  # auto keeps the checkpoint's bfloat16
    assert json.loads((dest / "jaxllm_config.json").read_text())["param_dtype"] == "bfloat16"
    _assert_identical(load_checkpoint(dest, "bfloat16").params, load_checkpoint(src, "bfloat16").params)
    on_cpu = load_checkpoint(dest, "auto").params  # CPU: auto -> float32, exact upcast
    _assert_identical(on_cpu, load_checkpoint(src, "float32").params)


def test_cli_dtype_flag_casts(tmp_path):
    src, dest = tmp_path / "hf", tmp_path / "out"
    save_model(make_model("llama_tied", seed=22), src)
    assert main([str(src), str(dest), "--dtype", "bfloat16"]) == 0
    got = load_checkpoint(dest, "checkpoint")
    assert got.config.torch_dtype == "bfloat16"
    assert all(a.dtype == ml_dtypes.bfloat16 for a in got.params.values())
    _assert_identical(got.params, load_checkpoint(src, "bfloat16").params)


def test_restore_into_shardings(tmp_path):
    src = tmp_path / "hf"
    save_model(make_model("qwen2_bias", seed=23), src)
    host = load_checkpoint(src, "float32")
    save_checkpoint(tmp_path / "out", host.config, host.params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {name: sharding for name in host.params}
    for path in (tmp_path / "out", src):  # orbax restores into it; HF is device_put
        placed = load_checkpoint(path, "float32", shardings=shardings).params
        assert all(isinstance(a, jax.Array) and a.sharding == sharding for a in placed.values())
        _assert_identical({k: np.asarray(v) for k, v in placed.items()}, host.params)
    with pytest.raises(ValueError, match="no sharding given"):
        load_checkpoint(tmp_path / "out", shardings={})


def test_damaged_jaxllm_dir(tmp_path):
    src, dest = tmp_path / "hf", tmp_path / "out"
    save_model(make_model("llama_tied", seed=26), src)
    assert main([str(src), str(dest)]) == 0
    meta = dest / "jaxllm_config.json"
    good = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="jaxllm_config.json"):
        load_checkpoint(dest)
    meta.write_text(json.dumps({**json.loads(good), "format": "other"}))
    with pytest.raises(ValueError, match="format is 'other'"):
        load_checkpoint(dest)
    meta.write_text(good)
    (dest / "params").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint"):
        load_checkpoint(dest)


def test_nest_flatten_and_hf_config_round_trip():
    flat = {"a.b.c": 1, "a.d": 2, "e": 3}
    assert flatten(nest(flat)) == flat
    model = make_model("llama3_scaled_untied", seed=1)
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(model_config_to_hf_dict(cfg)))) == cfg


def test_non_empty_dest_refused_then_forced(tmp_path, capsys):
    src, dest = tmp_path / "hf", tmp_path / "out"
    save_model(make_model("llama_tied", seed=24), src)
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    capsys.readouterr()
    assert main([str(src), str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and "\n" not in err
    assert (dest / "keep.txt").read_text() == "precious"
    assert main([str(src), str(dest), "--force"]) == 0
    assert not (dest / "keep.txt").exists()
    _assert_identical(load_checkpoint(dest).params, load_checkpoint(src).params)
    assert main([str(src), str(src)]) == 2  # never over the source, not even with --force
    assert main([str(src), str(src), "--force"]) == 2
    assert load_checkpoint(src).config is not None


def test_tokenizer_files_travel(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxllm.tokenizer import load_tokenizer

    src, dest = tmp_path / "hf", tmp_path / "out"
    save_model(make_model("llama_tied", seed=25), src)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "jax"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(src)
    assert main([str(src), str(dest)]) == 0
    assert (dest / "tokenizer.json").is_file()
    text = "hello jax world zzz"
    assert load_tokenizer(dest).encode(text) == load_tokenizer(src).encode(text)


def test_cli_bad_input_exit_code(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "out"), "--dtype", "int4"]) == 2  # argparse
    assert not (tmp_path / "out").exists()
