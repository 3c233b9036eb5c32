"""Tiny random Gemma 2 / Gemma 3 text models for tests: windows shorter than the test
sequences, soft caps and q/k weights sized so the caps bend real logits, and Gemma 3's two
rotary bases (scaled global, plain local) distinct."""

from __future__ import annotations

GEMMA_CONFIGS = {
    "gemma2": dict(cls="Gemma2Config", num_hidden_layers=3, sliding_window=6,
                   query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                   final_logit_softcapping=8.0),
    "gemma3": dict(cls="Gemma3TextConfig", num_hidden_layers=4, sliding_window=5,
                   query_pre_attn_scalar=20,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                "sliding_attention"],
                   rope_parameters={
                       "full_attention": {"rope_type": "linear", "factor": 4.0,
                                          "rope_theta": 100000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
}


def make_tiny_gemma_model(kind: str, seed: int, **overrides):
    """A randomly initialised torch Gemma model of `kind` (fp32, eval mode)."""
    import torch
    import transformers

    spec = dict(GEMMA_CONFIGS[kind])
    cfg_cls = getattr(transformers, spec.pop("cls"))
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                hidden_activation="gelu_pytorch_tanh")
    base.update(spec)
    base.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg_cls(**base), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))  # (1 + w) norms start at w = 0
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)  # attention logits of order the soft cap
            elif name.endswith("embed_tokens.weight"):
                p.mul_(10.0)  # final logits of order the soft cap
    return model


def random_gemma_config(arch: str, rng):
    """A random Gemma 2 / Gemma 3 ModelConfig (the registry's config round-trip tests)."""
    from jaxllm.config import ModelConfig, RopeScaling

    gemma3 = arch == "Gemma3ForCausalLM"
    kv = int(rng.integers(1, 4))
    layers = int(rng.integers(1, 7))
    return ModelConfig(
        architecture=arch, vocab_size=int(rng.integers(10, 300)),
        hidden_size=int(rng.integers(8, 100)), intermediate_size=int(rng.integers(8, 100)),
        num_layers=layers, num_heads=kv * int(rng.integers(1, 4)), num_kv_heads=kv,
        head_dim=2 * int(rng.integers(2, 9)), rms_norm_eps=float(rng.choice([1e-5, 1e-6])),
        rope_theta=float(rng.integers(1, 10**6)),
        rope_scaling=(RopeScaling("linear", float(rng.integers(2, 9)))
                      if gemma3 and rng.integers(2) else RopeScaling()),
        max_position_embeddings=int(rng.integers(16, 4096)),
        tie_word_embeddings=bool(rng.integers(2)), qk_norm=gemma3,
        sliding_window=int(rng.integers(2, 64)) if rng.integers(4) else None,
        hidden_act="gelu_pytorch_tanh", bos_token_id=int(rng.integers(0, 10)),
        eos_token_ids=tuple(int(x) for x in rng.integers(0, 10, size=int(rng.integers(0, 3)))),
        torch_dtype=str(rng.choice(["float32", "bfloat16"])),
        layer_types=tuple(str(rng.choice(["sliding_attention", "full_attention"]))
                          for _ in range(layers)),
        query_pre_attn_scalar=float(rng.integers(8, 300)) if rng.integers(4) else None,
        attn_logit_softcapping=float(rng.integers(10, 60)) if rng.integers(2) else None,
        final_logit_softcapping=float(rng.integers(10, 60)) if rng.integers(2) else None,
        rope_local_base_freq=float(rng.integers(1000, 10**5)) if gemma3 else None)
