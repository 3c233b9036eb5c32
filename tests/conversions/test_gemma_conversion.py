"""The conversion CLI on Gemma 2 / Gemma 3 checkpoints: HF -> jaxllm (orbax) -> load is
bit-identical (the four sandwich norms and q/k norms included) and the config (per-layer
types, soft caps, both rope bases) survives; both a transformers save_pretrained directory
and a random bfloat16 one written from the family's name map."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.conversions import load_checkpoint, main
from tests.conversions.random_hf_dir import write_random_hf_dir
from tests.models.gemma_tiny import GEMMA_CONFIGS, make_tiny_gemma_model, random_gemma_config
from tests.sharding.tiny import fresh_seed


def _assert_roundtrip(src, dest) -> None:
    assert main([str(src), str(dest)]) == 0
    direct, converted = load_checkpoint(src, "checkpoint"), load_checkpoint(dest, "checkpoint")
    assert converted.source_format == "jaxllm" and converted.config == direct.config
    assert ModelConfig.from_file(dest) == direct.config
    assert set(converted.params) == set(direct.params)
    assert any(n.endswith("post_feedforward_norm.scale") for n in direct.params)
    for name, a in direct.params.items():
        b = converted.params[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(np.asarray(b).view(np.uint8), np.asarray(a).view(np.uint8),
                                      err_msg=name)


@pytest.mark.parametrize("kind", sorted(GEMMA_CONFIGS))
def test_transformers_gemma_to_orbax_and_back(tmp_path, kind):
    src = tmp_path / "hf"
    make_tiny_gemma_model(kind, fresh_seed()).save_pretrained(src)
    _assert_roundtrip(src, tmp_path / "out")
    cfg = load_checkpoint(tmp_path / "out", "checkpoint").config
    if kind == "gemma3":
        assert cfg.layer_types == tuple(GEMMA_CONFIGS[kind]["layer_types"])
        assert cfg.rope_local_base_freq == 1000.0 and cfg.rope_scaling.kind == "linear"
    else:
        assert cfg.attn_logit_softcapping == GEMMA_CONFIGS[kind]["attn_logit_softcapping"]


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_random_bfloat16_gemma_to_orbax_and_back(tmp_path, arch):
    seed = fresh_seed()
    cfg = random_gemma_config(arch, np.random.default_rng(seed))
    src = write_random_hf_dir(tmp_path / "hf", cfg, seed, "bfloat16")
    _assert_roundtrip(src, tmp_path / "out")
