"""Tensor, data and multi-host parallelism: meshes, partition rules, head padding, shard_map.

The runner's recipe:

    config, params = pad_heads_for_tp(config, params, tp)        # before building the model
    mesh = make_mesh(tp, dp)                                      # ("data", "model")
    for slice_mesh in data_slice_meshes(mesh):                    # one engine per data slice
        model = shard_model(build_model(config, params), slice_mesh)
        caches = allocate_kv_caches(..., sharding=kv_cache_sharding(slice_mesh))
        attention = shard_attention(paged_attention_fn, slice_mesh)
"""

from jaxllm.parallel.attention import shard_attention
from jaxllm.parallel.data_parallel import LoadBalancer
from jaxllm.parallel.distributed import (
    CollectiveWatchdog,
    FollowerLostError,
    HeartbeatMonitor,
    StepBroadcaster,
    initialize_distributed,
    is_leader,
)
from jaxllm.parallel.head_padding import HeadLayout, pad_heads_for_tp, plan_head_layout
from jaxllm.parallel.mesh import MESH_AXES, data_slice_meshes, make_mesh, single_device_mesh
from jaxllm.parallel.rules import (
    DATA_AXIS,
    DEFAULT_LOGICAL_RULES,
    DEFAULT_RULES,
    KV_CACHE_LOGICAL_AXES,
    MODEL_AXIS,
    ShardingRules,
    bind_mesh,
    flat_param_shardings,
    kv_cache_sharding,
    model_shardings,
    place_array,
    shard_model,
)

__all__ = [
    "DATA_AXIS", "DEFAULT_LOGICAL_RULES", "DEFAULT_RULES", "KV_CACHE_LOGICAL_AXES", "MESH_AXES",
    "MODEL_AXIS", "CollectiveWatchdog", "FollowerLostError", "HeadLayout", "HeartbeatMonitor",
    "LoadBalancer", "ShardingRules", "StepBroadcaster", "bind_mesh", "data_slice_meshes",
    "flat_param_shardings", "initialize_distributed", "is_leader", "kv_cache_sharding", "make_mesh", "model_shardings",
    "pad_heads_for_tp", "place_array", "plan_head_layout", "shard_attention", "shard_model",
    "single_device_mesh",
]
