"""Architecture name -> the family module that owns it, and the model builder.

Every place that needs per-architecture knowledge (config parsing, parameter shapes and
axes, checkpoint tensor names, building the network) asks the registry for the family of a
config's `architecture` (or of a GGUF file's `general.architecture`). Adding an architecture
family is one module implementing `jaxllm.models.base.ModelFamily` plus one entry in
`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from jaxllm.config import ModelConfig
from jaxllm.models import gemma_family, llama_family, moe_family
from jaxllm.models.base import CausalLM, ModelFamily
from jaxllm.models.dtypes import resolve_compute_dtype

if TYPE_CHECKING:
    import jax.numpy as jnp

    from jaxllm.models.quantized_layers import QuantizedMatmulOptions

FAMILIES: tuple[ModelFamily, ...] = (llama_family.FAMILY, moe_family.FAMILY,
                                      gemma_family.FAMILY)


def supported_architectures() -> list[str]:
    """Every HF `architectures` name some family serves, sorted."""
    return sorted(a for f in FAMILIES for a in f.architectures)


def family_for(architecture: str) -> ModelFamily:
    """The family serving HF architecture `architecture`; ValueError naming the supported ones."""
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                     f"{', '.join(supported_architectures())}")


def architecture_of(hf_config: Mapping[str, Any]) -> str:
    """The HF architecture a config.json dict names (its `architectures` list, else its
    `model_type` through the families' tables)."""
    archs = hf_config.get("architectures") or []
    if archs:
        return str(archs[0])
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family.model_types[model_type]
    return f"<model_type {model_type!r}>"


def config_from_hf_dict(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of an HF config.json dict, parsed by its architecture's family."""
    architecture = architecture_of(hf_config)
    return family_for(architecture).config_from_hf(hf_config, architecture)


def family_for_gguf(gguf_architecture: str) -> ModelFamily:
    """The family loading GGUF files of `general.architecture` = `gguf_architecture`."""
    for family in FAMILIES:
        if gguf_architecture in family.gguf_architectures:
            return family
    supported = sorted(a for f in FAMILIES for a in f.gguf_architectures)
    raise ValueError(f"unsupported GGUF architecture {gguf_architecture!r}; supported: "
                     f"{', '.join(supported)}")


def build_model(cfg: ModelConfig, params: Mapping[str, Any], dtype: str | jnp.dtype = "auto",
                quantized: QuantizedMatmulOptions | None = None,
                max_positions: int | None = None) -> CausalLM:
    """The model for `cfg` holding `params` (flat naming of jaxllm.models.params).

    dtype: "auto" (jaxllm.models.dtypes policy for cfg.torch_dtype), "float32", "bfloat16"
    or a dtype. `quantized` picks the matmul of weights kept in GGUF blocks (None: by
    backend, float32 activations). `max_positions`: positions the model can embed (default
    the model's maximum).
    """
    compute = resolve_compute_dtype(dtype, cfg.torch_dtype)
    return family_for(cfg.architecture).build(cfg, params, compute, quantized, max_positions)
