"""The Gemma family: Gemma 2 and Gemma 3 text decoders (Gemma2ForCausalLM, Gemma3ForCausalLM).

Config parsing both ways, parameter shapes and logical axes, and HF tensor names; the network
is `jaxllm.models.gemma.GemmaModel`. GGUF Gemma files are refused (no GGUF architecture is
registered for this family, and `config_from_gguf` says so). Gemma3ForConditionalGeneration
(the multimodal checkpoint, weights under another prefix) is not served.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.kernels.quantized_weights import PackedWeight
from jaxllm.models.base import CausalLM, GGUFMetadata
from jaxllm.models.gemma import GemmaModel
from jaxllm.models.hf_config import (
    eos_token_ids_to_hf,
    read_checkpoint_dtype,
    read_eos_token_ids,
    read_rope,
    rope_to_hf,
)
from jaxllm.models.llama_family import LOGICAL_AXES as LLAMA_LOGICAL_AXES
from jaxllm.models.tensor_names import TensorNameMap

# HF architectures entry -> whether it has per-head q/k norms (Gemma 3).
ARCHITECTURES: dict[str, bool] = {"Gemma2ForCausalLM": False, "Gemma3ForCausalLM": True}
MODEL_TYPES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
NORMS = ("input_norm", "post_attention_norm", "pre_feedforward_norm", "post_feedforward_norm")

LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    **{k: v for k, v in LLAMA_LOGICAL_AXES.items() if not k.endswith(".bias")},
    "pre_feedforward_norm.scale": ("embed",),
    "post_feedforward_norm.scale": ("embed",),
}

HF_NAMES = TensorNameMap(
    layer_prefix="model.layers.",
    top={
        "model.embed_tokens.weight": ("embed_tokens.embedding", False),
        "model.norm.weight": ("final_norm.scale", False),
        "lm_head.weight": ("lm_head.kernel", True),
    },
    layer={
        **{f"self_attn.{p}_proj.weight": (f"{p}_proj.kernel", True) for p in "qkvo"},
        "self_attn.q_norm.weight": ("q_norm.scale", False),
        "self_attn.k_norm.weight": ("k_norm.scale", False),
        **{f"mlp.{p}_proj.weight": (f"{p}_proj.kernel", True) for p in ("gate", "up", "down")},
        "input_layernorm.weight": ("input_norm.scale", False),
        "post_attention_layernorm.weight": ("post_attention_norm.scale", False),
        "pre_feedforward_layernorm.weight": ("pre_feedforward_norm.scale", False),
        "post_feedforward_layernorm.weight": ("post_feedforward_norm.scale", False),
    },
)
NO_GGUF_NAMES = TensorNameMap(layer_prefix="blk.", top={}, layer={})


def logical_axes(name: str) -> tuple[str, ...] | None:
    """Logical axis names of parameter `name` (e.g. "layers.3.q_proj.kernel"), or None."""
    return LOGICAL_AXES.get(".".join(name.split(".")[-2:]))


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _read_gemma_rope(d: Mapping[str, Any], gemma3: bool) -> tuple[Any, float | None]:
    """(read_rope's triple for global layers, rope theta of sliding layers or None)."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers-5 Gemma 3
        full = read_rope({"rope_parameters": params.get("full_attention") or {}})
        local = (params.get("sliding_attention") or {}).get("rope_theta", 10000.0)
        return full, float(local)
    if not gemma3:
        return read_rope(d), None
    legacy = dict(d)
    legacy.setdefault("rope_theta", 1_000_000.0)
    return read_rope(legacy), float(d.get("rope_local_base_freq", 10000.0))


def config_from_hf(d: Mapping[str, Any], architecture: str) -> ModelConfig:
    """The ModelConfig of a Gemma 2 / Gemma 3 text config.json dict."""
    gemma3 = ARCHITECTURES[architecture]
    num_heads = int(d["num_attention_heads"])
    num_layers = int(d["num_hidden_layers"])
    (rope_theta, scaling, partial), local_theta = _read_gemma_rope(d, gemma3)
    layer_types = d.get("layer_types")
    if not layer_types:  # HF's defaults: every 2nd (Gemma 2) / 6th (Gemma 3) layer is global
        pattern = int(d.get("sliding_window_pattern", 6 if gemma3 else 2))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(num_layers)]
    sliding = d.get("sliding_window", 4096)
    if d.get("use_bidirectional_attention"):
        raise ValueError(f"{architecture} with use_bidirectional_attention is not a causal LM")
    default_caps = (None, None) if gemma3 else (50.0, 30.0)
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=int(d.get("head_dim") or 256),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        qk_norm=gemma3,
        sliding_window=int(sliding) if sliding else None,
        hidden_act=str(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=read_eos_token_ids(d),
        torch_dtype=read_checkpoint_dtype(d),
        layer_types=tuple(str(t) for t in layer_types),
        query_pre_attn_scalar=_optional_float(d.get("query_pre_attn_scalar", 256)),
        attn_logit_softcapping=_optional_float(d.get("attn_logit_softcapping", default_caps[0])),
        final_logit_softcapping=_optional_float(d.get("final_logit_softcapping", default_caps[1])),
        rope_local_base_freq=local_theta,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """An HF-style config.json dict (legacy rope fields) that `config_from_hf` reads back."""
    d: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": {v: k for k, v in MODEL_TYPES.items()}[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_to_hf(cfg.rope_scaling),
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "hidden_activation": cfg.hidden_act,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos_token_ids_to_hf(cfg.eos_token_ids),
        "torch_dtype": cfg.torch_dtype,
    }
    if cfg.rope_local_base_freq is not None:
        d["rope_local_base_freq"] = cfg.rope_local_base_freq
    return d


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the network needs, with its shape (kernels stored [in, out])."""
    e, d = cfg.hidden_size, cfg.head_dim
    q, kv, m = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.embedding": (cfg.vocab_size, e)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "q_proj.kernel": (e, q), p + "k_proj.kernel": (e, kv),
                       p + "v_proj.kernel": (e, kv), p + "o_proj.kernel": (q, e),
                       p + "gate_proj.kernel": (e, m), p + "up_proj.kernel": (e, m),
                       p + "down_proj.kernel": (m, e)})
        if cfg.qk_norm:
            shapes[p + "q_norm.scale"] = (d,)
            shapes[p + "k_norm.scale"] = (d,)
        for norm in NORMS:
            shapes[f"{p}{norm}.scale"] = (e,)
    shapes["final_norm.scale"] = (e,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.kernel"] = (e, cfg.vocab_size)
    return shapes


class GemmaFamily:
    """The Gemma family as the registry sees it (implements jaxllm.models.base.ModelFamily)."""

    name = "gemma"
    architectures = tuple(ARCHITECTURES)
    model_types = MODEL_TYPES
    gguf_architectures: Mapping[str, str] = {}
    hf_names = HF_NAMES
    gguf_names = NO_GGUF_NAMES

    def config_from_hf(self, d: Mapping[str, Any], architecture: str) -> ModelConfig:
        return config_from_hf(d, architecture)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return config_to_hf(cfg)

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        raise ValueError(f"{meta.path}: GGUF Gemma files are not supported; convert the HF "
                         "checkpoint instead")

    def gguf_permuted_heads(self, cfg: ModelConfig, gguf_architecture: str,
                            name: str) -> int | None:
        return None

    def param_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return param_shapes(cfg)

    def logical_axes(self, name: str) -> tuple[str, ...] | None:
        return logical_axes(name)

    def build(self, cfg: ModelConfig, params: Mapping[str, Any], dtype: Any,
              quantized: Any, max_positions: int | None) -> CausalLM:
        if any(isinstance(v, PackedWeight) for v in params.values()):
            raise ValueError("Gemma weights kept in quantization blocks are not supported")
        return GemmaModel(cfg, params, dtype, max_positions)


FAMILY = GemmaFamily()
