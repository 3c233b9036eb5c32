"""Flags of `python -m jaxllm.server` -> EngineConfig / ServerConfig."""

from __future__ import annotations

import dataclasses

import pytest

from jaxllm.config import EngineConfig
from jaxllm.server.cli_args import parse_args
from jaxllm.server.server_config import ServerConfig


def test_defaults_match_the_dataclasses() -> None:
    engine, server = parse_args([])
    assert dataclasses.asdict(engine) == dataclasses.asdict(EngineConfig())
    assert server == ServerConfig()


def test_flags() -> None:
    engine, server = parse_args([
        "--model", "/m.gguf", "--port", "9000", "--api-key", "k", "--max-num-seqs", "8",
        "--no-enable-prefix-caching", "--allowed-origins", '["http://a", "http://b"]',
        "--num-pages", "100", "--dtype", "bfloat16", "--uds", "/tmp/s.sock",
        "--reasoning-parser", "think", "--tool-call-parser", "none", "--max-waiting-requests",
        "5", "--served-model-name", "m", "--quantization", "none",
        "--quantized-activations", "bfloat16", "--kv-cache-dtype", "bfloat16"])
    assert (engine.model, engine.port, engine.api_key, engine.max_num_seqs) == ("/m.gguf", 9000,
                                                                                 "k", 8)
    assert engine.enable_prefix_caching is False and engine.num_pages == 100
    assert engine.allowed_origins == ["http://a", "http://b"] and engine.uds == "/tmp/s.sock"
    assert engine.max_waiting_requests == 5 and engine.served_model_name == "m"
    assert engine.quantization == "none" and engine.quantized_activations == "bfloat16"
    assert engine.kv_cache_dtype == "bfloat16"
    assert server.reasoning_parser == "think" and server.tool_call_parser is None
    assert server.freeze_gc is True and parse_args(["--no-freeze-gc"])[1].freeze_gc is False


@pytest.mark.parametrize("argv", [["--max-num-seqs", "0"], ["--dtype", "float8"], ["--quantization", "awq"],
                                  ["--quantized-activations", "int4"], ["--kv-cache-dtype", "fp8"], ["--port", "x"], ["--num-pages", "3", "--memory-fraction", "0.3"],
                                  ["--page-size", "1"], ["--max-logprobs", "50"]])
def test_bad_flags_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
