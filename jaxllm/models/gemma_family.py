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
from jaxllm.models import llama_family
from jaxllm.models.base import CausalLM
from jaxllm.models.gemma import GemmaModel
from jaxllm.models.hf_config import HFOnly, common_to_hf, read_common, read_rope
from jaxllm.models.tensor_names import TensorNameMap

# HF architectures entry -> whether it has per-head q/k norms (Gemma 3).
ARCHITECTURES: dict[str, bool] = {"Gemma2ForCausalLM": False, "Gemma3ForCausalLM": True}
MODEL_TYPES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
MLP_NORMS = ("pre_feedforward_norm", "post_feedforward_norm")  # besides the Llama family's

# The Llama family's tables less the biases, plus the two norms around the MLP.
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    **{k: v for k, v in llama_family.LOGICAL_AXES.items() if not k.endswith(".bias")},
    **{f"{norm}.scale": ("embed",) for norm in MLP_NORMS},
}
HF_NAMES = TensorNameMap(
    layer_prefix=llama_family.HF_NAMES.layer_prefix,
    top=llama_family.HF_NAMES.top,
    layer={
        **{k: v for k, v in llama_family.HF_NAMES.layer.items() if not k.endswith(".bias")},
        "pre_feedforward_layernorm.weight": ("pre_feedforward_norm.scale", False),
        "post_feedforward_layernorm.weight": ("post_feedforward_norm.scale", False),
    },
)


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
    num_layers = int(d["num_hidden_layers"])
    rope, local_theta = _read_gemma_rope(d, gemma3)
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
        **read_common(d, rms_norm_eps=1e-6, max_position_embeddings=8192,
                      tie_word_embeddings=True, head_dim=256, rope=rope),
        qk_norm=gemma3,
        sliding_window=int(sliding) if sliding else None,
        hidden_act=str(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"),
        layer_types=tuple(str(t) for t in layer_types),
        query_pre_attn_scalar=_optional_float(d.get("query_pre_attn_scalar", 256)),
        attn_logit_softcapping=_optional_float(d.get("attn_logit_softcapping", default_caps[0])),
        final_logit_softcapping=_optional_float(d.get("final_logit_softcapping", default_caps[1])),
        rope_local_base_freq=local_theta,
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """An HF-style config.json dict (legacy rope fields) that `config_from_hf` reads back."""
    d: dict[str, Any] = {
        **common_to_hf(cfg),
        "model_type": {v: k for k, v in MODEL_TYPES.items()}[cfg.architecture],
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "hidden_activation": cfg.hidden_act,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
    }
    if cfg.rope_local_base_freq is not None:
        d["rope_local_base_freq"] = cfg.rope_local_base_freq
    return d


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the network needs, with its shape (kernels stored [in, out]): the
    Llama family's (a Gemma config has no biases) and each layer's two MLP norms."""
    shapes = llama_family.param_shapes(cfg)
    for i in range(cfg.num_layers):
        for norm in MLP_NORMS:
            shapes[f"layers.{i}.{norm}.scale"] = (cfg.hidden_size,)
    return shapes


class GemmaFamily(HFOnly):
    """The Gemma family as the registry sees it (implements jaxllm.models.base.ModelFamily)."""

    name = "gemma"
    architectures = tuple(ARCHITECTURES)
    model_types = MODEL_TYPES
    hf_names = HF_NAMES
    gguf_refusal = "GGUF Gemma files are not supported; convert the HF checkpoint instead"
    # The module's functions (implementing ModelFamily's methods of those names).
    config_from_hf = staticmethod(config_from_hf)
    config_to_hf = staticmethod(config_to_hf)
    param_shapes = staticmethod(param_shapes)
    logical_axes = staticmethod(logical_axes)

    def build(self, cfg: ModelConfig, params: Mapping[str, Any], dtype: Any,
              quantized: Any, max_positions: int | None) -> CausalLM:
        if any(isinstance(v, PackedWeight) for v in params.values()):
            raise ValueError("Gemma weights kept in quantization blocks are not supported")
        return GemmaModel(cfg, params, dtype, max_positions)


FAMILY = GemmaFamily()
