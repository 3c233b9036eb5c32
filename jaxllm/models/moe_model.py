"""Mixture-of-experts decoder (Mixtral, Qwen3-MoE, Qwen2-MoE): the Llama network with a
routed-experts MLP in every layer.

Attention, norms, embedding and LM head are the Llama family's (`LlamaModel` with another
`layer_class`). The MoE block routes each token to its top-k experts (`jaxllm.models.moe`)
and, for Qwen2-MoE, adds a sigmoid-gated shared expert.

Expert parallelism: the stacked expert weights carry the logical axes ("expert", "embed",
"expert_mlp"), which the sharding rules put on the `model` mesh axis (experts split across
devices; `expert_mlp` splits each expert instead when the expert count does not divide, or
under rules that keep experts whole). After placement, `bind_mesh` tells each block the mesh:
the block then runs under `jax.shard_map`, every device computing its own experts' (or
slices') contributions for all tokens, and one psum over `model` adds them up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxllm.config import ModelConfig
from jaxllm.models.layers import make_param
from jaxllm.models.llama import DecoderLayer, LlamaModel, make_linear
from jaxllm.models.moe import default_grouped_impl, expert_mlp, route
from jaxllm.models.quantized_layers import QuantizedMatmulOptions

ROUTER_AXES = ("embed", "router_experts")  # router_experts: never sharded (small, all needed)
GATE_UP_AXES = ("expert", "embed", "expert_mlp")
DOWN_AXES = ("expert", "expert_mlp", "embed")

_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}


class MoeBlock(nnx.Module):
    """Router + routed experts (+ optional gated shared expert) of one layer."""

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], prefix: str, dtype,
                 impl: str | None = None) -> None:
        self.router = make_param(params[prefix + "router.kernel"], ROUTER_AXES, dtype)
        self.gate_w = make_param(params[prefix + "experts.gate_kernel"], GATE_UP_AXES, dtype)
        self.up_w = make_param(params[prefix + "experts.up_kernel"], GATE_UP_AXES, dtype)
        self.down_w = make_param(params[prefix + "experts.down_kernel"], DOWN_AXES, dtype)
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.impl = impl or default_grouped_impl()
        self.shared = cfg.shared_expert_intermediate_size > 0
        if self.shared:
            self.shared_gate_proj = make_linear(params, prefix + "shared_expert.gate_proj", dtype)
            self.shared_up_proj = make_linear(params, prefix + "shared_expert.up_proj", dtype)
            self.shared_down_proj = make_linear(params, prefix + "shared_expert.down_proj", dtype)
            self.shared_expert_gate = make_linear(params, prefix + "shared_expert_gate", dtype)
        self.mesh: Mesh | None = None
        self.specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None = None

    def bind_mesh(self, mesh: Mesh, rules: Any) -> None:
        """Run expert-parallel on `mesh`, the weights being placed by `rules`
        (a jaxllm.parallel.ShardingRules)."""
        self.mesh = mesh
        self.specs = tuple(rules.partition_spec(axes, tuple(w.shape), mesh) for axes, w in (
            (GATE_UP_AXES, self.gate_w), (GATE_UP_AXES, self.up_w), (DOWN_AXES, self.down_w)))

    def _routed(self, h: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        gate_w, up_w, down_w = self.gate_w[...], self.up_w[...], self.down_w[...]
        if self.mesh is None:
            return expert_mlp(h, weights, ids, gate_w, up_w, down_w, self.act, self.impl)
        gate_spec, up_spec, down_spec = self.specs
        expert_axis = gate_spec[0]
        axes = {a for spec in self.specs for a in spec if a is not None}
        act, impl, router_width = self.act, self.impl, self.router.shape[1]

        def local(h, weights, ids, gate_w, up_w, down_w):
            first = (jax.lax.axis_index(expert_axis) * gate_w.shape[0]
                     if expert_axis is not None else 0)
            out = expert_mlp(h, weights, ids, gate_w, up_w, down_w, act, impl, first,
                             total_experts=router_width)
            return jax.lax.psum(out, tuple(sorted(axes))) if axes else out

        rep = PartitionSpec()
        return jax.shard_map(local, mesh=self.mesh,
                             in_specs=(rep, rep, rep, gate_spec, up_spec, down_spec),
                             out_specs=rep, check_vma=False)(h, weights, ids, gate_w, up_w, down_w)

    def __call__(self, h: jax.Array) -> jax.Array:
        logits = jnp.dot(h, self.router[...], preferred_element_type=jnp.float32)
        weights, ids = route(logits, self.top_k, self.normalize)
        out = self._routed(h, weights, ids).astype(h.dtype)
        if self.shared:
            shared = self.shared_down_proj(
                self.act(self.shared_gate_proj(h)) * self.shared_up_proj(h))
            out = out + jax.nn.sigmoid(self.shared_expert_gate(h)) * shared
        return out


class MoeDecoderLayer(DecoderLayer):
    """A Llama decoder layer whose MLP is a `MoeBlock`."""

    def _build_mlp(self, cfg: ModelConfig, params: Mapping[str, Any], prefix: str, dtype,
                   quantized: QuantizedMatmulOptions | None) -> None:
        self.moe = MoeBlock(cfg, params, prefix, dtype)

    def _mlp(self, h: jax.Array) -> jax.Array:
        return self.moe(h)


class MoeModel(LlamaModel):
    """Embedding, MoE decoder layers, final norm, LM head (see the module doc)."""

    layer_class = MoeDecoderLayer
