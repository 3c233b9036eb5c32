"""Readers for config.json fields whose meaning is shared by every architecture family.

Families parse their own switches; rope settings (both config.json generations: the
transformers-5 `rope_parameters` form and the older `rope_theta` / `rope_scaling` form),
token ids and the stored dtype read the same everywhere, so they are read here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxllm.config import RopeScaling

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
