"""Fixtures for the draft-model tests: tiny random checkpoints and one engine that speculates
with its own model as the draft (compiling an engine is what these tests spend their time
on, so the greedy and the statistical tests share it)."""

from __future__ import annotations

import pytest

from tests.models.hf_tiny import make_tiny_hf_model

VOCAB = 32  # >= max_logprobs (20): the samplers take a top 20
LM_HEAD_SCALE = 20.0  # peaked next-token distributions: about half the greedy drafts of a
# temperature-1 request are accepted (test_engine_statistics.py)
# budget 32: a 40-token prompt is prefilled in chunks, and the draft's first catch-up of it
# (41 tokens) is split over two calls; 11 usable pages of 8 tokens: 4 requests of 3, 9, 20
# and 40 prompt tokens + 20 generated need 3 + 4 + 5 + 8 pages at the end: preemption
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, page_size=8,
              num_pages=12, num_speculative_tokens=3, speculative_disable_by_batch_size=None,
              seed=0)


def _save(path, kind: str, seed: int, tokenizer_from=None, head_scale=None, **overrides):
    model = make_tiny_hf_model(kind, seed=seed, **overrides)
    if head_scale is not None:
        import torch

        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    if tokenizer_from is not None:
        from jaxllm.tokenizer import load_tokenizer

        load_tokenizer(tokenizer_from).save(path)
    return path


@pytest.fixture(scope="session")
def draft_dirs(tmp_path_factory):
    """target: a 2-layer random Llama over 32 tokens, LM head scaled up, with the default
    model's tokenizer (token-id prompts only); other: a random 1-layer Qwen2 of the same
    vocabulary (another family; no tokenizer, a draft needs none); small_vocab: a Llama over
    8 tokens (a mismatch)."""
    from jaxllm.default_model import default_model_path

    root = tmp_path_factory.mktemp("draft-models")
    return {
        "target": _save(root / "target", "llama", 4321, default_model_path(),
                        head_scale=LM_HEAD_SCALE, vocab_size=VOCAB, tie_word_embeddings=False),
        "other": _save(root / "other", "qwen2", 77, vocab_size=VOCAB, num_hidden_layers=1),
        "small_vocab": _save(root / "small", "llama", 5, vocab_size=8),
    }


@pytest.fixture(scope="session")
def spec_engine(draft_dirs):
    """An engine whose draft model is the target itself (every greedy draft accepted)."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine import LLMEngine

    target = str(draft_dirs["target"])
    return LLMEngine(EngineConfig(model=target, speculative_mode="draft",
                                  speculative_model=target, **ENGINE))
