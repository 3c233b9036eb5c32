"""What every loader returns: the loaded-checkpoint record.

The dtype policy the loaders apply is `jaxllm.models.dtypes` (one rule for "auto" everywhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig


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
