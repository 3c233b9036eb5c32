"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers' loader.

transformers' GGUF loader takes most of a minute here, so it runs once (module fixture).
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from jaxllm.conversions import load_checkpoint, main
from jaxllm.default_model import INSTALL_HINT, default_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours():
    return load_checkpoint(default_model_path(), "float32")


@pytest.fixture(scope="module")
def hf_state():
    import torch
    import transformers

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_default_model_config(ours):
    cfg = ours.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.intermediate_size) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 64, 49152, 1536)
    assert cfg.tie_word_embeddings and "lm_head.kernel" not in ours.params
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert ours.generation_config == {"bos_token_id": 1, "eos_token_id": 2}


def test_weights_equal_transformers_gguf_loader(ours, hf_state):
    # Every tensor, q/k included: equality there validates the rope un-permute.
    checked = 0
    for hf_name, ref in hf_state.items():
        if hf_name == "lm_head.weight":
            np.testing.assert_array_equal(ref, ours.params["embed_tokens.embedding"])
            continue
        if hf_name == "model.embed_tokens.weight":
            name, want = "embed_tokens.embedding", ref
        elif hf_name == "model.norm.weight":
            name, want = "final_norm.scale", ref
        else:
            layer, module = hf_name.split(".")[2], hf_name.split(".")[-2]
            module = {"input_layernorm": "input_norm",
                      "post_attention_layernorm": "post_attention_norm"}.get(module, module)
            leaf = "kernel" if module.endswith("_proj") else "scale"
            name, want = f"layers.{layer}.{module}.{leaf}", (ref.T if leaf == "kernel" else ref)
        np.testing.assert_array_equal(ours.params[name], want, err_msg=hf_name)
        checked += 1
    assert checked == len(ours.params) == 272


def test_gguf_to_orbax_to_load(ours, tmp_path):
    dest = tmp_path / "smollm2"
    assert main([str(default_model_path()), str(dest)]) == 0
    back = load_checkpoint(dest, "float32")
    assert back.config == ours.config
    assert (dest / "tokenizer.json").is_file() and (dest / "tokenizer_config.json").is_file()
    for name, a in ours.params.items():
        np.testing.assert_array_equal(back.params[name], a, err_msg=name)
    from jaxllm.tokenizer import load_tokenizer

    text = "Hello, world! Ünïcödé"
    assert load_tokenizer(dest).encode(text) == load_tokenizer(default_model_path()).encode(text)


def test_missing_default_model_says_how_to_install(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", absent)
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT.replace(".", r"\.")):
        default_model_path()
