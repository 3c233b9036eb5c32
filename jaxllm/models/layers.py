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
        return self.scale[...] * rms_normalize(x, self.eps).astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32 (the norms apply their scale after)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


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


def rope_tables(inv_freq: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [length, rot/2] of position x frequency, looked up by every layer's rotation.

    A table read per step instead of sin/cos evaluated per step: XLA fused the evaluation into
    each of the 2 x num_layers rotations (2-3 ms of a 45 ms batch-32 step on CPU), and tracing
    it per layer was a third of a step's trace time. The angle is the float32 product the
    reference (HF) forms; its cos/sin are taken in float64 and rounded once.
    """
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    angles = angles.astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first 2*cos.shape[-1] dims of x [T, H, D] (half-split layout) by the angles
    whose cos/sin [T, rot/2] are given (rows of `rope_tables` at each token's position)."""
    rot = 2 * cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)
