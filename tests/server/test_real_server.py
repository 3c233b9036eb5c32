"""End-to-end: `python -m jaxllm.server` with the embedded default model in a subprocess,
driven by the openai SDK (strict validation). Slow: loads and compiles the 135M model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

KEY = "real-key"
STARTUP_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(url: str) -> dict:
    return httpx.get(url + "/server_info", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=30).json()["stats"]


def _wait_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(url)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still running: {stats}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "jaxllm.server", "--host", "127.0.0.1", "--port", str(port),
           "--api-key", KEY, "--max-model-len", "512", "--max-num-seqs", "8",
           "--served-model-name", "smollm2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300,
                         _strict_response_validation=True)


MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_metrics(client: openai.OpenAI, server: str) -> None:
    assert [m.id for m in client.models.list()] == ["smollm2"]
    text = httpx.get(server + "/metrics", timeout=30).text
    assert "jaxllm_compile_count" in text


def _latency_counts(server: str) -> tuple[float, float]:
    """(time-to-first-token observations, inter-token latency observations) so far."""
    counts = {}
    for line in httpx.get(server + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        counts[name] = value
    return (float(counts["jaxllm_time_to_first_token_seconds_count"]),
            float(counts["jaxllm_inter_token_latency_seconds_count"]))


def test_latency_metrics_of_final_only_and_delta_requests(client: openai.OpenAI,
                                                          server: str) -> None:
    """A non-streaming request (one FINAL_ONLY output: the engine's timestamps) and a stream
    (DELTA outputs: their arrival) each record one time to first token and a gap per later
    token."""
    kw = dict(model="smollm2", messages=MSG, max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    ttft, gaps = _latency_counts(server)
    assert client.chat.completions.create(**kw).usage.completion_tokens == 6
    assert _latency_counts(server) == (ttft + 1, gaps + 5)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert _latency_counts(server) == (ttft + 2, gaps + 10)


def test_completion_and_chat(client: openai.OpenAI) -> None:
    r = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 8
    c = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=16,
                                       temperature=0)
    assert c.choices[0].message.content and c.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream_at_temperature_0(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=24,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seed_n_and_logprobs(client: openai.OpenAI) -> None:
    kw = dict(model="smollm2", messages=MSG, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    two = client.chat.completions.create(**{**kw, "n": 2, "logprobs": True, "top_logprobs": 3})
    assert len(two.choices) == 2
    for ch in two.choices:
        assert all(len(t.top_logprobs) == 3 for t in ch.logprobs.content)
    r = client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, logprobs=2,
                                  temperature=0)
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="hi " * 600, max_tokens=10)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=MSG, top_p=0)


def test_disconnect_frees_pages(server: str) -> None:
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=300) as c, c.stream(
            "POST", server + "/v1/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}"}) as r:
        for n, _line in enumerate(r.iter_lines()):
            if n >= 6:
                break
    _wait_idle(server)
    httpx.post(server + "/flush_cache", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert _stats(server)["page_usage"] == 0.0


def test_tokenize_roundtrip(server: str) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    toks = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, headers=h,
                      timeout=30).json()["tokens"]
    text = httpx.post(server + "/detokenize", json={"tokens": toks}, headers=h,
                      timeout=30).json()["prompt"]
    assert "Hello world" in text, json.dumps(text)
