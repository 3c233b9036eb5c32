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
