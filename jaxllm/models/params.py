"""The flat parameter naming shared by the model and every loader.

Loaders (HF safetensors, GGUF, orbax) produce `{name: array}` in this naming and layout;
`jaxllm.models.llama.LlamaModel` consumes it. Linear kernels are stored `[in, out]`
(the transpose of PyTorch's `[out, in]`). Each name also carries logical axis names, which
the sharding rules map onto a device mesh.
"""

from __future__ import annotations

from jaxllm.config import ModelConfig

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


def logical_axes(name: str) -> tuple[str, ...]:
    """Logical axis names of the parameter called `name` (e.g. "layers.3.q_proj.kernel")."""
    key = ".".join(name.split(".")[-2:])
    if key not in LOGICAL_AXES:
        raise KeyError(f"no logical axes known for parameter {name!r}")
    return LOGICAL_AXES[key]


def expected_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the model needs, with its shape. Loaders check against this."""
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


def check_params(cfg: ModelConfig, params: dict, source: str) -> None:
    """Raise a ValueError naming the first missing, unexpected or misshapen tensor."""
    expected = expected_param_shapes(cfg)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        got = tuple(params[name].shape)
        if got != shape:
            raise ValueError(f"{source}: tensor {name} has shape {got}, expected {shape}")
