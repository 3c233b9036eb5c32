"""Every engine front implements its protocol with the same signatures (one argument order)."""

from __future__ import annotations

import inspect

import pytest

from jaxllm.async_engine import AsyncEngine
from jaxllm.dp_engine import DataParallelEngine
from jaxllm.engine import LLMEngine
from jaxllm.engine_client import EngineClient, EngineCore
from jaxllm.multihost import LeaderAsyncEngine


def _methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(protocol).items()
            if not name.startswith("_") and inspect.isfunction(fn)}


def _params(sig: inspect.Signature) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in sig.parameters.values()]


@pytest.mark.parametrize("cls", [AsyncEngine, DataParallelEngine, LeaderAsyncEngine])
def test_async_fronts_implement_engine_client(cls):
    for name, sig in _methods(EngineClient).items():
        impl = getattr(cls, name, None)
        assert impl is not None, f"{cls.__name__} lacks {name}"
        if name == "generate" and cls is LeaderAsyncEngine:
            impl = AsyncEngine.generate  # forwards *args/**kwargs to it
        assert _params(inspect.signature(impl)) == _params(sig), f"{cls.__name__}.{name}"
    assert isinstance(cls.is_healthy, property)


def test_llm_engine_implements_engine_core():
    for name, sig in _methods(EngineCore).items():
        assert _params(inspect.signature(getattr(LLMEngine, name))) == _params(sig), name


def test_generate_and_add_request_share_one_argument_order():
    gen = [p for p, _ in _params(inspect.signature(EngineClient.generate))][1:]
    add = [p for p, _ in _params(inspect.signature(EngineCore.add_request))][1:]
    assert add == gen and gen[0] == "prompt"  # (what outputs: sampling_params.output_kind)
