"""The contracts between model families and the rest of jaxllm.

`CausalLM` is what the runner (and the test oracles) call: any registered architecture's
model satisfies it. `ModelFamily` is what one architecture module hands the registry
(`jaxllm.models.registry`): config parsing both ways, parameter shapes and logical axes, the
HF and GGUF tensor-name maps, and the model builder. The loaders and the builder see a family
only through these, so adding an architecture touches its own module and one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax

if TYPE_CHECKING:
    from jaxllm.config import ModelConfig
    from jaxllm.models.quantized_layers import QuantizedMatmulOptions
    from jaxllm.models.tensor_names import TensorNameMap

# attention_fn(q, k, v, layer_cache, metadata, *, sm_scale, sliding_window, soft_cap)
#   -> (out, layer_cache): dense causal attention on the plain path, ragged paged attention
#   (jaxllm.kernels) in the engine.
AttentionFn = Callable[..., tuple[jax.Array, Any]]


@runtime_checkable
class CausalLM(Protocol):
    """A causal LM the runner can run: one unified ragged step, then logits for chosen rows."""

    config: ModelConfig

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list | None,
                 metadata: Any, attention_fn: AttentionFn) -> tuple[jax.Array, list]:
        """Hidden states [T, E] for the flat token axis, and the updated per-layer caches."""
        ...

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [N, V] for the hidden rows given."""
        ...

    @property
    def max_positions(self) -> int:
        """Positions 0 .. max_positions - 1 can be embedded (e.g. the rotary table's rows)."""
        ...


class GGUFMetadata(Protocol):
    """What a family reads from a GGUF file to build its HF-style config dict."""

    path: Path
    tensor_shapes: Mapping[str, tuple[int, ...]]  # every tensor, ggml order (fastest axis first)

    def get(self, key: str, default: Any = ...) -> Any:
        """The metadata value at `key`; without a default, a ValueError naming the file."""
        ...


@runtime_checkable
class ModelFamily(Protocol):
    """One architecture family: everything jaxllm knows about it, in one module."""

    name: str
    # HF `architectures` names served, and config.json `model_type` -> that name (used when
    # a config has no `architectures` list).
    architectures: tuple[str, ...]
    model_types: Mapping[str, str]
    # GGUF `general.architecture` -> the HF architectures name it loads as.
    gguf_architectures: Mapping[str, str]
    # Source tensor name <-> flat jaxllm parameter name (see jaxllm.models.params).
    hf_names: TensorNameMap
    gguf_names: TensorNameMap

    def config_from_hf(self, d: Mapping[str, Any], architecture: str) -> ModelConfig:
        """The ModelConfig of an HF config.json dict whose architecture is `architecture`."""
        ...

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """An HF-style config.json dict that `config_from_hf` reads back to `cfg`."""
        ...

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        """An HF-style config.json dict built from a GGUF file's metadata."""
        ...

    def gguf_permuted_heads(self, cfg: ModelConfig, gguf_architecture: str,
                            name: str) -> int | None:
        """Heads whose rows llama.cpp's converter interleaved in parameter `name` (to undo),
        or None when the tensor is stored in HF order."""
        ...

    def param_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every parameter the model needs, with its shape."""
        ...

    def logical_axes(self, name: str) -> tuple[str, ...] | None:
        """Logical axis names of parameter `name`, or None if the family has no such kind."""
        ...

    def build(self, cfg: ModelConfig, params: Mapping[str, Any], dtype: Any,
              quantized: QuantizedMatmulOptions | None,
              max_positions: int | None) -> CausalLM:
        """The model holding `params` computing in `dtype` (a resolved jnp dtype)."""
        ...
