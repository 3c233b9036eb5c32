"""Make attention-head counts fit a tensor-parallel size, without changing the model's function.

Every `model` shard must hold whole KV heads together with all of the query heads that read
them. When the KV-head count is a multiple of the TP size that already holds. Otherwise the
heads are rearranged on the flat parameter dict before the model is built:

* more KV heads than shards (e.g. 3 over 2): add zero KV heads, each with a group of zero
  query heads, up to the next multiple of the TP size;
* fewer KV heads than shards (e.g. 3 over 4 or 8): every shard holds one copy of a KV head
  (heads replicated as evenly as possible), and each copy serves a share of its head's query
  group, padded with zero query heads to the same group size everywhere.

A zero query head's o_proj rows are zero, so whatever it attends to adds nothing to the
output; copies of a KV head compute the same K/V as the original. Logits are therefore those
of the original model (to float rounding), at the price of the padded heads' compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig


@dataclass(frozen=True)
class HeadLayout:
    """Where each new head comes from: an original head index, or -1 for a zero head.

    Query head j of the new layout belongs to KV head j // (len(q_source) // len(kv_source)),
    the same grouping rule the model uses.
    """

    q_source: tuple[int, ...]
    kv_source: tuple[int, ...]

    @property
    def num_heads(self) -> int:
        return len(self.q_source)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_source)

    @property
    def is_identity(self) -> bool:
        return (self.q_source == tuple(range(len(self.q_source)))
                and self.kv_source == tuple(range(len(self.kv_source))))


def plan_head_layout(num_heads: int, num_kv_heads: int, tp: int) -> HeadLayout:
    """The head arrangement for `tp` shards (identity when the KV heads already divide)."""
    if min(num_heads, num_kv_heads, tp) < 1:
        raise ValueError(f"head counts and tp must be >= 1, got num_heads={num_heads}, "
                         f"num_kv_heads={num_kv_heads}, tp={tp}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    group = num_heads // num_kv_heads
    if num_kv_heads % tp == 0:
        return HeadLayout(tuple(range(num_heads)), tuple(range(num_kv_heads)))
    if num_kv_heads > tp:
        padded_kv = -(-num_kv_heads // tp) * tp
        kv_source = list(range(num_kv_heads)) + [-1] * (padded_kv - num_kv_heads)
        q_source = [h * group + g if h >= 0 else -1 for h in kv_source for g in range(group)]
        return HeadLayout(tuple(q_source), tuple(kv_source))
    # Fewer KV heads than shards: one KV-head copy per shard, copies spread evenly.
    copies = [tp // num_kv_heads + (1 if h < tp % num_kv_heads else 0) for h in range(num_kv_heads)]
    new_group = -(-group // min(copies))
    kv_source, q_source = [], []
    for h, n in enumerate(copies):
        for share in np.array_split(np.arange(h * group, (h + 1) * group), n):
            kv_source.append(h)
            q_source.extend(int(j) for j in share)
            q_source.extend([-1] * (new_group - len(share)))
    return HeadLayout(tuple(q_source), tuple(kv_source))


def _gather_heads(x: Any, source: tuple[int, ...], head_dim: int, axis: int) -> Any:
    """Rearrange the head blocks of `axis` (size heads*head_dim) by `source`; -1 gives zeros."""
    xp = np if isinstance(x, np.ndarray) else jnp
    shape = list(x.shape)
    heads = shape[axis] // head_dim
    split = shape[:axis] + [heads, head_dim] + shape[axis + 1:]
    blocks = xp.reshape(x, split)
    src = np.asarray(source)
    taken = xp.take(blocks, np.maximum(src, 0), axis=axis)
    keep = (src >= 0).reshape([-1 if i == axis else 1 for i in range(len(split))])
    taken = xp.where(keep, taken, xp.zeros((), dtype=taken.dtype))
    shape[axis] = len(source) * head_dim
    return xp.reshape(taken, shape)


# Per-layer parameters whose head axis is rearranged: (name suffix, which heads, axis).
_HEAD_AXES = (
    ("q_proj.kernel", "q", 1), ("q_proj.bias", "q", 0),
    ("k_proj.kernel", "kv", 1), ("k_proj.bias", "kv", 0),
    ("v_proj.kernel", "kv", 1), ("v_proj.bias", "kv", 0),
    ("o_proj.kernel", "q", 0),
)


def pad_heads_for_tp(config: ModelConfig, params: Mapping[str, Any],
                     tp: int) -> tuple[ModelConfig, dict[str, Any]]:
    """(config', params') whose head counts shard over `tp` devices; same logits as the input.

    Params are the flat dict of jaxllm.models.params (numpy or jax arrays). Returns the
    inputs unchanged (as a new dict) when no rearrangement is needed.
    """
    layout = plan_head_layout(config.num_heads, config.num_kv_heads, tp)
    if layout.is_identity:
        return config, dict(params)
    out = dict(params)
    d = config.head_dim
    for i in range(config.num_layers):
        for suffix, which, axis in _HEAD_AXES:
            name = f"layers.{i}.{suffix}"
            if name in out:
                source = layout.q_source if which == "q" else layout.kv_source
                out[name] = _gather_heads(out[name], source, d, axis)
    new_config = dataclasses.replace(config, num_heads=layout.num_heads,
                                     num_kv_heads=layout.num_kv_heads)
    return new_config, out
