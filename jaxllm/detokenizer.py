"""Incremental detokenization of one generated sequence, for streaming.

Two problems make "decode each new token and append" wrong:
- A character can be split across tokens (byte-level BPE and sentencepiece byte fallback emit
  UTF-8 bytes); decoding a partial character yields U+FFFD. Text is held back while the decoded
  window ends in U+FFFD and emitted once the character completes.
- A stop string can span tokens. Emitted text must never contain (part of) a stop string, so
  any tail of the text that could still grow into a stop string is held back until the next
  tokens confirm or refute it.

Cost per step is O(new tokens): only a small window of recent tokens is decoded (a prefix
offset giving the decoder context, a read offset marking what was already turned into text).
One token at a time, tokenizers' Rust incremental decoder does both decodes of that window in
one call; `_decode_new`, the Python algorithm and its reference twin, decides every step the
Rust decoder holds back, and the Rust decoder stays in use wherever both keep the same window.
Cheaper still, where nothing is held back a token with a standalone piece (byte-level
tokenizers: a token of whole UTF-8 characters, `Tokenizer.standalone_pieces`) adds that piece:
one dict lookup, and the Rust decoder is primed again only when a token needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxllm.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context before the first generated token (sentencepiece decoders
# strip a leading space from the first token of a decode; context keeps it).
_PROMPT_CONTEXT_TOKENS = 4
# An incomplete UTF-8 character is at most 3 bytes, so at most 3 tokens (more if skipped special
# tokens sit between them). A tail unresolved over more tokens than this is invalid bytes, emitted
# as U+FFFD rather than held forever.
_MAX_HELD_TOKENS = 16
# `_stream` while the Rust decoder would mirror the window but was skipped (standalone pieces
# moved the window past what it saw): a new one is primed when a token needs it.
_STALE = object()


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into safe-to-emit text deltas.

    The concatenation of every `step` result and `flush()` equals the decode of all generated
    ids (for byte-level tokenizers exactly `tokenizer.decode(ids)`; sentencepiece ones keep the
    space the prompt context implies), truncated at the first stop string (kept when
    `include_stop_str_in_output`); stop strings are only looked for once more than `min_tokens`
    tokens were generated (vLLM's rule), in the text not yet emitted.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        defer: bool = False,
        rust_stream: bool = True,
        standalone_pieces: bool = True,
    ):
        """`defer`: the caller reads the text only after `flush` (a request that is not
        streamed and has no stop strings): `step` only collects ids and `flush` decodes them
        at once, the same text for one decode instead of two per token.
        `rust_stream`: one token at a time, decode through the tokenizer's Rust incremental
        decoder while it yields exactly what `_decode_new` would (False: `_decode_new` only,
        its reference twin).
        `standalone_pieces`: with `rust_stream`, a token with a standalone piece adds it
        without a decode wherever nothing is held back (False: the Rust decoder decodes it)."""
        stops = list(stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        if defer and stops:
            raise ValueError("a detokenizer with stop strings must decode as tokens arrive")
        self._defer = defer
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = stops
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in stops), default=0)
        self._min_tokens = min_tokens  # stop strings are looked for only after this many tokens

        context = [int(i) for i in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []  # prompt ends mid-character: its bytes would garble the first delta
        self._ids: list[int] = context  # context + generated ids, the decode window's source
        self._num_context = len(context)
        self._prefix = 0  # start of the decode window (tokens giving context)
        self._read = len(context)  # tokens before this are already text

        # The Rust decoder mirrors the window (_prefix, _read, the ids after it); None once
        # the Python path moved the window where it did not, until that path has caught up.
        self._rust_stream = rust_stream and not defer
        self._stream = self._new_stream()
        # (only while `_stream` is not None, i.e. the window's text ends in a whole character)
        self._pieces = tokenizer.standalone_pieces if standalone_pieces else None

        self.text = ""  # everything emitted so far
        self.stop_hit: str | None = None
        self._pending = ""  # decoded text held back: it may be the start of a stop string
        self._finished = False

    @property
    def deferred(self) -> bool:
        """Text only at `flush` (see __init__)."""
        return self._defer

    @property
    def finished(self) -> bool:
        """True once a stop string was found or `flush` was called; later tokens are ignored."""
        return self._finished

    @property
    def token_ids(self) -> list[int]:
        """The generated ids seen so far (a copy)."""
        return self._ids[self._num_context:]

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Add generated ids; return the text that became safe to emit."""
        if len(new_token_ids) == 1:
            return self.add_token(int(new_token_ids[0]))
        if self._finished or not new_token_ids:
            return ""
        self._ids.extend(int(i) for i in new_token_ids)
        if self._defer:
            return ""
        self._stream = None  # it takes one id at a time: the Python path decides and catches up
        return self._step_python(None)

    def add_token(self, token: int) -> str:
        """`step([token])` for one Python int: the engine's per-step call, kept short."""
        if self._finished:
            return ""
        ids, stream = self._ids, self._stream  # (no stream when deferred)
        if stream is not None and self._read == len(ids) and self._pieces is not None:
            piece = self._pieces[token]  # nothing held back: a standalone piece is the text
            if piece is not None:
                ids.append(token)
                self._prefix, self._read = self._read, len(ids)
                self._stream = _STALE
                if self._stops:
                    return self._emit(piece, final=False)
                self.text += piece
                return piece
        ids.append(token)
        if stream is _STALE:  # the window ends in a whole character (it did when skipped)
            stream = self._stream = self._new_stream()
        if stream is not None:
            try:
                chunk = stream(token)
            except Exception:  # noqa: BLE001 (tokenizers raises its Rust errors as a bare
                # Exception; here: it refuses a decode that rewrote the window's text)
                chunk = stream = self._stream = None
            if chunk is not None:
                # Same window, same offsets as _decode_new: where the Rust decoder yields
                # text, it is the text _decode_new would emit (both take the window's decode
                # minus its decode before the token), and the offsets move as there.
                self._prefix, self._read = self._read, len(self._ids)
                if self._stops:
                    return self._emit(chunk, final=False)
                self.text += chunk
                return chunk
        if self._defer:
            return ""
        return self._step_python(stream)

    def _step_python(self, stream) -> str:
        """The Python algorithm decides the step (the Rust decoder held the token back, or
        there is none). Where it holds the token too, the window stays put and `stream`
        (the Rust decoder, which took the token) still mirrors it; where it moves the window,
        the Rust decoder is dropped and a new one starts once nothing is held back."""
        read = self._read
        text = self._decode_new(final=False)
        if stream is not None and self._read != read:
            stream = self._stream = None
        if stream is None and self._read == len(self._ids):
            self._stream = self._new_stream()
        return self._emit(text, final=False)

    def flush(self) -> str:
        """At finish: emit what was held back (an incomplete character, a false stop alarm)."""
        if self._finished:
            return ""
        delta = self._emit(self._decode_new(final=True), final=True)
        self._finished = True
        return delta

    # ---- bytes -> text ----------------------------------------------------------------------

    def _new_stream(self):
        """A Rust incremental decoder in the state (_prefix, _read) describes when no token
        is held back; None if the tokenizer has none, this detokenizer does not use it, or
        the window's text ends in U+FFFD (emitted invalid bytes: primed with such a window,
        the Rust decoder would repeat its text)."""
        if not self._rust_stream:
            return None
        window = self._ids[self._prefix:self._read]
        if window and self._decode(window).endswith(_REPLACEMENT):
            return None
        return self._tokenizer.decode_stream(window, self._skip_special)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode_unchecked(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens after the read offset that no later token can change."""
        ids, prefix, read = self._ids, self._prefix, self._read
        if read == len(ids):
            return ""
        full_text = self._decode(ids[prefix:])
        cut, text = len(ids), full_text
        if not final and full_text.endswith(_REPLACEMENT):
            # The tail may be a character in progress: emit up to the latest token boundary
            # that decodes cleanly, hold the rest.
            cut = read
            for j in range(len(ids) - 1, max(read, len(ids) - _MAX_HELD_TOKENS - 1), -1):
                candidate = self._decode(ids[prefix:j])
                if full_text.startswith(candidate) and _is_settled(candidate, full_text):
                    cut, text = j, candidate
                    break
            if cut == read and len(ids) - read > _MAX_HELD_TOKENS:
                cut, text = len(ids), full_text  # invalid bytes, not a character in progress
        if cut == read:
            return ""
        prefix_text = self._decode(ids[prefix:read])
        self._prefix, self._read = read, cut
        return text[len(prefix_text):]

    # ---- text -> emitted text (stop strings) ------------------------------------------------

    def _emit(self, new_text: str, final: bool) -> str:
        if not self._stops:  # nothing to look for or hold back
            self.text += new_text
            return new_text
        buf = self._pending + new_text
        if len(self._ids) - self._num_context <= self._min_tokens:
            # Before min_tokens no stop string ends the output (as vLLM): nothing is held back.
            self._pending = ""
            self.text += buf
            return buf
        hit = self._find_stop(buf)
        if hit is not None:
            start, stop = hit
            end = start + len(stop) if self._include_stop else start
            out = buf[:end]
            self._pending = ""
            self.stop_hit = stop
            self._finished = True
        else:
            keep = 0 if final else self._stop_prefix_len(buf)
            out, self._pending = buf[: len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def _find_stop(self, buf: str) -> tuple[int, str] | None:
        """Earliest stop string occurrence in buf (ties: the one listed first)."""
        best: tuple[int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_stop_len - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


def _is_settled(candidate: str, full_text: str) -> bool:
    """Whether `candidate` (a decode prefix of `full_text`) can no longer change.

    It can if it ends in U+FFFD from a character still in progress. A real character decoded
    after it in `full_text` proves that sequence ended (byte-level and byte-fallback decoders
    alike); U+FFFD alone proves nothing (byte fallback writes one per byte of a partial run).
    """
    if not candidate.endswith(_REPLACEMENT):
        return True
    return full_text[len(candidate):].strip(_REPLACEMENT) != ""
