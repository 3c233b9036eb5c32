"""Command-line flags of `python -m jaxllm.server` -> (EngineConfig, ServerConfig)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from jaxllm.config import KV_CACHE_DTYPES, QUANTIZATION_MODES, QUANTIZED_ACTIVATIONS, EngineConfig
from jaxllm.kernels import IMPLEMENTATIONS

from .server_config import ServerConfig


def _origins(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise argparse.ArgumentTypeError("--allowed-origins takes a JSON list of strings")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxllm.server",
                                description="OpenAI-compatible and native HTTP server for jaxllm")
    d = EngineConfig()
    s = ServerConfig()
    a = p.add_argument
    a("--model", default=None, help="HF dir, jaxllm checkpoint dir or .gguf; default: embedded")
    a("--served-model-name", default=None)
    a("--host", default=d.host)
    a("--port", type=int, default=d.port)
    a("--uds", default=None, help="serve on this Unix domain socket instead of host:port")
    a("--ssl-keyfile", default=None)
    a("--ssl-certfile", default=None)
    a("--root-path", default=d.root_path)
    a("--api-key", default=None)
    a("--allowed-origins", type=_origins, default=[], help='JSON list, e.g. ["*"]')
    a("--disable-fastapi-docs", action="store_true")
    a("--max-waiting-requests", type=int, default=d.max_waiting_requests)
    a("--max-request-body-bytes", type=int, default=d.max_request_body_bytes)
    a("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"])
    a("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    a("--quantization", default=d.quantization, choices=list(QUANTIZATION_MODES),
      help="GGUF weights: auto keeps Q4_0/Q4_1/Q8_0 blocks on CPU, gguf always, none dequantizes")
    a("--quantized-activations", default=d.quantized_activations,
      choices=list(QUANTIZED_ACTIVATIONS),
      help="activations entering matmuls with weights kept in blocks: float32 (exact), "
           "bfloat16 (faster, rounded) or int8 (fastest, quantized per block of 32 as llama.cpp)")
    a("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
      help="KV cache element type: auto (the model's dtype) or float32 / bfloat16 "
           "(bfloat16 halves what decode attention reads)")
    a("--max-num-seqs", type=int, default=d.max_num_seqs)
    a("--max-model-len", type=int, default=None)
    a("--max-num-batched-tokens", type=int, default=None,
      help="tokens per step; default by platform: 512 CPU, 4096 GPU/TPU")
    a("--prefill-chunk-size", type=int, default=None)
    a("--page-size", type=int, default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-pages", type=int, default=None)
    g.add_argument("--memory-fraction", type=float, default=None,
                   help="of free device memory (CPU: of --kv-cache-memory-bytes) for the KV "
                        "cache; default by platform: 0.5 CPU, 0.8 GPU/TPU")
    a("--kv-cache-memory-bytes", type=int, default=d.kv_cache_memory_bytes)
    a("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    a("--data-parallel-size", type=int, default=d.data_parallel_size)
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
      default=d.enable_prefix_caching)
    a("--overlap-scheduling", action=argparse.BooleanOptionalAction,
      default=d.overlap_scheduling,
      help="schedule step N+1 while step N runs (--no-overlap-scheduling: the serial loop)")
    a("--freeze-gc", action=argparse.BooleanOptionalAction, default=s.freeze_gc,
      help="after warm-up, exempt every object alive then from garbage collection (a full "
           "collection otherwise stalls a step for ~0.3 s)")
    a("--speculative-mode", default=d.speculative_mode,
      choices=["disable", "ngram", "draft", "eagle"],
      help="propose tokens and verify them in one step (ngram: prompt lookup; draft: a "
           "smaller model; eagle: an EAGLE-1 head on the target's hidden states; both "
           "--speculative-model)")
    a("--num-speculative-tokens", type=int, default=d.num_speculative_tokens)
    a("--speculative-model", default=None,
      help="draft model (HF dir, the target's vocabulary) for --speculative-mode draft; "
           "EAGLE-1 head directory for --speculative-mode eagle")
    a("--ngram-prompt-lookup-min", type=int, default=d.ngram_prompt_lookup_min)
    a("--ngram-prompt-lookup-max", type=int, default=d.ngram_prompt_lookup_max)
    a("--speculative-disable-by-batch-size", type=int,
      default=d.speculative_disable_by_batch_size,
      help="no speculation in steps with more running sequences than this")
    a("--compilation-cache-dir", default=None)
    a("--compile-threads", type=int, default=None,
      help="programs warm-up compiles at once; default by platform: 2 CPU, min(cores, 16) else")
    a("--seed", type=int, default=d.seed)
    a("--attention-impl", default=None, choices=list(IMPLEMENTATIONS))
    a("--distributed-coordinator", default=None)
    a("--num-processes", type=int, default=d.num_processes)
    a("--process-id", type=int, default=d.process_id)
    # server-only
    a("--max-n", type=int, default=s.max_n)
    a("--max-logprobs", type=int, default=s.max_logprobs)
    a("--tool-call-parser", default=s.tool_call_parser, choices=["hermes", "none"])
    a("--reasoning-parser", default=None, choices=["think"],
      help="split <think>...</think> into reasoning_content")
    a("--drain-timeout", type=float, default=s.drain_timeout_s,
      help="seconds to wait for in-flight requests on shutdown")
    a("--disable-metrics", action="store_true")
    return p


_SERVER_ONLY = {"max_n", "max_logprobs", "tool_call_parser", "reasoning_parser",
                "drain_timeout", "disable_metrics", "freeze_gc"}


def parse_args(argv: Sequence[str] | None = None) -> tuple[EngineConfig, ServerConfig]:
    """Parse flags; invalid values exit with a usage error naming the flag."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    engine_kwargs = {k: v for k, v in ns.items() if k not in _SERVER_ONLY}
    try:
        engine = EngineConfig.from_kwargs(**engine_kwargs)
        server = ServerConfig(
            max_n=ns["max_n"], max_logprobs=ns["max_logprobs"],
            tool_call_parser=None if ns["tool_call_parser"] == "none" else ns["tool_call_parser"],
            reasoning_parser=ns["reasoning_parser"], drain_timeout_s=ns["drain_timeout"],
            enable_metrics=not ns["disable_metrics"], freeze_gc=ns["freeze_gc"])
    except ValueError as e:
        parser.error(str(e))
    return engine, server
