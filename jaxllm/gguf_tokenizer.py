"""Rebuild a `tokenizers.Tokenizer` from a GGUF file's metadata, without torch.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and
special ids as metadata (`tokenizer.ggml.*`). transformers can read those, but its GGUF reader
imports torch, so this module reads them with the `gguf` package and assembles the same
tokenizer itself. Supported `tokenizer.ggml.model` kinds: "gpt2" (byte-level BPE: SmolLM2,
Llama 3, Qwen2) and "llama" (sentencepiece-style BPE with byte fallback: Llama 2, Mistral).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

SUPPORTED_GGUF_TOKENIZER_KINDS = ("gpt2", "llama")

# llama.cpp token types (gguf TokenType): 3 = control (special), 4 = user defined, 6 = byte.
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits for byte-level vocabularies whose `tokenizer.ggml.pre` is not GPT-2's.
# These are the published split patterns of the Llama 3 and Qwen2 tokenizers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
# `pre` names known to use plain GPT-2 splitting (SmolLM2's digits are single tokens anyway).
_GPT2_SPLIT_PRES = {None, "default", "gpt2", "smollm", "starcoder", "refact", "gpt-2"}


@cache
def byte_encoder() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@cache
def byte_decoder() -> dict[str, int]:
    return {ch: b for b, ch in byte_encoder().items()}


@dataclass
class GGUFTokenizerSpec:
    """The tokenizer facts a GGUF file states, read with `gguf.GGUFReader`."""

    kind: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str] | None = None
    scores: list[float] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    add_space_prefix: bool = True
    chat_template: str | None = None
    extra_eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> GGUFTokenizerSpec:
        import gguf  # imported here: only GGUF loading needs it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the gguf package raises assorted errors on corrupt files
            raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
        meta = {name: _field_value(f) for name, f in reader.fields.items()
                if name.startswith("tokenizer.")}
        return cls.from_metadata(meta, source=str(path))

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str = "<metadata>") -> GGUFTokenizerSpec:
        def g(key: str, default: Any = None) -> Any:
            return meta.get(f"tokenizer.ggml.{key}", default)

        kind = g("model")
        if kind not in SUPPORTED_GGUF_TOKENIZER_KINDS:
            raise ValueError(
                f"{source}: GGUF tokenizer kind {kind!r} is not supported; supported kinds "
                f"(tokenizer.ggml.model): {', '.join(SUPPORTED_GGUF_TOKENIZER_KINDS)}"
            )
        tokens = g("tokens")
        if not tokens:
            raise ValueError(f"{source}: GGUF file has no tokenizer.ggml.tokens")
        token_types = list(g("token_type") or [1] * len(tokens))
        extra_eos = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                     if meta.get(k) is not None]
        return cls(
            kind=kind,
            pre=g("pre"),
            tokens=list(tokens),
            token_types=token_types,
            merges=list(g("merges")) if g("merges") is not None else None,
            scores=list(g("scores")) if g("scores") is not None else None,
            bos_token_id=_opt_int(g("bos_token_id")),
            eos_token_id=_opt_int(g("eos_token_id")),
            unk_token_id=_opt_int(g("unknown_token_id")),
            pad_token_id=_opt_int(g("padding_token_id")),
            # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
            add_bos_token=bool(g("add_bos_token", kind == "llama")),
            add_eos_token=bool(g("add_eos_token", False)),
            add_space_prefix=bool(g("add_space_prefix", True)),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_token_ids=extra_eos,
        )


def _field_value(f: Any) -> Any:
    """A GGUF metadata field as Python data; string arrays decoded fast."""
    import gguf

    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
    return f.contents()


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def build_gguf_tokenizer(spec: GGUFTokenizerSpec) -> BackendTokenizer:
    """A `tokenizers` tokenizer equivalent to the one llama.cpp / transformers read from a GGUF."""
    if spec.kind == "gpt2":
        backend, vocab_tokens = _byte_level_bpe(spec)
    else:
        backend, vocab_tokens = _sentencepiece_bpe(spec)
    _add_special_tokens(backend, spec, vocab_tokens)
    backend.post_processor = _post_processor(spec)
    return backend


def _byte_level_bpe(spec: GGUFTokenizerSpec) -> tuple[BackendTokenizer, list[str]]:
    alphabet = set(byte_encoder().values())
    spell = byte_encoder()
    # Tokens are normally stored already spelled in the byte alphabet; re-spell any that are not.
    tokens = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))
              for t in spec.tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if spec.merges is None:
        raise ValueError("byte-level (gpt2) GGUF tokenizer has no tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    split = _PRE_SPLITS.get(spec.pre)
    if split is None:
        if spec.pre not in _GPT2_SPLIT_PRES:
            logger.warning("unknown GGUF pre-tokenizer %r: splitting text the GPT-2 way", spec.pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def _sentencepiece_bpe(spec: GGUFTokenizerSpec) -> tuple[BackendTokenizer, list[str]]:
    tokens = spec.tokens
    vocab = {t: i for i, t in enumerate(tokens)}
    if spec.merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    elif spec.scores is not None:
        merges = merges_from_scores(tokens, spec.scores)
    else:
        raise ValueError("sentencepiece (llama) GGUF tokenizer has neither merges nor scores")
    unk = tokens[spec.unk_token_id] if spec.unk_token_id is not None else None
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                          fuse_unk=True, byte_fallback=True))
    prepend = "first" if spec.add_space_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend,
                                                     split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, tokens


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best-scored result first (ties: shorter left piece, then shorter right piece)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, int, int, str, str]] = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-score, len(left), len(right), vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _add_special_tokens(backend: BackendTokenizer, spec: GGUFTokenizerSpec, tokens: list[str]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so the
    text `<|im_start|>` encodes to its one id instead of being cut into pieces."""
    alphabet = set(byte_encoder().values()) if spec.kind == "gpt2" else None
    control, user = [], []
    for original, spelled, kind in zip(spec.tokens, tokens, spec.token_types, strict=True):
        if kind == _CONTROL:
            # A byte-level "control" token outside the byte alphabet is a llama.cpp mislabel.
            if alphabet is None or set(original) <= alphabet:
                control.append(AddedToken(spelled, normalized=False, special=True))
        elif kind == _USER_DEFINED:
            user.append(AddedToken(spelled, normalized=False, special=False))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _post_processor(spec: GGUFTokenizerSpec) -> processors.TemplateProcessing:
    """BOS/EOS added around encoded text as the file's add_bos/add_eos flags say."""
    specials, single, pair = [], ["$A:0"], ["$A:0", "$B:1"]
    if spec.add_bos_token and spec.bos_token_id is not None:
        bos = spec.tokens[spec.bos_token_id]
        specials.append((bos, spec.bos_token_id))
        single.insert(0, f"{bos}:0")
        pair.insert(0, f"{bos}:0")
        pair.insert(2, f"{bos}:1")
    if spec.add_eos_token and spec.eos_token_id is not None:
        eos = spec.tokens[spec.eos_token_id]
        if (eos, spec.eos_token_id) not in specials:
            specials.append((eos, spec.eos_token_id))
        single.append(f"{eos}:0")
        pair.insert(pair.index("$B:1"), f"{eos}:0")
        pair.append(f"{eos}:1")
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
