"""The Gemma 2 / Gemma 3 network (text decoders).

Differences from the Llama network that matter for correctness: embeddings scaled by
sqrt(hidden); RMSNorms that scale by (1 + w); a norm before *and after* both the attention
and the MLP; GeGLU (tanh gelu) MLP; sm_scale from `query_pre_attn_scalar`; layers alternating
sliding-window and global attention, each layer passing its own window (and Gemma 2's
attention soft cap) to `attention_fn`; Gemma 3's per-head q/k norms and a separate rotary
table (`rope_local_base_freq`, unscaled) for its sliding layers; Gemma 2's final-logit soft
cap. Config, parameter names and shapes are in `jaxllm.models.gemma_family`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.models.base import AttentionFn
from jaxllm.models.layers import (
    Embed,
    apply_rope,
    make_param,
    rms_normalize,
    rope_inverse_frequencies,
    rope_tables,
)
from jaxllm.models.llama import make_linear
from jaxllm.models.params import check_params, logical_axes

SLIDING = "sliding_attention"


class OffsetRMSNorm(nnx.Module):
    """x / rms(x) * (1 + w), all in float32 then cast back (Gemma's norm)."""

    def __init__(self, scale, eps: float, axes: tuple[str, ...], dtype: jnp.dtype) -> None:
        self.scale = make_param(scale, axes, dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = rms_normalize(x, self.eps)
        return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def layer_is_sliding(cfg: ModelConfig, index: int) -> bool:
    """Whether layer `index` attends through the sliding window."""
    if not cfg.layer_types:
        return cfg.sliding_window is not None
    return cfg.layer_types[index] == SLIDING


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


class GemmaDecoderLayer(nnx.Module):
    """Sandwich-normed attention block then sandwich-normed GeGLU MLP, each with a residual."""

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], index: int, dtype) -> None:
        prefix = f"layers.{index}."

        def linear(name: str):
            return make_linear(params, prefix + name, dtype)

        def norm(name: str) -> OffsetRMSNorm:
            return OffsetRMSNorm(params[f"{prefix}{name}.scale"], cfg.rms_norm_eps,
                                 logical_axes(f"{name}.scale", cfg.architecture), dtype)

        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding = layer_is_sliding(cfg, index)
        self.sliding_window = cfg.sliding_window if self.sliding else None
        self.attn_soft_cap = cfg.attn_logit_softcapping
        self.sm_scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.input_norm = norm("input_norm")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            linear("q_proj"), linear("k_proj"), linear("v_proj"), linear("o_proj"))
        self.q_norm = norm("q_norm") if cfg.qk_norm else None
        self.k_norm = norm("k_norm") if cfg.qk_norm else None
        self.post_attention_norm = norm("post_attention_norm")
        self.pre_feedforward_norm = norm("pre_feedforward_norm")
        self.gate_proj, self.up_proj, self.down_proj = (
            linear("gate_proj"), linear("up_proj"), linear("down_proj"))
        self.post_feedforward_norm = norm("post_feedforward_norm")

    def __call__(self, x, rope_cos, rope_sin, layer_cache, metadata, attention_fn: AttentionFn):
        t = x.shape[0]
        h = self.input_norm(x)
        q = self.q_proj(h).reshape(t, self.num_heads, self.head_dim)
        k = self.k_proj(h).reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        attn, layer_cache = attention_fn(
            q, k, v, layer_cache, metadata, sm_scale=self.sm_scale,
            sliding_window=self.sliding_window, soft_cap=self.attn_soft_cap)
        attn = self.o_proj(attn.reshape(t, self.num_heads * self.head_dim))
        x = x + self.post_attention_norm(attn)
        h = self.pre_feedforward_norm(x)
        mlp = self.down_proj(jax.nn.gelu(self.gate_proj(h), approximate=True) * self.up_proj(h))
        return x + self.post_feedforward_norm(mlp), layer_cache


class GemmaModel(nnx.Module):
    """Scaled embedding, decoder layers (unrolled), final (1 + w) norm, tied LM head."""

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], dtype=jnp.float32,
                 max_positions: int | None = None) -> None:
        check_params(cfg, params, "model parameters")
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Embed(params["embed_tokens.embedding"], self.dtype)
        # HF rounds sqrt(hidden) to the weights' dtype before scaling.
        self.embed_scale = float(jnp.asarray(cfg.hidden_size ** 0.5, self.dtype))
        self.layers = nnx.List([GemmaDecoderLayer(cfg, params, i, self.dtype)
                                for i in range(cfg.num_layers)])
        self.final_norm = OffsetRMSNorm(params["final_norm.scale"], cfg.rms_norm_eps, ("embed",),
                                        self.dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        make_linear(params, "lm_head", self.dtype))
        self.final_soft_cap = cfg.final_logit_softcapping
        length = max(1, max_positions or cfg.max_position_embeddings)
        cos, sin = rope_tables(rope_inverse_frequencies(cfg), length)
        self.rope_cos, self.rope_sin = nnx.Variable(jnp.asarray(cos)), nnx.Variable(jnp.asarray(sin))
        # Gemma 3's sliding layers rotate with their own (unscaled) base frequency.
        self.local_rope = cfg.rope_local_base_freq is not None
        if self.local_rope:
            local = dataclasses.replace(cfg, rope_theta=cfg.rope_local_base_freq,
                                        rope_scaling=RopeScaling())
            cos, sin = rope_tables(rope_inverse_frequencies(local), length)
            self.local_cos = nnx.Variable(jnp.asarray(cos))
            self.local_sin = nnx.Variable(jnp.asarray(sin))

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list | None,
                 metadata: Any, attention_fn: AttentionFn) -> tuple[jax.Array, list]:
        """Hidden states [T, E] after the final norm, and the updated per-layer caches."""
        x = self.embed_tokens(input_ids) * jnp.asarray(self.embed_scale, self.dtype)
        caches = list(kv_caches) if kv_caches is not None else [None] * len(self.layers)

        def rows(table: nnx.Variable) -> jax.Array:
            return jnp.take(table[...], positions, axis=0, mode="clip")

        cos, sin = rows(self.rope_cos), rows(self.rope_sin)
        local = (rows(self.local_cos), rows(self.local_sin)) if self.local_rope else (cos, sin)
        for i, layer in enumerate(self.layers):
            c, s = local if layer.sliding else (cos, sin)
            x, caches[i] = layer(x, c, s, caches[i], metadata, attention_fn)
        return self.final_norm(x), caches

    @property
    def max_positions(self) -> int:
        """Positions 0 .. max_positions - 1 have rotary angles (the cos/sin table's rows)."""
        return self.rope_cos.shape[0]

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [N, V], soft-capped when the config says so (Gemma 2)."""
        logits = (self.embed_tokens.attend(hidden) if self.lm_head is None
                  else self.lm_head.logits(hidden))
        return soft_cap(logits, self.final_soft_cap)
