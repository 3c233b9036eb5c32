"""Tiny random Hugging Face mixture-of-experts models (Mixtral, Qwen3-MoE, Qwen2-MoE) for tests."""

from __future__ import annotations

MOE_CONFIGS = {
    "mixtral": dict(cls="MixtralConfig", num_local_experts=6, num_experts_per_tok=2,
                    intermediate_size=40),
    "qwen3_moe": dict(cls="Qwen3MoeConfig", num_experts=8, num_experts_per_tok=3,
                      moe_intermediate_size=24, head_dim=16, norm_topk_prob=False),
    "qwen3_moe_norm": dict(cls="Qwen3MoeConfig", num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=24, head_dim=16, norm_topk_prob=True),
    "qwen2_moe": dict(cls="Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=24, shared_expert_intermediate_size=48),
}


def make_tiny_moe_model(kind: str, seed: int, **overrides):
    """A randomly initialised torch MoE model of `kind` (fp32, eval mode). Router weights are
    scaled up so routing is decisive (no near-ties that float rounding could flip), norms
    perturbed so they are tested too."""
    import torch
    import transformers

    spec = dict(MOE_CONFIGS[kind])
    cfg_cls = getattr(transformers, spec.pop("cls"))
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False)
    base.update(spec)
    base.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls(**base), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.mul_(10.0)
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.normal_(0.0, 0.1)  # make experts differ clearly
    return model
