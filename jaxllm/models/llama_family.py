"""The Llama family: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 and SmolLM2 (a Llama).

Everything jaxllm knows about these architectures besides the network itself
(`jaxllm.models.llama.LlamaModel`): which HF / GGUF architecture names they are, how their
config.json reads into `ModelConfig` (and back), the parameters the network needs with their
shapes and logical axes, and the HF and GGUF tensor names of each parameter. One network
serves the family; the members differ by switches (`ARCHITECTURES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models.base import CausalLM, GGUFMetadata
from jaxllm.models.gguf_config import llama_cpp_hf_config
from jaxllm.models.hf_config import common_to_hf, read_common
from jaxllm.models.llama import LlamaModel
from jaxllm.models.tensor_names import TensorNameMap

# HF architectures entry -> the family switches it turns on.
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}

# Logical axes of each parameter kind, keyed by the name's last two components.
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens.embedding": ("vocab", "embed"),
    "q_proj.kernel": ("embed", "q_heads"),
    "q_proj.bias": ("q_heads",),
    "k_proj.kernel": ("embed", "kv_heads"),
    "k_proj.bias": ("kv_heads",),
    "v_proj.kernel": ("embed", "kv_heads"),
    "v_proj.bias": ("kv_heads",),
    "o_proj.kernel": ("q_heads", "embed"),
    "o_proj.bias": ("embed",),
    "q_norm.scale": ("head_dim",),
    "k_norm.scale": ("head_dim",),
    "gate_proj.kernel": ("embed", "mlp"),
    "gate_proj.bias": ("mlp",),
    "up_proj.kernel": ("embed", "mlp"),
    "up_proj.bias": ("mlp",),
    "down_proj.kernel": ("mlp", "embed"),
    "down_proj.bias": ("embed",),
    "input_norm.scale": ("embed",),
    "post_attention_norm.scale": ("embed",),
    "final_norm.scale": ("embed",),
    "lm_head.kernel": ("embed", "vocab"),
}

HF_NAMES = TensorNameMap(
    layer_prefix="model.layers.",
    top={
        "model.embed_tokens.weight": ("embed_tokens.embedding", False),
        "model.norm.weight": ("final_norm.scale", False),
        "lm_head.weight": ("lm_head.kernel", True),
    },
    layer={
        **{f"self_attn.{p}_proj.weight": (f"{p}_proj.kernel", True) for p in "qkvo"},
        **{f"self_attn.{p}_proj.bias": (f"{p}_proj.bias", False) for p in "qkvo"},
        "self_attn.q_norm.weight": ("q_norm.scale", False),
        "self_attn.k_norm.weight": ("k_norm.scale", False),
        **{f"mlp.{p}_proj.weight": (f"{p}_proj.kernel", True) for p in ("gate", "up", "down")},
        **{f"mlp.{p}_proj.bias": (f"{p}_proj.bias", False) for p in ("gate", "up", "down")},
        "input_layernorm.weight": ("input_norm.scale", False),
        "post_attention_layernorm.weight": ("post_attention_norm.scale", False),
    },
)

GGUF_NAMES = TensorNameMap(
    layer_prefix="blk.",
    top={
        "token_embd.weight": ("embed_tokens.embedding", False),
        "output_norm.weight": ("final_norm.scale", False),
        "output.weight": ("lm_head.kernel", True),
    },
    layer={
        "attn_norm.weight": ("input_norm.scale", False),
        "ffn_norm.weight": ("post_attention_norm.scale", False),
        "attn_q.weight": ("q_proj.kernel", True),
        "attn_k.weight": ("k_proj.kernel", True),
        "attn_v.weight": ("v_proj.kernel", True),
        "attn_output.weight": ("o_proj.kernel", True),
        "attn_q.bias": ("q_proj.bias", False),
        "attn_k.bias": ("k_proj.bias", False),
        "attn_v.bias": ("v_proj.bias", False),
        "attn_output.bias": ("o_proj.bias", False),
        "attn_q_norm.weight": ("q_norm.scale", False),
        "attn_k_norm.weight": ("k_norm.scale", False),
        "ffn_gate.weight": ("gate_proj.kernel", True),
        "ffn_up.weight": ("up_proj.kernel", True),
        "ffn_down.weight": ("down_proj.kernel", True),
    },
)


def logical_axes(name: str) -> tuple[str, ...] | None:
    """Logical axis names of parameter `name` (e.g. "layers.3.q_proj.kernel"), or None."""
    return LOGICAL_AXES.get(".".join(name.split(".")[-2:]))


def config_from_hf(d: Mapping[str, Any], architecture: str) -> ModelConfig:
    """The ModelConfig of a Llama-family config.json dict."""
    switches = ARCHITECTURES[architecture]
    qwen = architecture.startswith("Qwen")
    attention_bias = bool(d.get("attention_bias", False))
    sliding = d.get("sliding_window")
    if qwen and not d.get("use_sliding_window", False):
        sliding = None
    if qwen:  # Qwen2 always has q/k/v biases and never an output-projection bias
        qkv_bias, o_bias = switches.get("qkv_bias", attention_bias), False
    else:
        qkv_bias, o_bias = attention_bias, attention_bias
    return ModelConfig(
        architecture=architecture,
        **read_common(d, rms_norm_eps=1e-6 if qwen else 1e-5, max_position_embeddings=2048,
                      tie_word_embeddings=False),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=bool(switches.get("qk_norm", False)),
        sliding_window=int(sliding) if sliding else None,
        hidden_act=str(d.get("hidden_act", "silu")),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """An HF-style config.json dict that `config_from_hf` reads back to `cfg`."""
    return {
        **common_to_hf(cfg),
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        "sliding_window": cfg.sliding_window,
        "use_sliding_window": cfg.sliding_window is not None,
        "hidden_act": cfg.hidden_act,
    }


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the network needs, with its shape (kernels stored [in, out])."""
    e, d = cfg.hidden_size, cfg.head_dim
    q, kv, m = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.embedding": (cfg.vocab_size, e)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "q_proj.kernel"] = (e, q)
        shapes[p + "k_proj.kernel"] = (e, kv)
        shapes[p + "v_proj.kernel"] = (e, kv)
        shapes[p + "o_proj.kernel"] = (q, e)
        if cfg.qkv_bias:
            shapes[p + "q_proj.bias"] = (q,)
            shapes[p + "k_proj.bias"] = (kv,)
            shapes[p + "v_proj.bias"] = (kv,)
        if cfg.o_bias:
            shapes[p + "o_proj.bias"] = (e,)
        if cfg.qk_norm:
            shapes[p + "q_norm.scale"] = (d,)
            shapes[p + "k_norm.scale"] = (d,)
        shapes[p + "gate_proj.kernel"] = (e, m)
        shapes[p + "up_proj.kernel"] = (e, m)
        shapes[p + "down_proj.kernel"] = (m, e)
        if cfg.mlp_bias:
            shapes[p + "gate_proj.bias"] = (m,)
            shapes[p + "up_proj.bias"] = (m,)
            shapes[p + "down_proj.bias"] = (e,)
        shapes[p + "input_norm.scale"] = (e,)
        shapes[p + "post_attention_norm.scale"] = (e,)
    shapes["final_norm.scale"] = (e,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.kernel"] = (e, cfg.vocab_size)
    return shapes


class LlamaFamily:
    """The Llama family as the registry sees it (implements jaxllm.models.base.ModelFamily)."""

    name = "llama"
    architectures = tuple(ARCHITECTURES)
    model_types = MODEL_TYPES
    gguf_architectures = GGUF_ARCHITECTURES
    hf_names = HF_NAMES
    gguf_names = GGUF_NAMES
    # The module's functions (implementing ModelFamily's methods of those names).
    config_from_hf = staticmethod(config_from_hf)
    config_to_hf = staticmethod(config_to_hf)
    param_shapes = staticmethod(param_shapes)
    logical_axes = staticmethod(logical_axes)

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        gguf_arch = meta.get("general.architecture")
        hf = llama_cpp_hf_config(meta, gguf_arch, GGUF_ARCHITECTURES[gguf_arch])
        if gguf_arch == "llama":
            hf["attention_bias"] = "blk.0.attn_q.bias" in meta.tensor_shapes
        return hf

    def gguf_permuted_heads(self, cfg: ModelConfig, gguf_architecture: str,
                            name: str) -> int | None:
        # llama.cpp interleaves q/k rows for its "llama" rope (adjacent pairs); Qwen's
        # NeoX-style rope keeps HF's order.
        if gguf_architecture != "llama":
            return None
        if name.endswith(("q_proj.kernel", "q_proj.bias")):
            return cfg.num_heads
        if name.endswith(("k_proj.kernel", "k_proj.bias")):
            return cfg.num_kv_heads
        return None

    def build(self, cfg: ModelConfig, params: Mapping[str, Any], dtype: Any,
              quantized: Any, max_positions: int | None) -> CausalLM:
        return LlamaModel(cfg, params, dtype, quantized, max_positions)


FAMILY = LlamaFamily()
