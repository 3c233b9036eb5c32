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


@pytest.fixture(scope="session")
def tiny_full_vocab_dir(tmp_path_factory):
    """A 2-layer random Llama over the default model's whole vocabulary (49152) with its
    tokenizer: random logits, so only the grammar makes its outputs well-formed."""
    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer
    from tests.models.hf_tiny import make_tiny_hf_model

    path = tmp_path_factory.mktemp("tiny-llama-49152")
    model = make_tiny_hf_model("llama", seed=4321, vocab_size=49152)
    model.save_pretrained(path)
    load_tokenizer(default_model_path()).save(path)
    return path


DEFAULT_MODEL_NAME = "smollm2"


@pytest.fixture(scope="session")
def default_llm():
    """The default model, loaded once for the slow files (the spec set drives it directly,
    the client tests serve it through an AsyncEngine that is stopped afterwards)."""
    from jaxllm.llm import LLM

    return LLM(max_num_seqs=32, max_model_len=1024, num_pages=640,
               served_model_name=DEFAULT_MODEL_NAME)
