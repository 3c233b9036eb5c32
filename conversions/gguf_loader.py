"""GGUF files (llama.cpp) -> ModelConfig + flat jaxllm params.

The config comes from the `{arch}.*` metadata keys. Weights are dequantized one tensor at a
time with `gguf.quants.dequantize` (float32), so peak memory is the converted model plus one
tensor. llama.cpp's converter reorders the rows of each Llama q/k head from HF's
"rotate half" layout to interleaved pairs (its rope kernel rotates adjacent elements); we
undo that so the weights match the HF layout the model implements.

With `keep_blocks=True`, Q4_0 / Q4_1 / Q8_0 matrices are not dequantized but repacked
(`jaxllm.kernels.quantized_weights.PackedWeight`; the q/k row order is undone on the blocks'
rows), for the quantized matmul: the weights they stand for are bit-identical.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import ModelConfig
from jaxllm.conversions.common import LoadedCheckpoint, resolve_dtype
from jaxllm.kernels.quantized_weights import PACKABLE_GGUF_TYPES, PackedWeight, pack_gguf_rows
from jaxllm.models.params import check_params, expected_param_shapes

logger = logging.getLogger(__name__)

GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_LAYER_NAMES: dict[str, tuple[str, bool]] = {
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
}
_TOP_NAMES: dict[str, tuple[str, bool]] = {
    "token_embd.weight": ("embed_tokens.embedding", False),
    "output_norm.weight": ("final_norm.scale", False),
    "output.weight": ("lm_head.kernel", True),
}
# general.file_type -> the dtype the weights were stored in (quantized types dequantize to f32).
_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
_MISSING = object()


def is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def gguf_to_jaxllm_name(gguf_name: str) -> tuple[str, bool] | None:
    """(jaxllm name, transpose?) for a GGUF tensor name, or None if it is not a model weight."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        mapped = _LAYER_NAMES.get(parts[2])
        if mapped is not None:
            return f"layers.{parts[1]}.{mapped[0]}", mapped[1]
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs -> first half | second half.

    Rows of head h are stored as (x0, y0, x1, y1, ...); HF expects (x0, x1, ..., y0, y1, ...).
    Works on a [rows, in] weight or a [rows] bias.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/foreign files
        raise ValueError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from e


def _meta(reader: Any, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{reader.data.filename}: GGUF metadata key {key} is missing")
        return default
    return field.contents()


def gguf_hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """An HF-style config.json dict built from the GGUF metadata (what ModelConfig reads)."""
    arch = _meta(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path}: GGUF rope_freqs (llama3-style rope scaling) is not supported; "
                         f"convert from the HF checkpoint instead")
    heads = int(_meta(reader, f"{arch}.attention.head_count"))
    kv_heads = _meta(reader, f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ValueError(f"{path}: per-layer KV head counts are not supported")
    hidden = int(_meta(reader, f"{arch}.embedding_length"))
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", hidden // heads))
    tokens = _meta(reader, "tokenizer.ggml.tokens", None)
    vocab = _meta(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    hf: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_meta(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": _FILE_TYPE_DTYPES.get(int(_meta(reader, "general.file_type", 0)), "float32"),
    }
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    rope_dims = int(_meta(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        hf["partial_rotary_factor"] = rope_dims / head_dim
    scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        hf["rope_scaling"] = {"type": scaling,
                              "factor": float(_meta(reader, f"{arch}.rope.scaling.factor", 1.0))}
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _meta(reader, f"tokenizer.ggml.{key}", None)
        if value is not None:
            hf[hf_key] = int(value)
    return hf


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {tensor.name} has unsupported GGUF type "
                         f"{tensor.tensor_type.name}") from e


def _packed(tensor: Any, name: str, transpose: bool, cfg: ModelConfig, permute_qk: bool,
            ) -> PackedWeight:
    """A quantized GGUF matrix kept in blocks. Its raw rows are output rows (ggml's second
    axis): a linear kernel's output features (stored transposed) or an embedding's tokens."""
    rows = np.asarray(tensor.data, dtype=np.uint8).reshape(int(tensor.shape[1]), -1)
    if permute_qk and name.endswith("q_proj.kernel"):
        rows = unpermute_rope_rows(rows, cfg.num_heads)
    elif permute_qk and name.endswith("k_proj.kernel"):
        rows = unpermute_rope_rows(rows, cfg.num_kv_heads)
    return pack_gguf_rows(tensor.tensor_type.name, rows, int(tensor.shape[0]), as_table=not transpose)


def load_gguf(path: str | Path, dtype: str = "auto", progress: bool = False, *,
              keep_blocks: bool = False) -> LoadedCheckpoint:
    """Load a .gguf file. See `jaxllm.conversions.load_checkpoint`.

    keep_blocks: matrices stored as Q4_0/Q4_1/Q8_0 become `PackedWeight`s (float32 dtype only);
    other tensors load as usual.
    """
    path = Path(path)
    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader, path)
    cfg = ModelConfig.from_hf_dict(hf_config)
    expected = expected_param_shapes(cfg)
    permute_qk = hf_config["model_type"] == "llama"

    plan: list[tuple[Any, str, bool]] = []
    for t in reader.tensors:
        mapped = gguf_to_jaxllm_name(t.name)
        if mapped is None:
            raise ValueError(f"{path}: unrecognized tensor {t.name} for {cfg.architecture}")
        name, transpose = mapped
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {t.name} for {cfg.architecture}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest axis first
        want = expected[name][::-1] if transpose else expected[name]
        if shape != want:
            raise ValueError(f"{path}: tensor {t.name} has shape {shape}, expected {want}")
        plan.append((t, name, transpose))
    missing = sorted(set(expected) - {name for _, name, _ in plan})
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    out_dtype = resolve_dtype(dtype, cfg.torch_dtype)
    if keep_blocks and out_dtype != np.float32:
        raise ValueError(f"weights kept in quantization blocks compute in float32, not {out_dtype}")
    params: dict[str, Any] = {}
    for t, name, transpose in tqdm(plan, desc="dequantizing", unit="tensor", disable=not progress):
        if keep_blocks and t.tensor_type.name in PACKABLE_GGUF_TYPES and len(t.shape) == 2:
            params[name] = _packed(t, name, transpose, cfg, permute_qk)
            continue
        w = _dequantize(t, path).reshape(tuple(int(d) for d in reversed(t.shape)))
        if permute_qk and name.endswith(("q_proj.kernel", "q_proj.bias")):
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif permute_qk and name.endswith(("k_proj.kernel", "k_proj.bias")):
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        params[name] = np.array(w.T if transpose else w, dtype=out_dtype, order="C")
    check_params(cfg, params, str(path))

    generation_config = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if k in hf_config}
    return LoadedCheckpoint(config=cfg, params=params, generation_config=generation_config,
                            tokenizer_path=path, source_format="gguf", hf_config=hf_config)
