"""Building blocks of a Llama-family decoder: linear, embedding, RMSNorm, rotary embedding.

Parameters are created from loaded arrays (never randomly initialised here) and carry their
logical axis names as NNX sharding metadata, so the sharding rules can place them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig, RopeScaling


def make_param(value: jax.Array | np.ndarray, axes: tuple[str, ...], dtype: jnp.dtype) -> nnx.Param:
    """A parameter holding `value` cast to `dtype`, annotated with its logical axes."""
    return nnx.Param(jnp.asarray(value, dtype=dtype), out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored [in, out]."""

    def __init__(self, kernel, bias, axes: tuple[str, ...], dtype: jnp.dtype) -> None:
        self.kernel = make_param(kernel, axes, dtype)
        self.bias = make_param(bias, axes[-1:], dtype) if bias is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def logits(self, x: jax.Array) -> jax.Array:
        """Float32 x @ kernel (the untied LM head's use)."""
        return jnp.dot(x, self.kernel[...], preferred_element_type=jnp.float32)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; also the LM head when embeddings are tied."""

    def __init__(self, embedding, dtype: jnp.dtype) -> None:
        self.embedding = make_param(embedding, ("vocab", "embed"), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits in float32 from hidden states, using the table as the output projection."""
        return jnp.dot(x, self.embedding[...].T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 as the reference implementations do."""

    def __init__(self, scale, eps: float, axes: tuple[str, ...], dtype: jnp.dtype) -> None:
        self.scale = make_param(scale, axes, dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, including linear and llama3 scaling (float64 on host)."""
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return _scale_frequencies(inv, cfg.rope_scaling)


def _scale_frequencies(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    if s.kind == "default":
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_len = s.original_max_position_embeddings
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(mid, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate the first 2*len(inv_freq) dims of x [T, H, D] by position (half-split layout)."""
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, rot/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)
