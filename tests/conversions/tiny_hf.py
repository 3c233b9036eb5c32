"""Tiny random HF checkpoints written with save_pretrained, and an independent name mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VARIANTS = {
    "llama_tied": dict(cls="LlamaConfig", num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_scaled_untied": dict(
        cls="LlamaConfig", num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(cls="MistralConfig", num_key_value_heads=2, sliding_window=7),
    "qwen2_bias": dict(cls="Qwen2Config", num_key_value_heads=2),
    "qwen3_qknorm": dict(cls="Qwen3Config", num_key_value_heads=2, head_dim=12),
}


def make_model(variant: str, seed: int):
    """A torch model with every parameter random (norms and biases too: none stays 0 or 1)."""
    import torch
    import transformers

    spec = dict(VARIANTS[variant])
    cfg_cls = getattr(transformers, spec.pop("cls"))
    base = dict(vocab_size=83, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128)
    cfg = cfg_cls(**{**base, **spec})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def save_model(model, dest: Path, dtype: str = "float32", max_shard_size: str | None = None) -> Path:
    import torch

    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dest, **kwargs)
    return dest


def expected_flat(model) -> dict[str, np.ndarray]:
    """What load_checkpoint must return, derived from the torch state dict by hand."""
    import torch

    tied = model.config.tie_word_embeddings
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        a = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            out["embed_tokens.embedding"] = a
        elif name == "model.norm.weight":
            out["final_norm.scale"] = a
        elif name == "lm_head.weight":
            if not tied:
                out["lm_head.kernel"] = a.T
        else:
            layer, module, leaf = parts[2], parts[-2], parts[-1]
            module = {"input_layernorm": "input_norm",
                      "post_attention_layernorm": "post_attention_norm"}.get(module, module)
            if leaf == "weight":
                leaf = "kernel" if module.endswith("_proj") else "scale"
            key = f"layers.{layer}.{module}.{leaf}"
            out[key] = a.T if leaf == "kernel" else a
    return out
