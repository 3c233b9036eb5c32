"""benchmarks/random_model.py: the trained tokenizer (padded to a model's vocabulary) and the
random checkpoint load in jaxllm exactly as transformers wrote them."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.random_model import SHAPES, make_random_model


def test_random_model_with_padded_trained_tokenizer_loads_in_jaxllm(tmp_path):
    from jaxllm.conversions import load_checkpoint
    from jaxllm.tokenizer import load_tokenizer

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    vocab = int(rng.integers(2500, 4000))
    shape = {**SHAPES["tiny"], "vocab_size": vocab}
    path = make_random_model(tmp_path, shape, seed=int(rng.integers(1 << 30)),
                             prefer_default_tokenizer=False)
    tokenizer = load_tokenizer(path)
    assert len(tokenizer.hf) == vocab == json.loads((path / "config.json").read_text())["vocab_size"]
    text = "the quick brown fox, 12 (x) jumps"
    ids = tokenizer.hf.encode(text, add_special_tokens=False)
    assert max(ids) < 2048 and tokenizer.hf.decode(ids) == text  # fillers never encoded
    filler = int(rng.integers(2048, vocab))
    assert tokenizer.hf.decode([filler]) == f"<|filler_{filler}|>"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], True).endswith(
        "<|im_start|>assistant\n")
    cfg, params = load_checkpoint(path, dtype="float32")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (vocab, 64, 2)
    assert params["embed_tokens.embedding"].shape == (vocab, 64)
    scales = np.asarray(params["layers.0.input_norm.scale"])
    assert not np.allclose(scales, 1.0)  # norms are random too, not left at 1
    assert cfg.eos_token_ids == (tokenizer.hf.convert_tokens_to_ids("<|im_end|>"),)
