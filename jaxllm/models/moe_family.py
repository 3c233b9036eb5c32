"""The mixture-of-experts family: Mixtral, Qwen3-MoE and Qwen2-MoE (shared expert).

Attention and everything around it are the Llama family's (configs are read through it,
then the MoE fields added); the MLP of every layer is routed experts (`jaxllm.models.moe_model`).
Each expert is its own tensor in HF checkpoints; jaxllm stacks a layer's experts into one
[experts, in, out] parameter per projection (`jaxllm.models.stacked_names`). GGUF MoE files
are not read (their stacked expert tensors would need their own loader path).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models import llama_family
from jaxllm.models.base import CausalLM
from jaxllm.models.hf_config import HFOnly
from jaxllm.models.moe_model import DOWN_AXES, GATE_UP_AXES, ROUTER_AXES, MoeModel
from jaxllm.models.stacked_names import slot_name, stacked_slot
from jaxllm.models.tensor_names import TensorNameMap

# HF architecture -> (the Llama-family architecture its attention and config read as,
# config.json key of the expert count, key of the expert width).
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "MixtralForCausalLM": ("MistralForCausalLM", "num_local_experts", "intermediate_size"),
    "Qwen3MoeForCausalLM": ("Qwen3ForCausalLM", "num_experts", "moe_intermediate_size"),
    "Qwen2MoeForCausalLM": ("Qwen2ForCausalLM", "num_experts", "moe_intermediate_size"),
}
MODEL_TYPES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "qwen2_moe": "Qwen2MoeForCausalLM"}

MOE_AXES: dict[str, tuple[str, ...]] = {
    "router.kernel": ROUTER_AXES,
    "experts.gate_kernel": GATE_UP_AXES,
    "experts.up_kernel": GATE_UP_AXES,
    "experts.down_kernel": DOWN_AXES,
    "shared_expert_gate.kernel": ("embed", "router_experts"),
}
_DENSE_MLP = tuple(f"{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("kernel", "bias"))
_EXPERT = "{e}"  # the expert-index placeholder in the name table below


class ExpertTensorNameMap(TensorNameMap):
    """A TensorNameMap whose per-expert tensors (`...experts.<e>....`) map to slot e of a
    stacked parameter (`layers.3.experts.gate_kernel[e]`)."""

    _INDEX = re.compile(r"\.experts\.(\d+)\.")

    def to_jaxllm(self, source_name: str) -> tuple[str, bool] | None:
        m = self._INDEX.search(source_name)
        if m is None:
            return super().to_jaxllm(source_name)
        generic = source_name[:m.start()] + f".experts.{_EXPERT}." + source_name[m.end():]
        mapped = super().to_jaxllm(generic)
        return None if mapped is None else (slot_name(mapped[0], int(m.group(1))), mapped[1])

    def to_source(self, name: str) -> str:
        base, index = stacked_slot(name)
        source = super().to_source(base)
        return source if index is None else source.replace(_EXPERT, str(index))


_ATTENTION_NAMES = {k: v for k, v in llama_family.HF_NAMES.layer.items()
                    if not k.startswith("mlp.")}
_MIXTRAL_MLP = {
    "block_sparse_moe.gate.weight": ("router.kernel", True),
    f"block_sparse_moe.experts.{_EXPERT}.w1.weight": ("experts.gate_kernel", True),
    f"block_sparse_moe.experts.{_EXPERT}.w3.weight": ("experts.up_kernel", True),
    f"block_sparse_moe.experts.{_EXPERT}.w2.weight": ("experts.down_kernel", True),
}
_QWEN_MLP = {
    "mlp.gate.weight": ("router.kernel", True),
    **{f"mlp.experts.{_EXPERT}.{p}_proj.weight": (f"experts.{p}_kernel", True)
       for p in ("gate", "up", "down")},
    **{f"mlp.shared_expert.{p}_proj.weight": (f"shared_expert.{p}_proj.kernel", True)
       for p in ("gate", "up", "down")},
    "mlp.shared_expert_gate.weight": ("shared_expert_gate.kernel", True),
}


def _names(mlp: Mapping[str, tuple[str, bool]]) -> ExpertTensorNameMap:
    return ExpertTensorNameMap(layer_prefix=llama_family.HF_NAMES.layer_prefix,
                               top=llama_family.HF_NAMES.top, layer={**_ATTENTION_NAMES, **mlp})


# Per architecture (the names a checkpoint of it has), and the union the loaders read with.
HF_NAMES_BY_ARCHITECTURE = {"MixtralForCausalLM": _names(_MIXTRAL_MLP),
                            "Qwen3MoeForCausalLM": _names(_QWEN_MLP),
                            "Qwen2MoeForCausalLM": _names(_QWEN_MLP)}
HF_NAMES = _names({**_QWEN_MLP, **_MIXTRAL_MLP})


def logical_axes(name: str) -> tuple[str, ...] | None:
    """Logical axes of parameter `name`: the MoE kinds here, the rest the Llama family's."""
    axes = MOE_AXES.get(".".join(name.split(".")[-2:]))
    return axes if axes is not None else llama_family.logical_axes(name)


def config_from_hf(d: Mapping[str, Any], architecture: str) -> ModelConfig:
    """The ModelConfig of a Mixtral / Qwen-MoE config.json dict."""
    base, experts_key, width_key = ARCHITECTURES[architecture]
    if int(d.get("decoder_sparse_step", 1)) != 1 or d.get("mlp_only_layers"):
        raise ValueError(f"{architecture}: layers with a dense MLP (decoder_sparse_step "
                         f"{d.get('decoder_sparse_step')}, mlp_only_layers "
                         f"{d.get('mlp_only_layers')}) are not supported; every layer must be MoE")
    num_experts = d.get(experts_key) or d.get("num_local_experts") or d.get("num_experts")
    cfg = llama_family.config_from_hf(d, base)
    return dataclasses.replace(
        cfg, architecture=architecture,
        num_experts=int(num_experts),
        num_experts_per_tok=int(d["num_experts_per_tok"]),
        moe_intermediate_size=int(d[width_key]),
        norm_topk_prob=(True if architecture == "MixtralForCausalLM"
                        else bool(d.get("norm_topk_prob", False))),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """An HF-style config.json dict that `config_from_hf` reads back to `cfg`."""
    base, experts_key, width_key = ARCHITECTURES[cfg.architecture]
    d = llama_family.config_to_hf(dataclasses.replace(cfg, architecture=base))
    model_type = next(t for t, a in MODEL_TYPES.items() if a == cfg.architecture)
    d.update({"architectures": [cfg.architecture], "model_type": model_type,
              experts_key: cfg.num_experts,
              "num_experts_per_tok": cfg.num_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob,
              "decoder_sparse_step": 1, "mlp_only_layers": []})
    d[width_key] = cfg.moe_intermediate_size  # Mixtral: its intermediate_size is the experts'
    if cfg.shared_expert_intermediate_size:
        d["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    return d


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Llama family's attention parameters plus each layer's router and stacked experts."""
    base = ARCHITECTURES[cfg.architecture][0]
    shapes = {name: shape for name, shape in
              llama_family.param_shapes(dataclasses.replace(cfg, architecture=base)).items()
              if not name.endswith(_DENSE_MLP)}
    e, n, m = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    s = cfg.shared_expert_intermediate_size
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "router.kernel"] = (e, n)
        shapes[p + "experts.gate_kernel"] = (n, e, m)
        shapes[p + "experts.up_kernel"] = (n, e, m)
        shapes[p + "experts.down_kernel"] = (n, m, e)
        if s:
            shapes[p + "shared_expert.gate_proj.kernel"] = (e, s)
            shapes[p + "shared_expert.up_proj.kernel"] = (e, s)
            shapes[p + "shared_expert.down_proj.kernel"] = (s, e)
            shapes[p + "shared_expert_gate.kernel"] = (e, 1)
    return shapes


class MoeFamily(HFOnly):
    """The mixture-of-experts family as the registry sees it (a ModelFamily)."""

    name = "moe"
    architectures = tuple(ARCHITECTURES)
    model_types = MODEL_TYPES
    hf_names = HF_NAMES
    # Named so that their files fail with a clear message (config_from_gguf).
    gguf_architectures: Mapping[str, str] = {"qwen3moe": "Qwen3MoeForCausalLM",
                                             "qwen2moe": "Qwen2MoeForCausalLM"}
    gguf_refusal = ("mixture-of-experts GGUF files are not supported; load the HF safetensors "
                    "checkpoint instead")
    # The module's functions (implementing ModelFamily's methods of those names).
    config_from_hf = staticmethod(config_from_hf)
    config_to_hf = staticmethod(config_to_hf)
    param_shapes = staticmethod(param_shapes)
    logical_axes = staticmethod(logical_axes)

    def hf_names_for(self, architecture: str) -> TensorNameMap:
        """The tensor names of a checkpoint of `architecture` (`hf_names` reads them all)."""
        return HF_NAMES_BY_ARCHITECTURE[architecture]

    def build(self, cfg: ModelConfig, params: Mapping[str, Any], dtype: Any,
              quantized: Any, max_positions: int | None) -> CausalLM:
        return MoeModel(cfg, params, dtype, quantized, max_positions)


FAMILY = MoeFamily()
