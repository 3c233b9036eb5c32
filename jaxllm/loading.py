"""Everything the engine needs before it can run: model, tokenizer and resolved sizes.

Kept apart from the engine so the loop reads as scheduling and stepping only. Tensor / data
parallel placement hooks in here (`kv_sharding`, `attention_wrapper`) when a mesh is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.models.llama import LlamaModel, build_model, resolve_dtype
from jaxllm.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class EngineParts:
    model_config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    generation_config: dict[str, Any]
    default_name: str
    max_model_len: int
    page_size: int
    dtype: jnp.dtype
    kv_sharding: Any = None
    attention_wrapper: Callable | None = None


def resolve_model_path(model: str | None) -> Path:
    """The given path, or the embedded default model's GGUF file."""
    if model is None:
        from jaxllm.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (no model hub is used: "
                                "pass a local HF directory, a jaxllm directory or a .gguf file)")
    return path


def load_engine_parts(config: EngineConfig) -> EngineParts:
    from jaxllm.conversions import load_checkpoint

    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    path = resolve_model_path(config.model)
    ckpt = load_checkpoint(path, dtype=config.dtype)
    cfg = ckpt.config
    dtype = resolve_dtype(config.dtype, cfg.torch_dtype)
    tokenizer = load_tokenizer(ckpt.tokenizer_path or path)
    max_len = config.max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if max_len > cfg.max_position_embeddings:
        logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                       max_len, cfg.max_position_embeddings)
    page_size = config.page_size or (16 if jax.default_backend() == "cpu" else 64)
    model = build_model(cfg, ckpt.params, dtype)
    del ckpt.params
    name = path.stem if path.is_file() else path.name
    return EngineParts(model_config=cfg, model=model, tokenizer=tokenizer,
                       generation_config=dict(ckpt.generation_config), default_name=name,
                       max_model_len=max_len, page_size=page_size, dtype=jnp.dtype(dtype))
