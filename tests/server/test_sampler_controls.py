"""The sampler controls end to end: the openai SDK (strict validation) against the app over a
real AsyncEngine running a tiny random Llama (vocab 512, the default model's tokenizer), so
prompt_logprobs, min_tokens, logit_bias, allowed_token_ids and bad_words are the engine's and
the sampler's doing, checked against a plain forward pass or by their definition. Prompts are
token ids (the model's vocabulary is smaller than the tokenizer's, so no chat template here;
the chat shapes are tested over the fake engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import jax
import numpy as np
import openai
import pytest

from jaxllm.async_engine import AsyncEngine
from jaxllm.config import EngineConfig
from jaxllm.conversions import load_checkpoint
from jaxllm.engine import LLMEngine
from jaxllm.models import build_model
from jaxllm.server.app import build_app
from tests.models.hf_tiny import make_tiny_hf_model
from tests.oracles.plain_decode import forward_logits

from .conftest import start_server

VOCAB = 512
SMALL = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, page_size=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-server")
    make_tiny_hf_model("llama", seed=4321, vocab_size=VOCAB).save_pretrained(path)
    load_tokenizer(default_model_path()).save(path)
    return path


@pytest.fixture(scope="module")
def served(tiny_dir) -> Iterator[tuple[openai.OpenAI, AsyncEngine, str]]:
    config = EngineConfig(model=str(tiny_dir), **SMALL)
    engine = AsyncEngine(LLMEngine(config))
    server, thread, url = start_server(build_app(config, engine))
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120,
                           _strict_response_validation=True)
    try:
        yield client, engine, url
    finally:
        server.should_exit = True
        thread.join(10)
        asyncio.run(engine.shutdown())


def _prompt(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, VOCAB, n).tolist()


def _fresh_rng() -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence().entropy)


def _model(engine: AsyncEngine) -> str:
    return engine.model_name


def _greedy_ids(url: str, prompt: list[int], n: int) -> list[int]:
    """Token ids of a greedy continuation (the native endpoint returns ids)."""
    r = httpx.post(url + "/generate", timeout=120, json={
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
    return r.json()["output_ids"]


def test_prompt_logprobs_on_both_endpoints_equal_a_plain_forward(served, tiny_dir) -> None:
    client, engine, url = served
    rng = _fresh_rng()
    ids = _prompt(rng, int(rng.integers(6, 14)))
    cfg, params = load_checkpoint(tiny_dir, dtype="float32")
    logits = forward_logits(build_model(cfg, params, "float32"), [ids])[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    r = client.completions.create(model=_model(engine), prompt=ids, max_tokens=1,
                                  extra_body={"prompt_logprobs": 2})
    got = r.choices[0].prompt_logprobs  # type: ignore[attr-defined]
    assert got[0] is None and len(got) == len(ids)
    for pos in range(1, len(ids)):
        entry = got[pos]
        assert str(ids[pos]) in entry and 2 <= len(entry) <= 3
        assert abs(entry[str(ids[pos])]["logprob"] - logp[pos - 1, ids[pos]]) < 1e-3
        best = [e for e in entry.values() if e["rank"] == 1]
        assert best and abs(best[0]["logprob"] - logp[pos - 1].max()) < 1e-3
    plain = client.completions.create(model=_model(engine), prompt=ids, max_tokens=1)
    assert plain.choices[0].model_extra["prompt_logprobs"] is None  # the key is always sent


def test_min_tokens_masks_a_forced_eos(served) -> None:
    client, engine, url = served
    eos = sorted(engine.engine.eos_token_ids)[0]
    eos_text = engine.tokenizer.decode([eos], skip_special_tokens=False)
    rng = _fresh_rng()
    for min_tokens in (0, 1, int(rng.integers(2, 9))):
        r = client.completions.create(
            model=_model(engine), prompt=_prompt(rng, 5), max_tokens=12, temperature=0,
            logit_bias={str(eos): 100},
            extra_body={"min_tokens": min_tokens, "skip_special_tokens": False})
        text = r.choices[0].text
        assert r.usage.completion_tokens == min_tokens + 1, (min_tokens, text)
        assert r.choices[0].finish_reason == "stop"
        assert eos_text not in text.removesuffix(eos_text), text  # EOS only as the last token


def test_logit_bias_bans_and_forces(served) -> None:
    client, engine, url = served
    rng = _fresh_rng()
    prompt = _prompt(rng, 6)
    forced = int(rng.integers(3, VOCAB))
    r = client.completions.create(model=_model(engine), prompt=prompt, max_tokens=4,
                                  temperature=1.0, logit_bias={str(forced): 100}, logprobs=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].logprobs.tokens == [engine.tokenizer.decode([forced])] * 4
    # ban greedy's first token; texts are compared, so pick a prompt whose first token has a
    # text of its own (byte tokens all decode to U+FFFD and would compare equal)
    for _ in range(10):
        prompt = _prompt(rng, 6)
        first = _greedy_ids(url, prompt, 1)[0]
        if "\ufffd" not in engine.tokenizer.decode([first]):
            break
    else:
        pytest.skip("no greedy first token with a text of its own")
    banned = client.completions.create(
        model=_model(engine), prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
        logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    lp = banned.choices[0].logprobs
    assert lp.tokens[0] != engine.tokenizer.decode([first])
    # logprobs are of the raw distribution: the banned token still ranks first there
    assert engine.tokenizer.decode([first]) in lp.top_logprobs[0]
    assert lp.token_logprobs[0] < max(lp.top_logprobs[0].values())


def test_allowed_token_ids_and_bad_words(served) -> None:
    client, engine, url = served
    rng = _fresh_rng()
    allowed = sorted({int(t) for t in rng.integers(3, VOCAB, 6)})
    r = client.completions.create(
        model=_model(engine), prompt=_prompt(rng, 5), max_tokens=10, temperature=1.0, logprobs=0,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    texts = {engine.tokenizer.decode([t]) for t in allowed}
    assert r.usage.completion_tokens == 10
    assert all(t in texts for t in r.choices[0].logprobs.tokens)
    # bad_words: ban the first token greedy decoding picks, as a word; greedy then avoids it
    for _ in range(5):
        prompt = _prompt(rng, 7)
        first = _greedy_ids(url, prompt, 1)[0]
        word = engine.tokenizer.decode([first])
        plain = engine.tokenizer.encode(word.strip(), add_special_tokens=False)
        spaced = engine.tokenizer.encode(" " + word.strip(), add_special_tokens=False)
        if word.strip() and [first] in (plain, spaced):
            break
    else:
        pytest.skip("no single-token word among the greedy first tokens")
    again = client.completions.create(model=_model(engine), prompt=prompt, max_tokens=6,
                                      temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, "bad_words": [word]})
    assert word not in again.choices[0].logprobs.tokens


def test_streamed_text_never_leaks_a_stop_string(served) -> None:
    """The engine's detokenizer holds back text that may start a stop string (the server adds
    no holdback of its own): a streamed answer is always a prefix of the final one."""
    client, engine, url = served
    # streamed legacy completions carry finish_reason null, which the SDK's strict types refuse
    lenient = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    rng = _fresh_rng()
    prompt = _prompt(rng, 6)
    seed = int(rng.integers(2**31))  # a seeded sample repeats exactly (greedy text loops)
    full = client.completions.create(model=_model(engine), prompt=prompt, max_tokens=24,
                                     temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    starts = [i for i in range(1, len(text) - 3) if text.find(text[i:i + 3]) == i]
    if not starts:
        pytest.skip("sampled text too repetitive for a fresh stop string")
    cut = starts[int(rng.integers(len(starts)))]
    stop = text[cut:cut + 3]
    stream = lenient.completions.create(model=_model(engine), prompt=prompt, max_tokens=24,
                                       temperature=1.0, seed=seed, stop=[stop], stream=True,
                                       extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == text[:cut]
