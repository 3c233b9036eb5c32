"""Flax NNX models, one module per architecture family, found through the registry."""

from jaxllm.models.base import CausalLM, ModelFamily
from jaxllm.models.dtypes import resolve_compute_dtype
from jaxllm.models.llama import LlamaModel
from jaxllm.models.registry import build_model, family_for, supported_architectures

__all__ = ["CausalLM", "LlamaModel", "ModelFamily", "build_model", "family_for",
           "resolve_compute_dtype", "supported_architectures"]
