"""Linear and embedding layers whose weights stay in GGUF quantization blocks.

Built from `jaxllm.kernels.quantized_weights.PackedWeight` (the GGUF loader keeps Q4_0, Q4_1
and Q8_0 tensors that way when asked). Each weight the layer rebuilds is bit-identical to the
dequantized float32 one, so at float32 precision the model computes the same function as with
dense weights; the matmul reads 0.6-1.1 bytes per weight instead of 4
(kernels/quantized_matmul.py). At bfloat16 precision the activations entering these matmuls
are rounded to bfloat16 (weights exact, sums float32: "W4A16"), twice the arithmetic rate on
CPUs with AVX512-BF16. Outputs are float32 either way. These layers are single-device:
tensor-parallel sharding rules know dense kernels only, and the engine dequantizes when it
shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.kernels.quantized_matmul import (
    IMPLEMENTATIONS,
    PRECISIONS,
    default_impl,
    quantized_matmul,
)
from jaxllm.kernels.quantized_weights import PackedWeight, fuse_columns, gather_columns


@dataclass(frozen=True)
class QuantizedMatmulOptions:
    """How layers with weights in blocks multiply: `impl` None picks by backend
    (kernels.quantized_matmul.default_impl); `precision` of the activations, one of PRECISIONS."""

    impl: str | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.impl is not None and self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"quantized matmul impl must be one of {IMPLEMENTATIONS}, "
                             f"got {self.impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"quantized matmul precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")

    def resolved(self) -> QuantizedMatmulOptions:
        return QuantizedMatmulOptions(self.impl or default_impl(), self.precision)


class _Packed(nnx.Module):
    """The packed arrays of one weight, and how to multiply by them."""

    def __init__(self, packed: PackedWeight, options: QuantizedMatmulOptions) -> None:
        options = options.resolved()
        self.kind, self.k, self.n = packed.kind, packed.k, packed.n
        self.impl, self.precision = options.impl, options.precision
        self.codes = nnx.Param(jnp.asarray(packed.codes))
        self.scales = nnx.Param(jnp.asarray(packed.scales))
        self.mins = None if packed.mins is None else nnx.Param(jnp.asarray(packed.mins))

    def _arrays(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        return self.codes[...], self.scales[...], None if self.mins is None else self.mins[...]

    def matmul(self, x: jax.Array) -> jax.Array:
        """float32 x @ W for x [..., k]."""
        lead = x.shape[:-1]
        y = quantized_matmul(x.reshape(-1, self.k), *self._arrays(), kind=self.kind, n=self.n,
                             impl=self.impl, precision=self.precision)
        return y.reshape(*lead, self.n)


class QuantizedLinear(_Packed):
    """y = x @ W (+ bias) with W [in, out] in blocks; float32 in and out."""

    def __init__(self, packed: PackedWeight, bias, options: QuantizedMatmulOptions) -> None:
        if packed.as_table:
            raise ValueError("an embedding table cannot serve as a linear layer's kernel")
        super().__init__(packed, options)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.matmul(x)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def logits(self, x: jax.Array) -> jax.Array:
        return self(x)


def fused_linear(params, prefix: str, names: tuple[str, ...],
                 options: QuantizedMatmulOptions) -> QuantizedLinear | None:
    """One QuantizedLinear for several projections of the same input (q/k/v, gate/up), their
    outputs side by side; None unless all are packed alike. Fewer, larger kernel calls: the
    batch-32 matmul chain measured ~10% faster (benchmarks/RESULTS.md)."""
    kernels = [params[f"{prefix}{name}.kernel"] for name in names]
    if not all(isinstance(k, PackedWeight) for k in kernels):
        return None
    fused = fuse_columns(kernels)
    if fused is None:
        return None
    biases = [params.get(f"{prefix}{name}.bias") for name in names]
    if any(b is not None for b in biases):
        biases = [jnp.zeros(k.n, jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
                  for b, k in zip(biases, kernels, strict=True)]
        bias = jnp.concatenate(biases)
    else:
        bias = None
    return QuantizedLinear(fused, bias, options)


class QuantizedEmbed(_Packed):
    """Token embedding table [vocab, embed] in blocks (rows gathered and rebuilt per token);
    also the LM head when embeddings are tied."""

    def __init__(self, packed: PackedWeight, options: QuantizedMatmulOptions) -> None:
        if not packed.as_table:
            raise ValueError("a quantized embedding needs a table-shaped packed weight")
        super().__init__(packed, options)

    def __call__(self, ids: jax.Array) -> jax.Array:
        flat = ids.reshape(-1)
        rows = gather_columns(self.kind, *self._arrays(), flat)
        return rows.reshape(*ids.shape, self.k)

    def attend(self, x: jax.Array) -> jax.Array:
        """Float32 logits from hidden states: the table is W [embed, vocab] of the matmul."""
        return self.matmul(x)
