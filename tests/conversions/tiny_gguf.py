"""Write tiny llama GGUF files the way llama.cpp's converter does (for loader tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# HF suffix -> GGUF suffix (per layer), written independently of conversions/gguf_loader.py.
_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's halves interleaved into (x0, y0, x1, y1, ...)."""
    rows = w.shape[0]
    head = w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
    return np.ascontiguousarray(np.swapaxes(head, 1, 2).reshape(w.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def write_llama_gguf(
    path: Path,
    hf_config,
    state: dict[str, np.ndarray],
    qtype=None,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """`state`: HF name -> fp32 array. 2-D weights are stored as `qtype` (default F32)."""
    import gguf

    qtype = gguf.GGMLQuantizationType.F32 if qtype is None else qtype
    c = hf_config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_token_list([f"tok{i}" for i in range(c.vocab_size)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tied = c.tie_word_embeddings
    for name, a in state.items():
        if (name == "lm_head.weight" and tied) or gguf_name(name) in drop:
            continue
        a = np.asarray(a, np.float32)
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_key_value_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quant_roundtrip(a: np.ndarray, qtype) -> np.ndarray:
    """What a weight stored as `qtype` dequantizes to."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return a
    return gguf.quants.dequantize(gguf.quants.quantize(np.asarray(a, np.float32), qtype), qtype)
