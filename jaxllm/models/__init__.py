"""Flax NNX model definitions of the Llama family."""

from jaxllm.models.llama import LlamaModel, build_model, resolve_dtype

__all__ = ["LlamaModel", "build_model", "resolve_dtype"]
