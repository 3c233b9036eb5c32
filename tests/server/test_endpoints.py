"""In-process tests (httpx ASGITransport) of every endpoint, the error statuses and the
middlewares."""

from __future__ import annotations

import json

import httpx
import pytest

from jaxllm.server.server_config import ServerConfig

from .conftest import asgi_client, make_app

pytestmark = pytest.mark.anyio


def _sse_events(text: str) -> list[object]:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _assert_openai_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if type_:
        assert err["type"] == type_
    return err


async def test_admin_endpoints() -> None:
    app, engine = make_app(served_model_name="x", api_key="secret")
    headers = {"Authorization": "Bearer secret"}
    async with asgi_client(app) as c:
        assert (await c.get("/health")).status_code == 200
        models = (await c.get("/v1/models", headers=headers)).json()
        assert models["data"][0]["id"] == engine.model_name
        assert (await c.get(f"/v1/models/{engine.model_name}", headers=headers)).status_code == 200
        _assert_openai_error(await c.get("/v1/models/nope", headers=headers), 404,
                             "not_found_error")
        info = (await c.get("/server_info", headers=headers)).json()
        assert info["engine_config"]["api_key"] == "***"
        assert "secret" not in json.dumps(info)
        mi = (await c.get("/model_info", headers=headers)).json()
        assert mi["max_model_len"] == engine.max_model_len
        assert (await c.post("/flush_cache", headers=headers)).json()["success"]
        assert engine.prefix_cache_resets == 1
        toks = (await c.post("/tokenize", json={"prompt": "héllo"}, headers=headers)).json()
        assert toks["count"] == len(toks["tokens"]) == 6
        back = (await c.post("/detokenize", json={"tokens": toks["tokens"]},
                             headers=headers)).json()
        assert back["prompt"] == "héllo"
        chat_toks = (await c.post("/tokenize", json={"messages": [{"role": "user",
                                                                   "content": "hi"}]},
                                  headers=headers)).json()
        assert chat_toks["count"] > 2
        _assert_openai_error(await c.post("/detokenize", json={"tokens": [10**6]},
                                          headers=headers), 400)
        r = await c.post("/abort_request", json={"rid": "unknown"}, headers=headers)
        assert r.json() == {"success": False, "rid": "unknown"}
        metrics = await c.get("/metrics")  # open without the key
        assert metrics.status_code == 200
        assert "jaxllm_http_requests_total" in metrics.text
        assert "jaxllm_compile_count_total 3.0" in metrics.text


async def test_auth() -> None:
    app, _ = make_app(api_key="secret")
    async with asgi_client(app) as c:
        _assert_openai_error(await c.get("/v1/models"), 401, "authentication_error")
        _assert_openai_error(await c.get("/v1/models", headers={"Authorization": "Bearer bad"}),
                             401)
        _assert_openai_error(await c.get("/v1/models", headers={"Authorization": "secret"}), 401)
        ok = await c.get("/v1/models", headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200


async def test_request_id_cors_and_unknown_route() -> None:
    app, _ = make_app(allowed_origins=["http://a.example"])
    async with asgi_client(app) as c:
        r = await c.get("/v1/models", headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert (await c.get("/v1/models")).headers["x-request-id"]
        pre = await c.options("/v1/completions", headers={
            "Origin": "http://a.example", "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://a.example"
        _assert_openai_error(await c.get("/nope"), 404)
        _assert_openai_error(await c.get("/v1/completions"), 405)


async def test_body_limit_413() -> None:
    app, _ = make_app(max_request_body_bytes=1000)
    async with asgi_client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "x" * 2000, "model": "fake-model"})
        _assert_openai_error(r, 413)

        async def chunks():  # no Content-Length: counted while reading
            yield b'{"prompt": "'
            yield b"y" * 2000
            yield b'"}'

        r = await c.post("/v1/completions", content=chunks(),
                         headers={"content-type": "application/json"})
        _assert_openai_error(r, 413)


async def test_validation_errors_are_400() -> None:
    app, engine = make_app(server_config=ServerConfig(max_n=4))
    async with asgi_client(app) as c:
        cases = [
            ("/v1/completions", {"prompt": "hi", "temperature": -1}),
            ("/v1/completions", {"prompt": "hi", "n": 5}),
            ("/v1/completions", {"prompt": "hi", "logprobs": 21}),
            ("/v1/completions", {"prompt": "hi", "suffix": "s"}),
            ("/v1/completions", {"prompt": "hi", "best_of": 3}),
            ("/v1/completions", {"prompt": []}),
            ("/v1/completions", {"prompt": [999999]}),
            ("/v1/completions", {"prompt": "hi", "stop": [""]}),
            ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
            ("/v1/completions", {"nothing": 1}),
            ("/v1/completions", {"prompt": "hi", "top_p": 0}),
            ("/v1/chat/completions", {"messages": []}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "top_logprobs": 3}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "logprobs": True, "top_logprobs": 30}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": "x"}}}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "guided_regex": "a", "guided_choice": ["b"]}),
            ("/v1/completions", {"prompt": "hi", "structured_outputs": {"json": "{bad"}}),
            ("/generate", {"text": "a", "sampling_params": {"regex": "a", "ebnf": "b"}}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "tool_choice": "required"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            ("/generate", {"text": "a", "input_ids": [5]}),
            ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}),
        ]
        for path, body in cases:
            _assert_openai_error(await c.post(path, json=body), 400, "invalid_request_error")
        bad_json = await c.post("/v1/completions", content=b"{not json",
                                headers={"content-type": "application/json"})
        _assert_openai_error(bad_json, 400)
        rf = await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
        assert "response_format" in rf.json()["error"]["message"]
    assert not engine.active


async def test_too_long_prompt_names_the_numbers() -> None:
    app, engine = make_app()
    async with asgi_client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "x" * 250, "max_tokens": 10})
        err = _assert_openai_error(r, 400)
        assert str(engine.max_model_len) in err["message"] and "260" in err["message"]
        r = await c.post("/v1/completions", json={"prompt": "x" * 300, "max_tokens": None})
        _assert_openai_error(r, 400)


async def test_unknown_model_404_and_unknown_fields_ignored() -> None:
    app, _ = make_app()
    async with asgi_client(app) as c:
        err = _assert_openai_error(await c.post("/v1/completions", json={
            "model": "gpt-9", "prompt": "hi"}), 404, "not_found_error")
        assert err["code"] == "model_not_found"
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "hi",
                                                  "vendor_extension": {"a": 1}, "max_tokens": 3})
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 3


async def test_overload_429_and_dead_503() -> None:
    app, engine = make_app()
    engine.max_active = 0
    async with asgi_client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "hi"})
        _assert_openai_error(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "2"
        r = await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "stream": True})
        _assert_openai_error(r, 429)
        engine.max_active = 1000
        engine.dead = True
        _assert_openai_error(await c.post("/v1/completions", json={"prompt": "hi"}), 503)
        assert (await c.get("/health")).status_code == 503


async def test_mid_stream_error_is_an_sse_error_event() -> None:
    app, engine = make_app()
    async with asgi_client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "FAIL: now", "stream": True,
                                                  "max_tokens": 10})
        assert r.status_code == 200
        events = _sse_events(r.text)
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1 and errors[0]["error"]["type"] == "service_unavailable_error"
        assert events[-1] == "[DONE]"
    assert not engine.active


async def test_native_generate() -> None:
    app, engine = make_app()
    async with asgi_client(app) as c:
        r = (await c.post("/generate", json={"text": "SAY:hello", "sampling_params": {
            "max_new_tokens": 20, "temperature": 0}, "rid": "r1"})).json()
        assert r["text"] == "hello"
        assert r["meta_info"]["id"] == "r1"
        assert r["meta_info"]["completion_tokens"] == len(r["output_ids"]) == 6  # + eos
        assert r["meta_info"]["finish_reason"]["type"] == "stop"
        batch = (await c.post("/generate", json={"input_ids": [[10, 11], [12]],
                                                 "sampling_params": {"max_new_tokens": 4},
                                                 "return_logprob": True,
                                                 "top_logprobs_num": 2})).json()
        assert len(batch) == 2
        for item in batch:
            assert item["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
            assert len(item["meta_info"]["output_token_logprobs"]) == 4
            assert all(len(t) == 2 for t in item["meta_info"]["output_top_logprobs"])
        r = await c.post("/generate", json={"text": "SAY:abc", "stream": True,
                                            "sampling_params": {"temperature": 0}})
        events = _sse_events(r.text)
        assert events[-1] == "[DONE]"
        texts = [e["text"] for e in events[:-1]]
        assert texts[-1] == "abc" and all("abc".startswith(t) for t in texts)
        n2 = (await c.post("/generate", json={"text": "q", "sampling_params": {
            "n": 2, "max_new_tokens": 3, "seed": 1, "temperature": 1.0}})).json()
        assert len(n2) == 2 and n2[0]["text"] != n2[1]["text"]
    assert not engine.active


async def test_cache_salt_priority_and_request_id_reach_the_engine() -> None:
    app, engine = make_app()
    async with asgi_client(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                  "cache_salt": "tenant-a"},
                         headers={"X-Request-Id": "myid"})
        assert r.status_code == 200
    (rid,) = [k for k in engine.cache_salts if "myid" in k]
    assert engine.cache_salts[rid] == "tenant-a"


async def test_chat_reasoning_split_when_enabled() -> None:
    app, _ = make_app(server_config=ServerConfig(reasoning_parser="think"))
    body = {"messages": [{"role": "user", "content": "SAY:<think>hmm, 2+2</think>\n\nIt is 4."}],
            "temperature": 0}
    async with asgi_client(app) as c:
        msg = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
        assert msg["reasoning_content"] == "hmm, 2+2" and msg["content"] == "It is 4."
        r = await c.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [e for e in _sse_events(r.text) if isinstance(e, dict)]
        reasoning = "".join(ch["choices"][0]["delta"].get("reasoning_content") or ""
                            for ch in chunks)
        content = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
        assert (reasoning, content) == ("hmm, 2+2", "It is 4.")


async def test_no_chat_template_is_400() -> None:
    app, engine = make_app()
    engine.tokenizer.has_chat_template = False
    async with asgi_client(app) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                     "content": "x"}]})
        _assert_openai_error(r, 400)


async def test_streamed_text_never_shows_a_cut_stop_string() -> None:
    app, _ = make_app()
    async with asgi_client(app) as c:
        for path, body, get in [
            ("/v1/completions", {"prompt": "SAY:one two three four", "stop": [" three", "x"]},
             lambda ch: ch["choices"][0]["text"] if ch["choices"] else ""),
            ("/v1/chat/completions", {"messages": [{"role": "user",
                                                    "content": "SAY:one two three four"}],
                                      "stop": " three"},
             lambda ch: ch["choices"][0]["delta"].get("content") or "" if ch["choices"] else ""),
        ]:
            r = await c.post(path, json={**body, "stream": True, "max_tokens": 40})
            chunks = [e for e in _sse_events(r.text) if isinstance(e, dict)]
            assert "".join(get(ch) for ch in chunks) == "one two"
        r = await c.post("/generate", json={"text": "SAY:one two three", "stream": True,
                                            "sampling_params": {"stop": " tw"}})
        texts = [e["text"] for e in _sse_events(r.text) if isinstance(e, dict)]
        assert texts[-1] == "one" and all("one".startswith(t) for t in texts)


async def test_continuous_usage_stats() -> None:
    """Per-chunk usage only with include_usage and continuous_usage_stats (vLLM); the counts
    are the tokens sent so far: 0 on the role-only chat chunk, then one more per chunk."""
    app, _ = make_app()
    async with asgi_client(app) as c:
        r = await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        chunks = [e for e in _sse_events(r.text) if isinstance(e, dict)]
        used = [ch["usage"]["completion_tokens"] for ch in chunks]
        assert used == [0, 1, 2, 3, 4, 5, 5] and chunks[-1]["choices"] == []
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        r = await c.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        chunks = [e for e in _sse_events(r.text) if isinstance(e, dict)]
        assert [ch["usage"]["completion_tokens"] for ch in chunks] == [1, 2, 3, 4, 4]
        for body in ({"include_usage": False, "continuous_usage_stats": True},
                     {"continuous_usage_stats": True}):
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3,
                                                      "stream": True, "stream_options": body})
            chunks = [e for e in _sse_events(r.text) if isinstance(e, dict)]
            assert len(chunks) == 3 and not any("usage" in ch for ch in chunks)


async def test_output_kind_each_endpoint_asks_the_engine_for() -> None:
    """Streams of the OpenAI endpoints take DELTA outputs, the native stream CUMULATIVE ones
    (its events are cumulative), every non-streaming answer FINAL_ONLY."""
    app, engine = make_app()
    bodies = {"/v1/completions": {"prompt": "hi", "max_tokens": 3},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 3},
              "/v1/responses": {"input": "hi", "max_output_tokens": 3},
              "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 3}}}
    kinds = {}
    async with asgi_client(app) as c:
        for path, body in bodies.items():
            for stream in (False, True):
                before = set(engine.params_seen)
                r = await c.post(path, json={**body, "stream": stream})
                assert r.status_code == 200, r.text
                (rid,) = set(engine.params_seen) - before
                kinds[path, stream] = engine.params_seen[rid].output_kind.name
    assert kinds == {(p, s): ("CUMULATIVE" if p == "/generate" else "DELTA") if s
                     else "FINAL_ONLY" for p in bodies for s in (False, True)}


async def test_streamed_completion_equals_the_answer_with_echo_logprobs_and_n() -> None:
    """A completions stream (DELTA outputs, tokens waiting for a chunk to carry them) puts
    together the same text, logprobs, prompt logprobs and usage as the non-streaming answer."""
    app, _ = make_app()
    body = {"prompt": ["ab", "SAY:hello"], "max_tokens": 6, "temperature": 0, "n": 2,
            "echo": True, "logprobs": 2, "prompt_logprobs": 1,
            "stream_options": {"include_usage": True}}
    # (no stop strings: text a stop string may start is held back while its token's logprobs
    # are sent, so a stream's text offsets count only the text sent before each chunk)
    async with asgi_client(app) as c:
        whole = (await c.post("/v1/completions", json=body | {"stream_options": None})).json()
        r = await c.post("/v1/completions", json=body | {"stream": True})
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]"
    joined: dict[int, dict] = {}
    for e in events[:-2]:
        for ch in e["choices"]:
            acc = joined.setdefault(ch["index"], {"text": "", "tokens": [], "offsets": [],
                                                  "prompt_logprobs": None})
            acc["text"] += ch["text"]
            acc["tokens"] += ch["logprobs"]["tokens"] if ch["logprobs"] else []
            acc["offsets"] += ch["logprobs"]["text_offset"] if ch["logprobs"] else []
            if ch.get("prompt_logprobs") is not None:
                acc["prompt_logprobs"] = ch["prompt_logprobs"]
            if ch["finish_reason"] is not None:
                acc["finish_reason"] = ch["finish_reason"]
    assert sorted(joined) == [ch["index"] for ch in whole["choices"]] == [0, 1, 2, 3]
    for ch in whole["choices"]:
        acc = joined[ch["index"]]
        assert acc["text"] == ch["text"] and acc["finish_reason"] == ch["finish_reason"]
        assert acc["tokens"] == ch["logprobs"]["tokens"]
        assert acc["offsets"] == ch["logprobs"]["text_offset"]
        assert acc["prompt_logprobs"] == ch["prompt_logprobs"]
    assert events[-2]["usage"] == whole["usage"]
