"""Tokenizer: one wrapper over a Hugging Face fast tokenizer, loadable without torch.

`load_tokenizer(path)` accepts a Hugging Face model directory (or a jaxllm converted one: the
same `tokenizer.json` / `tokenizer_config.json` files) or a `.gguf` file. transformers' own
GGUF tokenizer path and `AutoTokenizer` import torch, which the server must not need, so a GGUF
tokenizer is rebuilt here from the file's metadata with the `tokenizers` library (see
`jaxllm.gguf_tokenizer`) and a directory is loaded with `PreTrainedTokenizerFast` directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

from jaxllm.gguf_tokenizer import GGUFTokenizerSpec, build_gguf_tokenizer, byte_decoder

logger = logging.getLogger(__name__)

Message = dict[str, Any]


class Tokenizer:
    """Text <-> token ids, chat templates and the per-token facts the engine and server need."""

    def __init__(self, hf: PreTrainedTokenizerFast, extra_eos_token_ids: Iterable[int] = ()):
        self.hf = hf
        self._extra_eos = {int(i) for i in extra_eos_token_ids}
        self._token_bytes_cache: dict[int, bytes] = {}

    # ---- vocabulary facts -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: the tokenizer's EOS plus the generation config's."""
        ids = set(self._extra_eos)
        if self.hf.eos_token_id is not None:
            ids.add(int(self.hf.eos_token_id))
        return ids

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        if isinstance(template, dict):  # named templates: the default one is what chat uses
            template = template.get("default")
        return template

    @cached_property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(self.hf.all_special_ids)

    # ---- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _rust_decoder(self):
        """(the Rust tokenizer's decode, the cleanup transformers applies after it or None)."""
        cleanup = self.hf.clean_up_tokenization if self.hf.clean_up_tokenization_spaces else None
        return self.hf.backend_tokenizer.decode, cleanup

    def decode_unchecked(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """`decode` for ids the engine produced (known valid) on the per-token path: the Rust
        tokenizer directly, ~5x cheaper than the transformers wrapper, same text."""
        decode, cleanup = self._rust_decoder
        text = decode(ids, skip_special_tokens=skip_special_tokens)
        return cleanup(text) if cleanup is not None else text

    def decode_stream(self, context_ids: Sequence[int], skip_special_tokens: bool
                      ) -> Callable[[int], str | None] | None:
        """The Rust tokenizer's incremental decoder (`tokenizers.decoders.DecodeStream`),
        primed with `context_ids`: each call takes the next id and returns the text it added
        (the decode of a window of recent ids, minus the window's decode before it), or None
        while that decode ends in an unfinished character or adds nothing. One call per token
        instead of two decodes. None where its text could differ from `decode_unchecked`'s
        (transformers cleans this tokenizer's decodes up afterwards)."""
        if self._rust_decoder[1] is not None:
            return None
        stream = DecodeStream(ids=[int(i) for i in context_ids],
                              skip_special_tokens=skip_special_tokens)
        return partial(stream.step, self.hf.backend_tokenizer)

    @cached_property
    def standalone_pieces(self) -> StandalonePieces | None:
        """token id -> the text the token adds after any text that ends in a whole character,
        whatever came before (None where that depends on context); None if this tokenizer's
        decodes have no such pieces. The detokenizer's per-token fast path: one dict lookup
        instead of a Rust decode. Only for a decoder that is byte-level alone (GPT-2, Llama 3,
        Qwen, SmolLM2) and no cleanup: there a token whose bytes are whole UTF-8 characters
        adds exactly them (a decode is its tokens' bytes, concatenated, then decoded)."""
        if self._rust_decoder[1] is not None or self._decoder_types != ["ByteLevel"]:
            return None
        return StandalonePieces(self._standalone_piece)

    def _standalone_piece(self, token_id: int) -> str | None:
        if (not 0 <= token_id < self.vocab_size or token_id in self._added_token_ids
                or token_id in self.all_special_ids):
            return None
        piece = self.hf.convert_ids_to_tokens(token_id)
        table = byte_decoder()
        if not piece or not all(ch in table for ch in piece):
            return None
        try:
            text = bytes(table[ch] for ch in piece).decode("utf-8")
        except UnicodeDecodeError:  # part of a character: the next bytes decide
            return None
        # (U+FFFD itself: the detokenizer's Python algorithm holds any text ending in it)
        return text if "\ufffd" not in text else None

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(self._checked_ids(ids)))

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes one token stands for (OpenAI logprobs `bytes`); may be a partial character."""
        cached = self._token_bytes_cache.get(token_id)
        if cached is None:
            cached = self._compute_token_bytes(int(token_id))
            self._token_bytes_cache[token_id] = cached
        return cached

    def _compute_token_bytes(self, token_id: int) -> bytes:
        self._checked_ids([token_id])
        piece = self.hf.convert_ids_to_tokens(token_id)
        if token_id in self._added_token_ids:
            return piece.encode("utf-8")
        if self._decoder_kind == "byte_level":
            table = byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        elif self._decoder_kind == "sentencepiece":
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.hf.decode([token_id]).encode("utf-8")

    @cached_property
    def _added_token_ids(self) -> frozenset[int]:
        return frozenset(self.hf.added_tokens_decoder)

    @cached_property
    def _decoder_types(self) -> list[str | None]:
        """The types of the decoder's steps (one unless it is a Sequence)."""
        decoder = json.loads(self.hf.backend_tokenizer.to_str()).get("decoder") or {}
        return [d.get("type") for d in decoder.get("decoders", [decoder])]

    @cached_property
    def _decoder_kind(self) -> str:
        """How token strings spell bytes: 'byte_level' (GPT-2), 'sentencepiece' or 'other'."""
        kinds = set(self._decoder_types)
        if "ByteLevel" in kinds:
            return "byte_level"
        if "ByteFallback" in kinds or "Metaspace" in kinds:
            return "sentencepiece"
        return "other"

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in ids]
        n = self.vocab_size
        for i in out:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")
        return out

    # ---- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on."""
        template = self.chat_template
        if template is None:
            raise ValueError(
                "this model's tokenizer has no chat template, so it cannot be used for chat; "
                "use plain completions or give the model a tokenizer_config.json chat_template"
            )
        if not isinstance(messages, Sequence) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return self.hf.apply_chat_template(
            list(messages),
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )

    def apply_chat_template_ids(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """`apply_chat_template`, tokenized. The template writes its own special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    # ---- persistence ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (chat template inside) + special tokens.

        The directory then loads with `load_tokenizer` and with transformers' `AutoTokenizer`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory), save_jinja_files=False)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        # A class AutoTokenizer resolves that loads tokenizer.json verbatim, whatever config.json says.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self._extra_eos:
            config["jaxllm_extra_eos_token_ids"] = sorted(self._extra_eos)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class StandalonePieces(dict):
    """`Tokenizer.standalone_pieces`: filled one id at a time, on its first lookup."""

    def __init__(self, piece: Callable[[int], str | None]) -> None:
        super().__init__()
        self._piece = piece

    def __missing__(self, token_id: int) -> str | None:
        piece = self[token_id] = self._piece(token_id)
        return piece


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a HF / jaxllm model directory or of a `.gguf` file (no torch)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        return _load_directory(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: neither a model directory nor a .gguf file")
    raise ValueError(f"{path} is neither a model directory nor a .gguf file")


def _load_directory(directory: Path) -> Tokenizer:
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(
            f"{directory} has no tokenizer.json; jaxllm loads fast (tokenizers) tokenizers only. "
            "Re-save the tokenizer with transformers (`tokenizer.save_pretrained`) to create it."
        )
    hf = PreTrainedTokenizerFast.from_pretrained(str(directory))
    extra = set(_generation_config_eos(directory))
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        extra.update(json.loads(config_path.read_text()).get("jaxllm_extra_eos_token_ids", []))
    return Tokenizer(hf, extra)


def _generation_config_eos(directory: Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]


def _load_gguf(path: Path) -> Tokenizer:
    spec = GGUFTokenizerSpec.from_file(path)
    backend = build_gguf_tokenizer(spec)

    def token(token_id: int | None) -> str | None:
        return spec.tokens[token_id] if token_id is not None else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token(spec.bos_token_id),
        eos_token=token(spec.eos_token_id),
        unk_token=token(spec.unk_token_id),
        pad_token=token(spec.pad_token_id),
        chat_template=spec.chat_template,
        add_bos_token=spec.add_bos_token,
        add_eos_token=spec.add_eos_token,
        clean_up_tokenization_spaces=False,
    )
    return Tokenizer(hf, spec.extra_eos_token_ids)
