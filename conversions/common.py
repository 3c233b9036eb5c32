"""What every loader shares: the loaded-checkpoint record and the dtype policy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxllm.config import ModelConfig

# Requested dtypes. "checkpoint" keeps the checkpoint's own dtype (what conversion wants:
# nothing is lost); "auto" is the runtime policy: checkpoint dtype on accelerators, float32 on
# CPU (XLA CPU is slow and inexact in bfloat16).
DTYPE_CHOICES = ("auto", "checkpoint", "float32", "bfloat16", "float16")

_NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


@dataclass
class LoadedCheckpoint:
    """A loaded model: config, flat params (see jaxllm.models.params) and side files.

    `generation_config` is the checkpoint's generation_config.json as a dict ({} if none;
    for GGUF, bos/eos ids from its metadata). `tokenizer_path` is what
    `jaxllm.tokenizer.load_tokenizer` accepts for this checkpoint (a directory or the .gguf
    file). `hf_config` is an HF-style config.json dict. Unpacks as `(config, params)`.
    """

    config: ModelConfig
    params: dict[str, np.ndarray]
    generation_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: Path | None = None
    source_format: str = ""  # "hf" | "gguf" | "jaxllm"
    hf_config: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        """Tuple-style unpacking: `config, params = load_checkpoint(path)`."""
        return iter((self.config, self.params))


def normalize_dtype_name(name: str) -> str:
    """'torch.bfloat16' / 'bf16' / 'float' -> 'bfloat16' / 'float32'; unknown -> ValueError."""
    n = str(name).lower().removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "f32": "float32", "f16": "float16"}
    n = aliases.get(n, n)
    if n not in _NP_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(_NP_DTYPES)}")
    return n


def resolve_dtype(requested: str, checkpoint_dtype: str) -> np.dtype:
    """The numpy dtype params are returned in, from the requested policy (see DTYPE_CHOICES)."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested == "auto":
        import jax

        requested = "float32" if jax.default_backend() == "cpu" else checkpoint_dtype
    elif requested == "checkpoint":
        requested = checkpoint_dtype
    return _NP_DTYPES[normalize_dtype_name(requested)]


def dtype_name(dtype: np.dtype) -> str:
    for name, d in _NP_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported parameter dtype {dtype}")
