"""The Llama family's network (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

The forward runs the unified ragged step: a flat token axis `[T]` with positions, every
sequence of the batch concatenated. Attention is one replaceable function
(`attention_fn(q, k, v, layer_cache, metadata, *, sm_scale, sliding_window, soft_cap)
-> (out, layer_cache)`): dense causal attention for the plain path, ragged paged attention
(jaxllm.kernels) in the engine. The family's config, parameter names and checkpoint name
maps are in `jaxllm.models.llama_family`; build it with `jaxllm.models.build_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.kernels.quantized_weights import PackedWeight
from jaxllm.models.base import AttentionFn
from jaxllm.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    rope_inverse_frequencies,
    rope_tables,
)
from jaxllm.models.params import check_params, logical_axes
from jaxllm.models.quantized_layers import (
    QuantizedEmbed,
    QuantizedLinear,
    QuantizedMatmulOptions,
    fused_linear,
)

_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "gelu_pytorch_tanh": jax.nn.gelu}


def make_linear(params: Mapping[str, Any], name: str, dtype,
                quantized: QuantizedMatmulOptions | None = None) -> Linear | QuantizedLinear:
    """The layer for `name.kernel` (+ `name.bias`): dense, or in blocks for a PackedWeight."""
    kernel, bias = params[f"{name}.kernel"], params.get(f"{name}.bias")
    if isinstance(kernel, PackedWeight):
        return QuantizedLinear(kernel, bias, quantized or QuantizedMatmulOptions())
    return Linear(kernel, bias, logical_axes(f"{name}.kernel"), dtype)


class DecoderLayer(nnx.Module):
    """Pre-norm attention block then pre-norm gated MLP, each with a residual."""

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], prefix: str, dtype,
                 quantized: QuantizedMatmulOptions | None = None) -> None:
        def linear(name: str) -> Linear | QuantizedLinear:
            return make_linear(params, prefix + name, dtype, quantized)

        def norm(name: str, eps: float) -> RMSNorm:
            return RMSNorm(params[f"{prefix}{name}.scale"], eps, logical_axes(f"{name}.scale"), dtype)

        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.input_norm = norm("input_norm", cfg.rms_norm_eps)
        # Weights in GGUF blocks: q/k/v and gate/up each run as one kernel call when they can.
        qkv = gate_up = None
        if isinstance(params[f"{prefix}q_proj.kernel"], PackedWeight):
            options = quantized or QuantizedMatmulOptions()
            qkv = fused_linear(params, prefix, ("q_proj", "k_proj", "v_proj"), options)
            gate_up = fused_linear(params, prefix, ("gate_proj", "up_proj"), options)
        self.qkv_proj, self.gate_up_proj = nnx.data(qkv), nnx.data(gate_up)
        if self.qkv_proj is None:
            self.q_proj, self.k_proj, self.v_proj = (
                linear("q_proj"), linear("k_proj"), linear("v_proj"))
        self.o_proj = linear("o_proj")
        self.q_norm = norm("q_norm", cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = norm("k_norm", cfg.rms_norm_eps) if cfg.qk_norm else None
        self.post_attention_norm = norm("post_attention_norm", cfg.rms_norm_eps)
        self._build_mlp(cfg, params, prefix, dtype, quantized)

    def _build_mlp(self, cfg: ModelConfig, params: Mapping[str, Any], prefix: str, dtype,
                   quantized: QuantizedMatmulOptions | None) -> None:
        """The gated MLP's layers (mixture-of-experts layers override this and `_mlp`)."""
        if self.gate_up_proj is None:
            self.gate_proj = make_linear(params, prefix + "gate_proj", dtype, quantized)
            self.up_proj = make_linear(params, prefix + "up_proj", dtype, quantized)
        self.down_proj = make_linear(params, prefix + "down_proj", dtype, quantized)

    def _mlp(self, h: jax.Array) -> jax.Array:
        gate, up = self._gate_up(h)
        return self.down_proj(self.act(gate) * up)

    def _qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.qkv_proj is None:
            return self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(h)
        return qkv[:, :q_size], qkv[:, q_size:q_size + kv_size], qkv[:, q_size + kv_size:]

    def _gate_up(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.gate_up_proj is None:
            return self.gate_proj(h), self.up_proj(h)
        gate_up = self.gate_up_proj(h)
        half = gate_up.shape[-1] // 2
        return gate_up[:, :half], gate_up[:, half:]

    def __call__(self, x, rope_cos, rope_sin, layer_cache, metadata, attention_fn: AttentionFn):
        t = x.shape[0]
        h = self.input_norm(x)
        q, k, v = self._qkv(h)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        attn, layer_cache = attention_fn(
            q, k, v, layer_cache, metadata,
            sm_scale=self.head_dim ** -0.5, sliding_window=self.sliding_window, soft_cap=None)
        x = x + self.o_proj(attn.reshape(t, self.num_heads * self.head_dim))
        x = x + self._mlp(self.post_attention_norm(x))
        return x, layer_cache


class LlamaModel(nnx.Module):
    """Embedding, decoder layers (unrolled: measured faster than a scan on XLA CPU), final norm, LM head.

    `layer_class` builds each decoder layer (families with another MLP subclass it).
    Params may hold `PackedWeight`s (GGUF blocks) for linear kernels and the embedding; those
    layers take and give float32, so the model's dtype must then be float32. `quantized` picks
    their matmul's impl and activation precision (None: by backend, float32).
    """

    layer_class: type[DecoderLayer] = DecoderLayer

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], dtype=jnp.float32,
                 quantized: QuantizedMatmulOptions | None = None,
                 max_positions: int | None = None) -> None:
        check_params(cfg, params, "model parameters")
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        packed = [k for k, v in params.items() if isinstance(v, PackedWeight)]
        if packed and self.dtype != jnp.float32:
            raise ValueError(f"weights kept in quantization blocks ({packed[0]}, ...) compute in "
                             f"float32; dtype {self.dtype} was asked for")
        table = params["embed_tokens.embedding"]
        self.embed_tokens = (QuantizedEmbed(table, quantized or QuantizedMatmulOptions())
                             if isinstance(table, PackedWeight) else Embed(table, self.dtype))
        self.layers = nnx.List(
            [self.layer_class(cfg, params, f"layers.{i}.", self.dtype, quantized)
             for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(params["final_norm.scale"], cfg.rms_norm_eps, ("embed",), self.dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        make_linear(params, "lm_head", self.dtype, quantized))
        # Positions past the table (max_positions, default the model's maximum) would read its
        # last row: the engine admits none (max_model_len <= max_positions), plain_decode checks.
        cos, sin = rope_tables(rope_inverse_frequencies(cfg),
                               max(1, max_positions or cfg.max_position_embeddings))
        self.rope_cos, self.rope_sin = nnx.Variable(jnp.asarray(cos)), nnx.Variable(jnp.asarray(sin))

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list | None,
                 metadata: Any, attention_fn: AttentionFn) -> tuple[jax.Array, list]:
        """Hidden states [T, E] after the final norm, and the updated per-layer caches."""
        x = self.embed_tokens(input_ids)
        caches = list(kv_caches) if kv_caches is not None else [None] * len(self.layers)
        cos = jnp.take(self.rope_cos[...], positions, axis=0, mode="clip")
        sin = jnp.take(self.rope_sin[...], positions, axis=0, mode="clip")
        for i, layer in enumerate(self.layers):
            x, caches[i] = layer(x, cos, sin, caches[i], metadata, attention_fn)
        return self.final_norm(x), caches

    @property
    def max_positions(self) -> int:
        """Positions 0 .. max_positions - 1 have rotary angles (the cos/sin table's rows)."""
        return self.rope_cos.shape[0]

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [N, V] for the rows that need them."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head.logits(hidden)
