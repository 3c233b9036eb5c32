"""The server on the GPU, in-process: the FastAPI app builds its engine from a random
checkpoint (its lifespan) and answers the native and OpenAI endpoints. Skipped, and counted
as such by the device check, on an accelerator image that lacks the server's packages."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the server's packages are not installed")
pytest.importorskip("pydantic", reason="the server's packages are not installed")

from fastapi.testclient import TestClient  # noqa: E402

from jaxllm.config import EngineConfig  # noqa: E402
from jaxllm.server.app import build_app  # noqa: E402
from jaxllm.server.server_config import ServerConfig  # noqa: E402


@pytest.fixture(scope="module")
def client(random_model_dir):
    config = EngineConfig(model=str(random_model_dir), served_model_name="random",
                          max_num_seqs=8, max_model_len=256, max_num_batched_tokens=128)
    # (not frozen: this is a test process, not a server's)
    with TestClient(build_app(config, server_config=ServerConfig(freeze_gc=False))) as c:
        yield c


def test_health_and_models(client):
    assert client.get("/health").status_code == 200
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["random"]


def test_completions_and_chat(client):
    r = client.post("/v1/completions", json={"model": "random", "prompt": "Once upon a time",
                                             "max_tokens": 12, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["finish_reason"] == "length"
    r = client.post("/v1/chat/completions", json={
        "model": "random", "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8, "temperature": 0.7, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_native_generate_streams(client):
    with client.stream("POST", "/generate", json={
            "text": "The quick brown fox", "stream": True,
            "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}}) as r:
        assert r.status_code == 200
        chunks = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(chunks) >= 2 and chunks[-1].strip() == "data: [DONE]"
