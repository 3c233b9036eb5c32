"""Configuration dataclasses: the model's shape (from config.json) and the engine's settings.

`ModelConfig` is read from a Hugging Face `config.json` by the family module of its
architecture (`jaxllm.models.registry`). `EngineConfig` holds every engine/server flag; the
server's CLI and `LLM(**kwargs)` both build one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling. kind: "default", "linear" or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of a decoder; `architecture` names the family that reads it."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    sliding_window: int | None = None  # tokens a query may look back, including itself
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in
    # Mixture of experts (jaxllm.models.moe): 0 experts means a dense MLP in every layer.
    num_experts: int = 0  # routed experts per layer
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 0  # hidden width of one routed expert
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum 1
    shared_expert_intermediate_size: int = 0  # always-on gated expert (Qwen2-MoE); 0: none
    # Gemma 2/3 (jaxllm.models.gemma): per-layer "sliding_attention" / "full_attention" (empty:
    # every layer uses `sliding_window`), sm_scale = query_pre_attn_scalar ** -0.5 when set,
    # tanh soft caps of attention and final logits, rope theta of sliding layers (Gemma 3).
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Parsed by the family of d's architecture; ValueError if no family serves it."""
        from jaxllm.models.registry import config_from_hf_dict

        return config_from_hf_dict(d)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)


QUANTIZATION_MODES = ("auto", "gguf", "none")
# Activations entering matmuls with weights kept in GGUF blocks: float32 (exact products),
# rounded to bfloat16 (weights exact, float32 sums; ~1.5x the CPU kernel's rate with AVX512-BF16)
# or quantized to int8 per block of 32 as llama.cpp does (integer dot products with AVX512-VNNI).
QUANTIZED_ACTIVATIONS = ("float32", "bfloat16", "int8")
# The paged KV cache's element type: "auto" is the model's dtype; "bfloat16" under a float32
# model halves the bytes decode attention reads (K/V rounded when written; math stays float32).
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class EngineConfig:
    """Every engine and server setting. Field names are the CLI flags with underscores."""

    model: str | None = None  # HF dir, orbax dir, .gguf file; None = embedded default
    served_model_name: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16
    # GGUF weights: "auto" keeps Q4_0/Q4_1/Q8_0 blocks where the native CPU kernel serves
    # (one device, float32), "gguf" always keeps them, "none" dequantizes to dense.
    quantization: str = "auto"
    quantized_activations: str = "float32"  # one of QUANTIZED_ACTIVATIONS
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: min(model's max positions, 4096)
    # None fields below take their platform's value (jaxllm.platform_defaults, printed at
    # start-up): the engine resolves them, after which they are never None.
    max_num_batched_tokens: int | None = None  # None: 512 on CPU, 4096 on accelerators
    prefill_chunk_size: int | None = None  # None: max_num_batched_tokens
    page_size: int | None = None  # None: 16 on CPU, 64 on accelerators
    num_pages: int | None = None  # None: from memory_fraction
    # of free device memory (CPU: of kv_cache_memory_bytes); None: 0.5 CPU, 0.8 accelerators
    memory_fraction: float | None = None
    kv_cache_memory_bytes: int = 1 << 30  # CPU budget that memory_fraction applies to
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_prefix_caching: bool = True
    # Dispatch step N+1 before completing step N, so the device never waits for the host
    # (jaxllm/engine.py); False runs the serial loop (debugging, equality tests).
    overlap_scheduling: bool = True
    # Speculative decoding (jaxllm/spec/): proposals verified in the ragged step.
    speculative_mode: str = "disable"  # disable | ngram | draft | eagle
    num_speculative_tokens: int = 7  # CPU: a 1 + 7 token verification fills the 8-token bucket
    speculative_model: str | None = None  # draft model or EAGLE head (HF dir, same vocabulary)
    ngram_prompt_lookup_min: int = 2
    ngram_prompt_lookup_max: int = 4
    # No sequence speculates in a step with more running sequences than this: past a few
    # sequences a step is no longer bound by reading the weights (benchmarks/spec_bench.py).
    speculative_disable_by_batch_size: int | None = 4
    compilation_cache_dir: str | None = None
    compile_threads: int | None = None  # warm-up's parallel compiles; None: 2 CPU, <= 16 else
    seed: int = 0
    attention_impl: str | None = None  # None: by backend; one of jaxllm.kernels.IMPLEMENTATIONS
    # server
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    uds: str | None = None
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    root_path: str = ""
    allowed_origins: list[str] = field(default_factory=list)
    disable_fastapi_docs: bool = False
    max_waiting_requests: int = 1024
    max_request_body_bytes: int = 8 << 20
    log_level: str = "info"
    # multi-host
    distributed_coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                             f"got {self.quantization!r}")
        if self.quantized_activations not in QUANTIZED_ACTIVATIONS:
            raise ValueError(f"quantized_activations must be one of "
                             f"{', '.join(QUANTIZED_ACTIVATIONS)}, got {self.quantized_activations!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
                     "data_parallel_size", "max_waiting_requests", "compile_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.page_size is not None and self.page_size < 2:
            raise ValueError(f"page_size must be >= 2 (page size 1 ruins performance), got {self.page_size}")
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        spec = self.speculative_config()  # validates the speculative settings
        if spec.mode in ("draft", "eagle"):
            from jaxllm.spec.config import check_speculative_model_path

            check_speculative_model_path(spec.model, spec.mode)
        if spec.enabled and self.num_processes > 1:
            raise ValueError("speculative decoding is not supported across several processes")

    def speculative_config(self):
        """The speculative-decoding settings as a `jaxllm.spec.SpeculativeConfig`."""
        from jaxllm.spec import SpeculativeConfig

        return SpeculativeConfig(mode=self.speculative_mode,
                                 num_speculative_tokens=self.num_speculative_tokens,
                                 model=self.speculative_model,
                                 ngram_min=self.ngram_prompt_lookup_min,
                                 ngram_max=self.ngram_prompt_lookup_max,
                                 disable_above_batch=self.speculative_disable_by_batch_size)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def redacted(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d.get("api_key"):
            d["api_key"] = "***"
        return d
