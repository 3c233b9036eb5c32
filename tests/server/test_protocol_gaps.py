"""Protocol details peers' clients rely on, over the fake engine: prompt_logprobs (vLLM's shape,
key always sent), `logprobs: 0` naming the sampled token, logit_bias / allowed_token_ids /
bad_words reaching SamplingParams, and the error for a body that is not JSON."""

from __future__ import annotations

import random

import openai
import pytest

from .conftest import LiveServer, asgi_client, make_app
from .fake_engine import BYTE_OFFSET, FakeEngine

MODEL = "fake-model"


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.openai_url, api_key=live_server.api_key,
                         _strict_response_validation=True, max_retries=0, timeout=30)


def _random_word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnop") for _ in range(n))


def _expected_entry(token: int, k: int) -> dict[str, dict]:
    """What the fake engine computes for one prompt position, in vLLM's JSON shape."""
    entry = FakeEngine._position_logprobs(token, k)
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    keep = [(token, entry[token])] + [(t, lp) for t, lp in ranked if t != token][:k]
    return {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                     "decoded_token": bytes([t - BYTE_OFFSET]).decode(errors="replace")}
            for t, lp in keep}


def test_completion_prompt_logprobs_shape_and_values(client: openai.OpenAI) -> None:
    rng = random.Random()
    prompt = _random_word(rng, rng.randint(3, 9))
    ids = [ord(c) + BYTE_OFFSET for c in prompt]
    for k in (0, 2):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                      extra_body={"prompt_logprobs": k})
        got = r.choices[0].model_extra["prompt_logprobs"]
        assert got == [None] + [_expected_entry(t, k) for t in ids[1:]]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, n=2)
    assert all("prompt_logprobs" in c.model_extra and c.model_extra["prompt_logprobs"] is None
               for c in plain.choices)
    # echo asks the engine for more alternatives; prompt_logprobs still has only its own k
    # (raw JSON: echoed logprobs start with null, which the SDK's strict types refuse)
    echoed = client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=3,
        extra_body={"prompt_logprobs": 1}).http_response.json()
    assert echoed["choices"][0]["prompt_logprobs"] == (
        [None] + [_expected_entry(t, 1) for t in ids[1:]])


def test_chat_prompt_logprobs_on_the_response(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "SAY:ok"}],
        extra_body={"prompt_logprobs": 1})
    body = raw.http_response.json()
    assert raw.parse().choices[0].message.content == "ok"
    lps = body["prompt_logprobs"]
    assert lps[0] is None and len(lps) == body["usage"]["prompt_tokens"]
    assert all(1 <= len(p) <= 2 and sum(e["rank"] == 1 for e in p.values()) == 1 for p in lps[1:])
    plain = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "SAY:ok"}]).http_response.json()
    assert "prompt_logprobs" in plain and plain["prompt_logprobs"] is None


def test_logprobs_zero_names_the_sampled_token(client: openai.OpenAI) -> None:
    text = _random_word(random.Random(), 6)
    r = client.completions.create(model=MODEL, prompt="SAY:" + text, max_tokens=10, logprobs=0)
    lp = r.choices[0].logprobs
    assert [list(t) for t in lp.top_logprobs] == [[tok] for tok in lp.tokens]
    assert all(t[tok] == v for t, tok, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs,
                                                  strict=True))
    two = client.completions.create(model=MODEL, prompt="SAY:" + text, max_tokens=10, logprobs=2)
    for top, tok in zip(two.choices[0].logprobs.top_logprobs, two.choices[0].logprobs.tokens,
                        strict=True):
        assert tok in top and 2 <= len(top) <= 3


@pytest.mark.anyio
async def test_token_constraints_reach_sampling_params() -> None:
    app, engine = make_app()
    rng = random.Random()
    word = _random_word(rng, rng.randint(2, 4))
    bias_id = rng.randint(BYTE_OFFSET, 258)
    async with asgi_client(app) as c:
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                    "content": "x"}]})):
            r = await c.post(path, json={**body, "max_tokens": 2,
                                         "logit_bias": {str(bias_id): -100, "5": 2.5},
                                         "allowed_token_ids": [5, bias_id],
                                         "bad_words": [word]})
            assert r.status_code == 200, r.text
            sp = list(engine.params_seen.values())[-1]
            assert sp.logit_bias == {bias_id: -100.0, 5: 2.5}
            assert sp.allowed_token_ids == [5, bias_id] and sp.bad_words == [word]
            ids = [ord(ch) + BYTE_OFFSET for ch in word]
            assert sp.bad_words_token_ids[0] == ids  # " word" has another length: not added
        for bad in ({"logit_bias": {"99999": 1}}, {"logit_bias": {"7": 101}},
                    {"logit_bias": {"x": 1}}, {"allowed_token_ids": [-1]},
                    {"allowed_token_ids": [99999]}, {"bad_words": [""]}):
            r = await c.post("/v1/completions", json={"prompt": "x", **bad})
            assert r.status_code == 400, (bad, r.text)


@pytest.mark.anyio
async def test_non_json_body_says_json_was_expected() -> None:
    app, _ = make_app()
    async with asgi_client(app) as c:
        for path, content, headers in (
                ("/generate", '{"text": "hi"}', {}),
                ("/v1/completions", '{"prompt": "hi"', {"Content-Type": "application/json"}),
                ("/v1/chat/completions", "[1, 2]", {"Content-Type": "application/json"})):
            r = await c.post(path, content=content, headers=headers)
            assert r.status_code == 400
            assert "JSON" in r.json()["error"]["message"]
            assert "application/json" in r.json()["error"]["message"]
        ok = await c.post("/generate", content='{"text": "SAY:hi"}',
                          headers={"Content-Type": "application/json"})
        assert ok.status_code == 200 and ok.json()["text"] == "hi"
