"""Run an attention function per `model` shard on its local heads (jax.shard_map).

Under tensor parallelism q/k/v arrive split by head (the q/k/v projections are
column-parallel) and each layer's KV cache is split along its head axis (dim 2 of
[pages, page_size, 2*Hkv, D], whole K/V pairs per device). Attention never mixes heads, so
each device can run the unmodified single-device kernel on its slice: no collective is needed
inside attention, and the kernel never sees the mesh. The step metadata (page tables, lengths)
is small and replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxllm.parallel.rules import DEFAULT_RULES, KV_CACHE_LOGICAL_AXES, ShardingRules

AttentionFn = Callable[..., tuple[jax.Array, Any]]


def shard_attention(attn_fn: AttentionFn, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                    *, check_vma: bool = False) -> AttentionFn:
    """Wrap `attn_fn(q, k, v, layer_cache, metadata, **static) -> (out, layer_cache)`.

    q [T, Hq, D], k/v [T, Hkv, D] are split on heads, layer_cache (an array, a pytree of
    arrays, or None) on dim 2, metadata replicated; keyword arguments are static and passed
    through. Hq and Hkv must both divide by the `model` axis size (see pad_heads_for_tp).
    check_vma defaults off because Pallas kernels in interpret mode do not declare how
    their outputs vary over the mesh.
    """
    heads = rules.partition_spec(("tokens", "q_heads", "head_dim"))
    kv_heads = rules.partition_spec(("tokens", "kv_heads", "head_dim"))
    cache = rules.partition_spec(KV_CACHE_LOGICAL_AXES)
    replicated = PartitionSpec()
    axis = heads[1]

    @functools.wraps(attn_fn)
    def sharded(q, k, v, layer_cache, metadata, **static):
        if axis is not None:
            parts = mesh.shape[axis]
            if q.shape[1] % parts or k.shape[1] % parts:
                raise ValueError(
                    f"{q.shape[1]} query / {k.shape[1]} KV heads do not split over {parts} "
                    f"devices of mesh axis {axis!r}; pad them with pad_heads_for_tp")

        def local(q, k, v, layer_cache, metadata):
            return attn_fn(q, k, v, layer_cache, metadata, **static)

        cache_specs = jax.tree.map(lambda _: cache, layer_cache)
        meta_specs = jax.tree.map(lambda _: replicated, metadata)
        run = jax.shard_map(
            local, mesh=mesh,
            in_specs=(heads, kv_heads, kv_heads, cache_specs, meta_specs),
            out_specs=(heads, cache_specs), check_vma=check_vma)
        return run(q, k, v, layer_cache, metadata)

    return sharded
