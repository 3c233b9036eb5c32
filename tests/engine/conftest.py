"""Fixtures: a tiny random Llama checkpoint directory with the default model's tokenizer."""

from __future__ import annotations

import pytest

from tests.models.hf_tiny import make_tiny_hf_model


@pytest.fixture(scope="session")
def default_gguf():
    from jaxllm.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_gguf):
    """A 2-layer random Llama (vocab 512) saved with save_pretrained, plus a real tokenizer."""
    from jaxllm.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_hf_model("llama", seed=1234, vocab_size=512)
    model.save_pretrained(path)
    load_tokenizer(default_gguf).save(path)
    return path
