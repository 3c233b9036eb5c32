"""Stop strings are ignored until min_tokens (vLLM): the detokenizer emits everything before
then and still never leaks a partial stop string afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.default_model import default_model_path
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(default_model_path())


def _run(tok: Tokenizer, ids: list[int], stop: str, min_tokens: int) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"), stop=[stop], min_tokens=min_tokens)
    pieces = []
    for t in ids:
        pieces.append(detok.step([t]))
        if detok.finished:
            break
    pieces.append(detok.flush())
    return pieces, detok.text


def test_stop_string_before_min_tokens_is_ignored(tok: Tokenizer) -> None:
    rng = np.random.default_rng()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    stop_word = str(rng.choice(words))
    text = " ".join(str(w) for w in rng.choice(words, 12)) + f" {stop_word} end {stop_word} tail"
    ids = tok.encode(text, add_special_tokens=False)
    stop = " " + stop_word
    for min_tokens in (0, int(rng.integers(1, len(ids))), len(ids)):
        pieces, out = _run(tok, ids, stop, min_tokens)
        assert "".join(pieces) == out
        full = tok.decode(ids)
        # the first occurrence that ends after min_tokens tokens were decoded cuts the text
        cut = None
        for i in range(len(full)):
            if full.startswith(stop, i):
                end_tokens = len(tok.encode(full[:i + len(stop)], add_special_tokens=False))
                if end_tokens > min_tokens and len(tok.decode(ids[:min_tokens])) <= i:
                    cut = i
                    break
        if cut is not None:
            assert out == full[:cut], (min_tokens, out)
        else:
            assert out == full
        emitted = ""
        for piece in pieces:  # never a leaked stop string after min_tokens
            emitted += piece
            assert full.startswith(emitted)
