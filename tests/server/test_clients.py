"""One request each through litellm and langchain-openai pointed at the live server."""

from __future__ import annotations

import pytest

from .conftest import LiveServer


def test_litellm(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    litellm = pytest.importorskip("litellm")
    r = litellm.completion(model="openai/fake-model", api_base=live_server.openai_url,
                           api_key=live_server.api_key,
                           messages=[{"role": "user", "content": "SAY:hello litellm"}])
    assert r.choices[0].message.content == "hello litellm"
    assert r.usage.completion_tokens == len("hello litellm") + 1


def test_langchain_openai(live_server: LiveServer) -> None:
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model="fake-model", base_url=live_server.openai_url,
                        api_key=live_server.api_key, max_retries=0, temperature=0)
    msg = llm.invoke("SAY:hello langchain")
    assert msg.content == "hello langchain"
    chunks = [c.content for c in llm.stream("SAY:streamed")]
    assert "".join(chunks) == "streamed"
