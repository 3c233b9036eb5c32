"""Fixtures: the default model's tokenizer and a grammar compiler over it (no model weights)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_tokenizer():
    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="session")
def compiler(default_tokenizer):
    from jaxllm.structured.compiler import GrammarCompiler
    from jaxllm.structured.tokenizer_view import build_llg_tokenizer

    return GrammarCompiler(lambda: build_llg_tokenizer(default_tokenizer,
                                                       default_tokenizer.eos_token_ids))
