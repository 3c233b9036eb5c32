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
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from transformers import PreTrainedTokenizerFast

from jaxllm.default_model import default_model_path
from jaxllm.detokenizer import _STALE, IncrementalDetokenizer
from jaxllm.gguf_tokenizer import byte_encoder
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
               **kwargs) -> tuple[int, int]:
    """Feed `ids` to the fast detokenizers (standalone pieces and the Rust decoder; the Rust
    decoder alone) and their twin (mostly one id per call, as the engine does, now and then
    several); assert they agree at every step. Returns how many steps the Rust decoder took
    part in (it existed before the step and still did after it; in the second one) and how
    many a standalone piece decided (in the first)."""
    fast = IncrementalDetokenizer(tok, prompt, **kwargs)
    rust = IncrementalDetokenizer(tok, prompt, standalone_pieces=False, **kwargs)
    twin = IncrementalDetokenizer(tok, prompt, rust_stream=False, **kwargs)
    assert twin._stream is None and rust._pieces is None
    rust_steps, piece_steps, i = 0, 0, 0
    while i < len(ids) and not twin.finished:
        stream = rust._stream
        if rng.random() < 0.92:
            got, want = [d.add_token(ids[i]) for d in (fast, rust)], twin.step([ids[i]])
            i += 1
            piece_steps += fast._stream is _STALE
        else:
            n = rng.randint(2, 4)
            got, want = [d.step(ids[i:i + n]) for d in (fast, rust)], twin.step(ids[i:i + n])
            i += n
        where = (ids[:i], prompt, kwargs)
        assert got == [want, want], where
        for d in (fast, rust):
            assert (d._prefix, d._read) == (twin._prefix, twin._read), where
            assert (d.stop_hit, d.finished) == (twin.stop_hit, twin.finished), where
        rust_steps += stream is not None and rust._stream is stream
    assert fast.flush() == rust.flush() == twin.flush()
    for d in (fast, rust):
        assert (d.text, d.stop_hit, d.token_ids) == (twin.text, twin.stop_hit, twin.token_ids)
    return rust_steps, piece_steps


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
    rust_steps = piece_steps = total = 0
    for _ in range(150):
        ids = _random_stream(tok, rng, bytes_)
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 6))]
        kwargs = _stop_kwargs(tok, ids, rng)
        rust, pieces = _run_twins(tok, ids, prompt, rng, **kwargs)
        rust_steps, piece_steps, total = rust_steps + rust, piece_steps + pieces, total + len(ids)
    # the fast paths did the work (pieces: most streams here are full of bytes and specials)
    assert rust_steps > total // 3 and piece_steps > total // 8, (seed, rust_steps, piece_steps,
                                                                  total)


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
    detok = IncrementalDetokenizer(tok, [], standalone_pieces=False)
    stream = detok._stream
    assert detok.add_token(a) == "a"
    assert detok.add_token(stray) == ""  # a lone continuation byte: U+FFFD, held for now
    assert detok._stream is stream
    assert detok.add_token(b) == "\ufffdb" and detok._stream is stream


def test_standalone_pieces_are_what_a_token_adds_after_any_text(tok):
    """Every piece the byte-level tokenizer gives equals the decode of the token after random
    contexts ending in a whole character (after a stray byte too); ids without one are
    partial characters, special or added tokens, or text with U+FFFD."""
    pieces = tok.standalone_pieces
    assert pieces is not None
    rng = random.Random(random.randrange(1 << 30))
    stray = [i for i in _byte_ids(tok) if 0x80 <= tok.token_bytes(i)[0] < 0xC0]
    ids = rng.sample(range(tok.vocab_size), 3000) + sorted(tok.all_special_ids) + _byte_ids(tok)
    with_piece = 0
    for t in ids:
        piece = pieces[t]
        if piece is None:
            data = tok.token_bytes(t)
            text = data.decode("utf-8", errors="replace")
            assert (t in tok.all_special_ids or "\ufffd" in text or not text
                    or t in tok.hf.added_tokens_decoder), (t, data)
            continue
        with_piece += 1
        for _ in range(2):
            context = tok.encode(_random_text(rng, rng.randint(1, 6)), add_special_tokens=False)
            context += rng.choice([[], [rng.choice(stray)], [rng.choice(sorted(tok.all_special_ids))]])
            for skip in (True, False):
                before = tok.decode(context, skip_special_tokens=skip)
                after = tok.decode(context + [t], skip_special_tokens=skip)
                assert after == before + piece, (context, t)
    assert with_piece > len(ids) // 2
    assert pieces[tok.vocab_size + 7] is None  # outside the vocabulary: the slow path's call


def test_a_piece_after_a_held_byte_waits_for_the_decoders(tok):
    """Text held back (a character in progress) is decided by the decoders; standalone pieces
    take over again once nothing is held."""
    (a,), (b,) = tok.encode("a", add_special_tokens=False), tok.encode("b", add_special_tokens=False)
    e_acute = tok.encode("é", add_special_tokens=False)
    assert len(e_acute) == 1 and tok.standalone_pieces[e_acute[0]] == "é"
    lead = next(i for i in _byte_ids(tok) if tok.token_bytes(i) == "é".encode()[:1])
    tail = next(i for i in _byte_ids(tok) if tok.token_bytes(i) == "é".encode()[1:])
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add_token(a) == "a" and detok._stream is _STALE
    assert detok.add_token(lead) == ""  # half a character: primed again, held
    assert detok._stream not in (None, _STALE)
    assert detok.add_token(tail) == "é"
    assert detok.add_token(b) == "b" and detok._stream is _STALE
    assert detok.text == "aéb"


def test_a_token_spelling_the_replacement_character_has_no_piece():
    """A byte-level token whose bytes are U+FFFD itself is held back by the decoders (text
    ending in U+FFFD may be a character in progress), so it has no standalone piece: the
    fast detokenizer still agrees with its twin at every step."""
    enc = byte_encoder()
    spell = lambda text: "".join(enc[b] for b in text.encode())  # noqa: E731
    vocab = {enc[b]: b for b in range(256)}
    merged = [spell("\ufffd"), spell(" a"), spell("é")]
    for piece in merged:
        vocab[piece] = len(vocab)
    backend = RustTokenizer(models.BPE(vocab, []))  # (ids are made here, never encoded)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend,
                                            clean_up_tokenization_spaces=False))
    replacement, space_a, e_acute = (vocab[p] for p in merged)
    assert tok.decode([replacement, space_a]) == "\ufffd a"
    pieces = tok.standalone_pieces
    assert pieces[replacement] is None and (pieces[space_a], pieces[e_acute]) == (" a", "é")
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(30):
        ids = [rng.choice([replacement, space_a, e_acute, rng.randrange(256)])
               for _ in range(rng.randint(1, 30))]
        _run_twins(tok, ids, [], rng, **_stop_kwargs(tok, ids, rng))


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
        rust, pieces = _run_twins(tok, ids, prompt, rng, **_stop_kwargs(tok, ids, rng))
        assert pieces == 0  # (the leading space a piece gets depends on what came before)
        rust_steps, total = rust_steps + rust, total + len(ids)
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
        assert _run_twins(tok, ids, [], rng, **_stop_kwargs(tok, ids, rng)) == (0, 0)
