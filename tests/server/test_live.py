"""Live-server behaviour: client disconnects abort requests, a concurrent load with aborts
completes without leaks, and shutdown drains in-flight requests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from .conftest import make_app, start_server
from .fake_engine import FakeEngine


def _wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.fixture
def slow_server() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(token_delay_s=0.01, max_model_len=4096)
    app, _ = make_app(engine)
    server, thread, url = start_server(app)
    try:
        yield url, engine
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "go", "max_tokens": 2000, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "go"}],
                              "max_tokens": 2000, "stream": True}),
    ("/generate", {"text": "go", "stream": True, "sampling_params": {"max_new_tokens": 2000}}),
])
def test_stream_disconnect_aborts(slow_server: tuple[str, FakeEngine], path: str, body: dict
                                  ) -> None:
    url, engine = slow_server
    with httpx.Client(base_url=url, timeout=30) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got == 3:
                break
    _wait_until(lambda: engine.aborted and not engine.active)
    assert len(engine.aborted) == 1 and engine.abandoned == engine.aborted


def test_non_stream_disconnect_aborts(slow_server: tuple[str, FakeEngine]) -> None:
    url, engine = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": "go", "max_tokens": 2000},
                   timeout=httpx.Timeout(30, read=0.3))
    _wait_until(lambda: engine.aborted and not engine.active)
    assert engine.finished == []


def test_concurrent_load_with_aborts() -> None:
    engine = FakeEngine(token_delay_s=0.002, max_model_len=4096)
    app, _ = make_app(engine)
    server, thread, url = start_server(app)

    async def completion(c: httpx.AsyncClient, i: int) -> str:
        r = await c.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 20,
                                                  "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def chat_stream(c: httpx.AsyncClient, i: int) -> str:
        text = ""
        async with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 15,
                "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"]
                    text += "".join(d["delta"].get("content") or "" for d in delta)
        return text

    async def aborted_by_rid(c: httpx.AsyncClient, i: int) -> dict:
        task = asyncio.create_task(c.post("/generate", json={
            "text": "long", "rid": f"victim-{i}", "sampling_params": {"max_new_tokens": 3000}}))
        while f"victim-{i}" not in engine.active:
            await asyncio.sleep(0.005)
        await c.post("/abort_request", json={"rid": f"victim-{i}"})
        return (await task).json()

    async def cancelled_client(c: httpx.AsyncClient, i: int) -> None:
        task = asyncio.create_task(c.post("/v1/completions", json={"prompt": f"c{i}",
                                                                   "max_tokens": 3000},
                                          headers={"X-Request-Id": f"cancel{i}"}))
        while not any(f"-cancel{i}-" in r for r in engine.active):
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def main() -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            jobs = ([completion(c, i) for i in range(32)] + [chat_stream(c, i) for i in range(24)]
                    + [aborted_by_rid(c, i) for i in range(4)]
                    + [cancelled_client(c, i) for i in range(4)])
            results = await asyncio.gather(*jobs)
        assert all(len(t) == 20 for t in results[:32])
        assert all(len(t) == 15 for t in results[32:56])
        assert all(r["meta_info"]["finish_reason"]["type"] == "abort" for r in results[56:60])

    try:
        asyncio.run(main())
        _wait_until(lambda: not engine.active)
        assert len(engine.finished) == 60  # 56 completed + 4 aborted by rid (final "abort")
        assert len(engine.abandoned) == 4  # the cancelled clients
        assert all("-cancel" in r for r in engine.abandoned)
        assert set(engine.abandoned) == {r for r in engine.aborted if "-cancel" in r}
    finally:
        server.should_exit = True
        thread.join(10)


def test_shutdown_drains_in_flight_requests() -> None:
    engine = FakeEngine(token_delay_s=0.005, max_model_len=4096)
    app, _ = make_app(engine)
    server, thread, url = start_server(app)
    result: dict = {}

    def request() -> None:
        result["r"] = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 60},
                                 timeout=30)

    t = threading.Thread(target=request)
    t.start()
    _wait_until(lambda: bool(engine.active))
    server.should_exit = True
    t.join(30)
    thread.join(30)
    assert result["r"].status_code == 200
    assert len(result["r"].json()["choices"][0]["text"]) == 60
