"""Fixtures: the app over the fake engine, in-process (ASGITransport) and as a live uvicorn
server on 127.0.0.1 (for the openai SDK, disconnects and concurrency)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from jaxllm.config import EngineConfig
from jaxllm.server.app import build_app
from jaxllm.server.server_config import ServerConfig

from .fake_engine import FakeEngine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(engine: FakeEngine | None = None, server_config: ServerConfig | None = None,
             **config: Any) -> tuple[Any, FakeEngine]:
    engine = engine or FakeEngine()
    return build_app(EngineConfig(**config), engine, server_config), engine


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@dataclass
class LiveServer:
    base_url: str
    engine: FakeEngine
    api_key: str

    @property
    def openai_url(self) -> str:
        return self.base_url + "/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    key = "test-key"
    app, engine = make_app(FakeEngine(max_model_len=1024), api_key=key)
    server, thread, url = start_server(app)
    try:
        yield LiveServer(url, engine, key)
    finally:
        server.should_exit = True
        thread.join(10)
