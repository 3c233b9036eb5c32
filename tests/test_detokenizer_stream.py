"""The detokenizer's Rust fast path (tokenizers' DecodeStream) against its Python twin.

`IncrementalDetokenizer(rust_stream=False)` decodes every step with `_decode_new` alone (the
reference); the default one decodes through the Rust incremental decoder while that mirrors
the same window, and lets the Python algorithm decide where the decoder holds a token back.
Both must give the same delta, the same window and the same stop at every step, on random
token streams: real text, random ids over the whole vocabulary, runs of stray UTF-8 bytes,
special tokens, stop strings and min_tokens, with a byte-level and a sentencepiece-style
tokenizer.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as RustTokenizer
from transformers import PreTrainedTokenizerFast

from jaxllm.default_model import default_model_path
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.tokenizer import Tokenizer, load_tokenizer

_TEXT_POOLS = [
    "abcdefghijklmnopqrstuvwxyz ABC XYZ ",
    "0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    " \t\n\r  ",
    "éèçàüöñßøåæœ",
    "世界你好中文字符漢字日本語한국어",
    "🤗😀🎉🚀🏳️\u200d🌈👍🏽🇫🇷",
]


def _random_text(rng: random.Random, n: int) -> str:
    out: list[str] = []
    while len(out) < n:
        pool = rng.choice(_TEXT_POOLS)
        out.extend(rng.choice(pool) for _ in range(rng.randint(1, 8)))
    return "".join(out)


def _run_twins(tok: Tokenizer, ids: list[int], prompt: list[int], rng: random.Random,
               **kwargs) -> int:
    """Feed `ids` to the fast detokenizer and its twin (mostly one id per call, as the engine
    does, now and then several); assert they agree at every step. Returns how many steps the
    Rust decoder took part in (it existed before the step and still did after it)."""
    fast = IncrementalDetokenizer(tok, prompt, **kwargs)
    twin = IncrementalDetokenizer(tok, prompt, rust_stream=False, **kwargs)
    assert twin._stream is None
    rust_steps, i = 0, 0
    while i < len(ids) and not twin.finished:
        stream = fast._stream
        if rng.random() < 0.92:
            got, want = fast.add_token(ids[i]), twin.step([ids[i]])
            i += 1
        else:
            n = rng.randint(2, 4)
            got, want = fast.step(ids[i:i + n]), twin.step(ids[i:i + n])
            i += n
        where = (ids[:i], prompt, kwargs)
        assert got == want, where
        assert (fast._prefix, fast._read) == (twin._prefix, twin._read), where
        assert (fast.stop_hit, fast.finished) == (twin.stop_hit, twin.finished), where
        rust_steps += stream is not None and fast._stream is stream
    assert fast.flush() == twin.flush()
    assert (fast.text, fast.stop_hit, fast.token_ids) == (twin.text, twin.stop_hit, twin.token_ids)
    return rust_steps


def _stop_kwargs(tok: Tokenizer, ids: list[int], rng: random.Random) -> dict:
    """Random stop strings (one cut from the stream's own text, a decoy), include flag and
    min_tokens; sometimes none at all."""
    kwargs: dict = dict(skip_special_tokens=rng.random() < 0.5,
                        min_tokens=rng.choice([0, 0, 1, 3, 8]))
    if rng.random() < 0.5:
        text = tok.decode(ids)
        at = rng.randrange(len(text) + 1)
        kwargs.update(stop=[text[at:at + rng.randint(1, 5)] or "zz", rng.choice(["\ufffd", "q!"])],
                      include_stop_str_in_output=rng.random() < 0.5)
    return kwargs


# ---- the default model's byte-level tokenizer ---------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(default_model_path())


def _byte_ids(tok: Tokenizer) -> list[int]:
    """Tokens of one non-ASCII byte: pieces of multi-byte characters, or stray bytes."""
    return [i for i in range(600) if len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80]


def _random_stream(tok: Tokenizer, rng: random.Random, bytes_: list[int]) -> list[int]:
    kind = rng.randrange(4)
    n = rng.randint(1, 90)
    if kind == 0:  # real text: emoji, CJK, accents, whitespace
        return tok.encode(_random_text(rng, n), add_special_tokens=False)
    if kind == 1:  # real text with tokens dropped: characters cut mid-way
        ids = tok.encode(_random_text(rng, n), add_special_tokens=False)
        return [t for t in ids if rng.random() < 0.8]
    specials = sorted(tok.all_special_ids)
    p_byte = rng.choice([0.2, 0.6, 0.95])
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            out.append(rng.choice(specials))
        elif r < 0.05 + p_byte:
            out.append(rng.choice(bytes_))
        else:
            out.append(rng.randrange(tok.vocab_size if kind == 2 else 600))
    return out


def test_rust_stream_equals_python_twin_on_random_streams(tok):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    bytes_ = _byte_ids(tok)
    assert len(bytes_) > 100
    rust_steps = total = 0
    for _ in range(150):
        ids = _random_stream(tok, rng, bytes_)
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 6))]
        kwargs = _stop_kwargs(tok, ids, rng)
        rust_steps += _run_twins(tok, ids, prompt, rng, **kwargs)
        total += len(ids)
    assert rust_steps > total // 3, (seed, rust_steps, total)  # the fast path did the work


def test_streamed_text_equals_full_decode(tok):
    """Without stop strings, the deltas and flush spell the decode of every generated id."""
    rng = random.Random(random.randrange(1 << 30))
    bytes_ = _byte_ids(tok)
    for _ in range(40):
        ids = _random_stream(tok, rng, bytes_)
        skip = rng.random() < 0.5
        detok = IncrementalDetokenizer(tok, [rng.randrange(tok.vocab_size) for _ in range(3)],
                                       skip_special_tokens=skip)
        text = "".join(detok.add_token(t) for t in ids) + detok.flush()
        assert text == detok.text == tok.decode(ids, skip_special_tokens=skip)


def test_a_held_byte_keeps_the_rust_decoder(tok):
    """A stray byte is held back by both algorithms: the Rust decoder, which took it, still
    mirrors the window and decodes the next token (no rebuild)."""
    stray = next(i for i in _byte_ids(tok) if 0x80 <= tok.token_bytes(i)[0] < 0xC0)
    (a,), (b,) = tok.encode("a", add_special_tokens=False), tok.encode("b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    stream = detok._stream
    assert detok.add_token(a) == "a"
    assert detok.add_token(stray) == ""  # a lone continuation byte: U+FFFD, held for now
    assert detok._stream is stream
    assert detok.add_token(b) == "\ufffdb" and detok._stream is stream


def test_invalid_bytes_are_released_after_sixteen_tokens(tok):
    """A run of stray bytes is not held forever: after 16 held tokens it is emitted as U+FFFD,
    by both paths at the same step, and the text still equals the full decode."""
    stray = [i for i in _byte_ids(tok) if 0x80 <= tok.token_bytes(i)[0] < 0xC0]
    rng = random.Random(random.randrange(1 << 30))
    ids = [rng.choice(stray) for _ in range(40)]
    for rust in (True, False):
        detok = IncrementalDetokenizer(tok, [], rust_stream=rust)
        deltas = [detok.add_token(t) for t in ids]
        assert deltas[:16] == [""] * 16 and deltas[16], deltas
        assert "".join(deltas) + detok.flush() == tok.decode(ids)
    _run_twins(tok, ids, [], rng)


# ---- a sentencepiece-style tokenizer (byte fallback, a leading space the decoder strips) ---

_SP_PIECES = ["▁", "a", "b", "c", "d", "e", "é", "世", "▁a", "ab", "▁ab", "cd", "▁cd", "abc",
              "▁abc", "de", "ee", "▁e", "▁▁", "▁▁▁", ".", "▁."]


def _sentencepiece_tokenizer(clean_up_spaces: bool = False) -> Tokenizer:
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += [(p, -float(i)) for i, p in enumerate(_SP_PIECES)]
    backend = RustTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True),
                                AddedToken("<think>", special=True)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", clean_up_tokenization_spaces=clean_up_spaces)
    return Tokenizer(hf)


def _sp_stream(tok: Tokenizer, rng: random.Random) -> list[int]:
    if rng.random() < 0.5:
        text = "".join(rng.choice("abcde é€世🤗.") for _ in range(rng.randint(1, 30)))
        return tok.encode(text, add_special_tokens=False)
    return [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 50))]


def test_sentencepiece_rust_stream_equals_python_twin():
    tok = _sentencepiece_tokenizer()
    assert tok.decode(tok.encode("ab 世🤗", add_special_tokens=False)) == "ab 世🤗"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rust_steps = total = 0
    for _ in range(120):
        ids = _sp_stream(tok, rng)
        prompt = tok.encode("".join(rng.choice("abcd é") for _ in range(rng.randint(0, 5))),
                            add_special_tokens=False)
        rust_steps += _run_twins(tok, ids, prompt, rng, **_stop_kwargs(tok, ids, rng))
        total += len(ids)
    assert rust_steps > total // 3, (seed, rust_steps, total)


def test_tokenizer_with_cleanup_decodes_in_python_only():
    """transformers cleans this tokenizer's decodes up (" ." -> "."): the Rust decoder would
    not, so the detokenizer never uses it, and still agrees with its twin."""
    tok = _sentencepiece_tokenizer(clean_up_spaces=True)
    assert tok.decode(tok.encode("a .", add_special_tokens=False)) == "a."
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(20):
        ids = _sp_stream(tok, rng)
        detok = IncrementalDetokenizer(tok, [])
        assert detok._stream is None
        assert _run_twins(tok, ids, [], rng, **_stop_kwargs(tok, ids, rng)) == 0
