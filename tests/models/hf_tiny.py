"""Tiny random Hugging Face models of each supported architecture, for tests."""

from __future__ import annotations

import numpy as np

ARCH_CONFIGS = {
    "llama": dict(cls="LlamaConfig", num_key_value_heads=2),
    "llama3_scaled_untied": dict(
        cls="LlamaConfig", num_key_value_heads=1, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0),
    "mistral": dict(cls="MistralConfig", num_key_value_heads=2, sliding_window=5),
    "qwen2": dict(cls="Qwen2Config", num_key_value_heads=2),
    "qwen3": dict(cls="Qwen3Config", num_key_value_heads=2, head_dim=16),
}


def make_tiny_hf_model(kind: str, seed: int, **overrides):
    """A randomly initialised torch model of `kind` (fp32, eval mode)."""
    import torch
    import transformers

    spec = dict(ARCH_CONFIGS[kind])
    cfg_cls = getattr(transformers, spec.pop("cls"))
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    base.update(spec)
    base.update(overrides)
    cfg = cfg_cls(**base)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so they are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_state_to_flat(model) -> dict[str, np.ndarray]:
    """Our flat naming from a transformers model's state dict (independent of conversions/)."""
    out: dict[str, np.ndarray] = {}
    renames = {"self_attn.": "", "mlp.": "", "input_layernorm.weight": "input_norm.scale",
               "post_attention_layernorm.weight": "post_attention_norm.scale",
               "q_norm.weight": "q_norm.scale", "k_norm.weight": "k_norm.scale"}
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out["embed_tokens.embedding"] = a
        elif name == "model.norm.weight":
            out["final_norm.scale"] = a
        elif name == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                out["lm_head.kernel"] = a.T
        elif name.startswith("model.layers."):
            n = name[len("model."):]
            for old, new in renames.items():
                n = n.replace(old, new)
            if n.endswith("proj.weight"):
                out[n[: -len("weight")] + "kernel"] = a.T
            else:
                out[n] = a
    return out
