"""Readers for config.json fields whose meaning is shared by every architecture family.

Families parse their own switches; the sizes, rope settings (both config.json generations:
the transformers-5 `rope_parameters` form and the older `rope_theta` / `rope_scaling` form),
token ids and the stored dtype read the same everywhere, so they are read here once
(`read_common`, and `common_to_hf` back), and each family extends them with its own fields.
`HFOnly` is the GGUF side of a family that reads HF checkpoints only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.models.tensor_names import TensorNameMap

if TYPE_CHECKING:
    from jaxllm.models.base import GGUFMetadata

ROPE_SCALING_KINDS = ("default", "linear", "llama3")


def read_rope(d: Mapping[str, Any]) -> tuple[float, RopeScaling, float]:
    """Rope theta, scaling and partial rotary factor from either config.json generation."""
    params = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    src = params if params.get("rope_type") not in (None, "default") else legacy
    kind = src.get("rope_type") or src.get("type") or "default"
    partial = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    if kind == "default":
        return theta, RopeScaling(), partial
    if kind not in ROPE_SCALING_KINDS:
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: "
                         f"{', '.join(ROPE_SCALING_KINDS)}")
    return theta, RopeScaling(
        kind=kind,
        factor=float(src.get("factor", 1.0)),
        low_freq_factor=float(src.get("low_freq_factor", 1.0)),
        high_freq_factor=float(src.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(src.get("original_max_position_embeddings", 8192)),
    ), partial


def rope_to_hf(scaling: RopeScaling) -> dict[str, Any] | None:
    """The legacy `rope_scaling` entry `read_rope` reads back to `scaling`."""
    if scaling.kind == "default":
        return None
    return {"rope_type": scaling.kind, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}


def read_eos_token_ids(d: Mapping[str, Any]) -> tuple[int, ...]:
    """`eos_token_id` (an int, a list or absent) as a tuple."""
    eos = d.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


def eos_token_ids_to_hf(ids: tuple[int, ...]) -> int | list[int]:
    """The `eos_token_id` entry `read_eos_token_ids` reads back to `ids`."""
    return list(ids) if len(ids) != 1 else ids[0]


def read_checkpoint_dtype(d: Mapping[str, Any]) -> str:
    """The dtype the checkpoint says it was saved in (`dtype`, or the older `torch_dtype`)."""
    return str(d.get("dtype") or d.get("torch_dtype") or "float32")


def read_common(d: Mapping[str, Any], *, rms_norm_eps: float, max_position_embeddings: int,
                tie_word_embeddings: bool, head_dim: int | None = None,
                rope: tuple[float, RopeScaling, float] | None = None) -> dict[str, Any]:
    """The ModelConfig fields every family reads alike, as keyword arguments for ModelConfig.

    The keyword arguments are the family's defaults for keys a config.json may leave out
    (`head_dim`: None means hidden_size // num_attention_heads); `rope` is the family's own
    reading of the rope fields (default: `read_rope(d)`)."""
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    rope_theta, scaling, partial = read_rope(d) if rope is None else rope
    return {
        "vocab_size": int(d["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(d["intermediate_size"]),
        "num_layers": int(d["num_hidden_layers"]),
        "num_heads": num_heads,
        "num_kv_heads": int(d.get("num_key_value_heads") or num_heads),
        "head_dim": int(d.get("head_dim") or head_dim or hidden // num_heads),
        "rms_norm_eps": float(d.get("rms_norm_eps", rms_norm_eps)),
        "rope_theta": rope_theta,
        "rope_scaling": scaling,
        "partial_rotary_factor": partial,
        "max_position_embeddings": int(d.get("max_position_embeddings",
                                             max_position_embeddings)),
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", tie_word_embeddings)),
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_ids": read_eos_token_ids(d),
        "torch_dtype": read_checkpoint_dtype(d),
    }


def common_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json entries `read_common` reads back to `cfg`'s common fields (and the
    `architectures` list); families add their own entries."""
    return {
        "architectures": [cfg.architecture],
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
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos_token_ids_to_hf(cfg.eos_token_ids),
        "torch_dtype": cfg.torch_dtype,
    }


class HFOnly:
    """The GGUF half of a ModelFamily for a family read from HF checkpoints only: no GGUF
    tensor names, and its GGUF files (any `gguf_architectures` a subclass names, so that
    they fail with this message) are refused with `gguf_refusal`."""

    gguf_architectures: Mapping[str, str] = {}
    gguf_names = TensorNameMap(layer_prefix="blk.", top={}, layer={})
    gguf_refusal = "GGUF files of this architecture are not supported"

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        raise ValueError(f"{meta.path}: {self.gguf_refusal}")

    def gguf_permuted_heads(self, cfg: ModelConfig, gguf_architecture: str,
                            name: str) -> int | None:
        return None
