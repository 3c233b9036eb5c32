"""The EAGLE-1 draft head: a small decoder that drafts from the target model's hidden states.

At position p the head takes the next token x_{p+1} and the target's final hidden state f_p
(after its final norm): h = fc(concat(embed(x_{p+1}), f_p)), then its decoder layers (the
Llama family's `DecoderLayer`, layer 0 without its input norm), and its output g_p goes
straight to the target's LM head (no norm in between). The embedding is the head's own when
its checkpoint has one, else the target's; the LM head is always the target's. Both are the
caller's business: this module maps (embeddings, features) to output hidden states.

Checkpoints are Hugging Face directories: config.json (a Llama-style config whose
hidden_size and vocab_size are the target's) and safetensors with `fc.weight` [H, 2H]
(optional `fc.bias`), `layers.{i}.*` in HF Llama naming and optionally
`embed_tokens.weight`. `load_eagle_head` validates them against the target (ValueError)
before reading any weight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.layers import Embed, Linear, rope_inverse_frequencies, rope_tables
from jaxllm.models.llama import DecoderLayer
from jaxllm.models.tensor_names import TensorNameMap

logger = logging.getLogger(__name__)

def _eagle_names() -> TensorNameMap:
    """EAGLE checkpoint names: the head's own top-level tensors and HF Llama layer names under
    "layers." (some exports put everything under "model.", which is stripped first)."""
    from jaxllm.models.llama_family import HF_NAMES

    return TensorNameMap(layer_prefix="layers.", top={
        "fc.weight": ("fc.kernel", True),
        "fc.bias": ("fc.bias", False),
        "embed_tokens.weight": ("embed_tokens.embedding", False),
    }, layer=HF_NAMES.layer)


# Tensors some EAGLE-1 exports carry that the head does not use: the LM head (the target's
# is used), layer 0's input norm (identity in EAGLE-1) and rotary buffers.
_IGNORED = ("lm_head.weight", "layers.0.input_layernorm.weight", "rotary_emb.inv_freq")


class _Identity(nnx.Module):
    """Layer 0's input "norm" in EAGLE-1."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class EagleHead(nnx.Module):
    """fc over [embedding, feature], then decoder layers; returns the layers' output [T, E]."""

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], dtype,
                 max_positions: int) -> None:
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.fc = Linear(params["fc.kernel"], params.get("fc.bias"), (None, "embed"), self.dtype)
        table = params.get("embed_tokens.embedding")
        self.embed_tokens = nnx.data(Embed(table, self.dtype) if table is not None else None)
        self.layers = nnx.List([DecoderLayer(cfg, params, f"layers.{i}.", self.dtype)
                                for i in range(cfg.num_layers)])
        self.layers[0].input_norm = _Identity()
        cos, sin = rope_tables(rope_inverse_frequencies(cfg), max(1, max_positions))
        self.rope_cos, self.rope_sin = nnx.Variable(jnp.asarray(cos)), nnx.Variable(jnp.asarray(sin))

    def __call__(self, embeds: jax.Array, features: jax.Array, positions: jax.Array,
                 kv_caches: list | None, metadata: Any, attention_fn) -> tuple[jax.Array, list]:
        """embeds [T, E] (of x_{p+1}), features [T, E] (f_p) at positions p [T] -> the head's
        output hidden states g [T, E] and its updated per-layer caches."""
        x = self.fc(jnp.concatenate([embeds.astype(self.dtype), features.astype(self.dtype)],
                                    axis=-1))
        caches = list(kv_caches) if kv_caches is not None else [None] * len(self.layers)
        cos = jnp.take(self.rope_cos[...], positions, axis=0, mode="clip")
        sin = jnp.take(self.rope_sin[...], positions, axis=0, mode="clip")
        for i, layer in enumerate(self.layers):
            x, caches[i] = layer(x, cos, sin, caches[i], metadata, attention_fn)
        return x, caches


@dataclass
class EagleCheckpoint:
    config: ModelConfig
    params: dict[str, np.ndarray]
    path: Path


def read_eagle_config(path: str | Path, target: ModelConfig) -> ModelConfig:
    """The head's ModelConfig from `path`/config.json, checked against the target's
    (ValueError: not a directory with config.json, another hidden size or vocabulary)."""
    from jaxllm.models.llama_family import ARCHITECTURES, config_from_hf

    path = Path(path).expanduser()
    name = f"--speculative-model {path}"
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"{name}: an EAGLE head is a directory with config.json and "
                         "safetensors weights")
    try:
        d = json.loads((path / "config.json").read_text())
        archs = [str(a).removeprefix("Eagle") for a in d.get("architectures") or []]
        arch = next((a for a in archs if a in ARCHITECTURES), "LlamaForCausalLM")
        cfg = config_from_hf(d, arch)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: config.json is not a Llama-style EAGLE config ({e!r})") from e
    if cfg.hidden_size != target.hidden_size:
        raise ValueError(f"{name}: the EAGLE head's hidden_size is {cfg.hidden_size}, the "
                         f"target's {target.hidden_size}; the head drafts from the target's "
                         "hidden states, so they must match")
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"{name}: the EAGLE head's vocabulary has {cfg.vocab_size} tokens, "
                         f"the target's {target.vocab_size}; it must share the target's")
    if cfg.num_layers < 1:
        raise ValueError(f"{name}: the EAGLE head has no decoder layer")
    return cfg


def load_eagle_checkpoint(path: str | Path, target: ModelConfig, dtype) -> EagleCheckpoint:
    """Read and validate an EAGLE-1 head (see the module docstring); weights cast to `dtype`."""
    from jaxllm.conversions.hf import close_all, open_files
    from jaxllm.models.llama_family import param_shapes

    path = Path(path).expanduser()
    cfg = read_eagle_config(path, target)
    name = f"--speculative-model {path}"
    names = _eagle_names()
    e = cfg.hidden_size
    expected = {k: v for k, v in param_shapes(cfg).items() if k.startswith("layers.")}
    expected.pop("layers.0.input_norm.scale")
    optional = {"fc.bias": (e,), "embed_tokens.embedding": (cfg.vocab_size, e)}
    expected["fc.kernel"] = (2 * e, e)
    try:
        files = open_files(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{name}: {err}") from err
    params: dict[str, np.ndarray] = {}
    try:
        plan = []
        for source, f in files.items():
            short = source.removeprefix("model.")
            if short.endswith(_IGNORED):
                continue
            mapped = names.to_jaxllm(short)
            if mapped is None or (mapped[0] not in expected and mapped[0] not in optional):
                raise ValueError(f"{name}: unexpected tensor {source} in an EAGLE-1 head")
            ours, transpose = mapped
            shape = expected.get(ours, optional.get(ours))
            want = tuple(shape[::-1] if transpose else shape)
            if f.shape(source) != want:
                raise ValueError(f"{name}: tensor {source} has shape {f.shape(source)}, "
                                 f"expected {want}")
            plan.append((source, ours, transpose, f))
        got = {ours for _, ours, _, _ in plan}
        if "fc.kernel" not in got:
            raise ValueError(f"{name}: no fc.weight: not an EAGLE-1 head")
        missing = sorted(set(expected) - got)
        if missing:
            shown = ", ".join(names.to_source(m) for m in missing[:5])
            raise ValueError(f"{name}: missing tensor(s) {shown}")
        for source, ours, transpose, f in plan:
            a = f.get(source)
            params[ours] = np.ascontiguousarray(a.T if transpose else a,
                                                dtype=np.dtype(jnp.dtype(dtype)))
    finally:
        close_all(files.values())
    params["layers.0.input_norm.scale"] = np.ones(e, np.dtype(jnp.dtype(dtype)))  # unused
    return EagleCheckpoint(cfg, params, path)
