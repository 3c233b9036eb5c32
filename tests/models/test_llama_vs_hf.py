"""Each supported architecture, tiny and random: jaxllm logits equal PyTorch's on ragged batches."""

import numpy as np
import pytest
import torch

from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from tests.models.hf_tiny import ARCH_CONFIGS, hf_state_to_flat, make_tiny_hf_model
from tests.oracles.plain_decode import forward_logits


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", sorted(ARCH_CONFIGS))
def test_logits_match_transformers(kind):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    hf = make_tiny_hf_model(kind, seed)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = build_model(cfg, hf_state_to_flat(hf), "float32")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 7, 19, 12)]
    ours = forward_logits(model, prompts)
    for p, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].numpy()
        assert rel_err(got, ref) < 1e-4, f"seed={seed} len={len(p)} err={rel_err(got, ref)}"


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10,
                                  "hidden_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2})


def test_rope_config_both_generations():
    legacy = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
              "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    new = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    a, b = ModelConfig.from_hf_dict(legacy), ModelConfig.from_hf_dict(new)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling.kind == "llama3"


@pytest.mark.parametrize("kind", sorted(ARCH_CONFIGS))
def test_rope_tables_match_transformers_rotary_embedding(kind):
    """The model's cos/sin tables, read at random positions across the whole range, equal
    HF's rotary embedding (llama3 and linear scaling included) to float32 rounding."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    seed = int(np.random.SeedSequence().entropy % 2**31)
    hf = make_tiny_hf_model(kind, seed)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = build_model(cfg, hf_state_to_flat(hf), "float32")
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, cfg.max_position_embeddings, size=37)
    rotary = LlamaRotaryEmbedding(config=hf.config)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor(positions[None]))
    half = np.asarray(model.rope_cos[...]).shape[1]
    np.testing.assert_allclose(np.asarray(model.rope_cos[...])[positions], cos[0, :, :half].numpy(),
                               atol=2e-6, err_msg=f"seed={seed}")
    np.testing.assert_allclose(np.asarray(model.rope_sin[...])[positions], sin[0, :, :half].numpy(),
                               atol=2e-6, err_msg=f"seed={seed}")


def test_sequence_past_the_rotary_table_is_rejected():
    """A position the cos/sin table lacks would silently reuse its last row: refused instead."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    hf = make_tiny_hf_model("llama", seed)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = build_model(cfg, hf_state_to_flat(hf), "float32", max_positions=16)
    assert model.max_positions == 16
    assert forward_logits(model, [[1] * 16])[0].shape == (16, cfg.vocab_size)
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
        forward_logits(model, [[1] * 5, [2] * 17])
