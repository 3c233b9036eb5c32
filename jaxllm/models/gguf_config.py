"""GGUF metadata keys llama.cpp writes the same way for every decoder architecture.

llama.cpp stores a model's shape as `{arch}.embedding_length`, `{arch}.block_count`, ... with
`{arch}` its own architecture name. `llama_cpp_hf_config` turns those into the HF-style
config.json dict that the families' `config_from_hf` reads; a family adds what only it has.
"""

from __future__ import annotations

from typing import Any

from jaxllm.models.base import GGUFMetadata

# general.file_type -> the dtype the weights were stored in (quantized types dequantize to f32).
FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def llama_cpp_hf_config(meta: GGUFMetadata, gguf_arch: str, hf_arch: str) -> dict[str, Any]:
    """The HF-style config dict of a llama.cpp decoder whose metadata prefix is `gguf_arch`."""
    path, arch = meta.path, gguf_arch
    if "rope_freqs.weight" in meta.tensor_shapes:
        raise ValueError(f"{path}: GGUF rope_freqs (llama3-style rope scaling) is not supported; "
                         f"convert from the HF checkpoint instead")
    heads = int(meta.get(f"{arch}.attention.head_count"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ValueError(f"{path}: per-layer KV head counts are not supported")
    hidden = int(meta.get(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens", None)
    vocab = meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = int(meta.tensor_shapes["token_embd.weight"][1])
    hf: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta.get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in meta.tensor_shapes,
        "torch_dtype": FILE_TYPE_DTYPES.get(int(meta.get("general.file_type", 0)), "float32"),
    }
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        hf["partial_rotary_factor"] = rope_dims / head_dim
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        hf["rope_scaling"] = {"type": scaling,
                              "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}", None)
        if value is not None:
            hf[key] = int(value)
    return hf
