"""A checkpoint format's tensor names <-> jaxllm's flat parameter names, for one family.

Decoder checkpoints name their tensors as a few top-level names plus per-layer names
`{prefix}{layer index}.{suffix}` (HF: `model.layers.3.self_attn.q_proj.weight`, GGUF:
`blk.3.attn_q.weight`). A `TensorNameMap` holds those two tables, each entry saying which
flat jaxllm name a tensor becomes and whether it is a PyTorch/ggml `[out, in]` matrix to
transpose to our `[in, out]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorNameMap:
    """Top-level and per-layer name tables of one checkpoint format."""

    layer_prefix: str  # e.g. "model.layers." (HF) or "blk." (GGUF)
    top: Mapping[str, tuple[str, bool]]  # source name -> (jaxllm name, transpose?)
    layer: Mapping[str, tuple[str, bool]]  # source suffix -> (jaxllm suffix, transpose?)

    def to_jaxllm(self, source_name: str) -> tuple[str, bool] | None:
        """(jaxllm name, transpose?) for a source tensor name, or None if it is not a weight."""
        if source_name in self.top:
            return self.top[source_name]
        if not source_name.startswith(self.layer_prefix):
            return None
        index, _, suffix = source_name[len(self.layer_prefix):].partition(".")
        mapped = self.layer.get(suffix) if index.isdigit() else None
        if mapped is None:
            return None
        return f"layers.{index}.{mapped[0]}", mapped[1]

    def to_source(self, name: str) -> str:
        """The source tensor name a jaxllm parameter comes from (errors, export)."""
        for source, (ours, _) in self.top.items():
            if ours == name:
                return source
        head, _, rest = name.partition(".")
        index, _, suffix = rest.partition(".")
        if head == "layers" and index.isdigit():
            for source, (ours, _) in self.layer.items():
                if ours == suffix:
                    return f"{self.layer_prefix}{index}.{source}"
        raise KeyError(f"no source tensor name for parameter {name!r}")
