"""Spec -> validated llguidance grammar -> one matcher per sequence, through a bounded LRU
cache of compiled grammars keyed by the spec's canonical text.

llguidance compiles lazily (the lexer and parser tables grow as tokens are consumed), so what
the cache keeps is a validated matcher in its start state; a sequence gets a deep copy of it,
which skips parsing and validating the spec again. A bad spec is a ValueError naming the
problem, raised before the request is queued.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import numpy as np

from jaxllm.structured.matcher import GrammarMatcher
from jaxllm.structured.spec import StructuredOutputsParams

# JSON output the way people write it ('{"a": 1, "b": 2}'): fixed separators, no free
# whitespace, which a small model could otherwise fill forever. A schema's own "x-guidance"
# options override these.
JSON_COMPILE_DEFAULTS = {"item_separator": ", ", "key_separator": ": ",
                         "whitespace_flexible": False}
DEFAULT_CACHE_SIZE = 256


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar definition of a spec (not validated yet)."""
    kind = spec.kind
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(spec.json), defaults=JSON_COMPILE_DEFAULTS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                '{"type": "object"}', defaults=JSON_COMPILE_DEFAULTS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", list(spec.choice))
        return llguidance.grammar_from("grammar", spec.grammar)
    except ValueError as e:
        raise ValueError(f"invalid structured output {_NAMES[kind]}: {e}") from None


_NAMES = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex",
          "choice": "choice", "grammar": "grammar"}


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class GrammarCompiler:
    """Compiles specs for one tokenizer; `matcher(spec)` is what a new sequence gets.

    `tokenizer_factory` builds the llguidance tokenizer (about a second). With
    `build_in_background` (the default) that starts on a worker thread at construction, so the
    engine's first structured request finds it ready instead of stalling the engine thread;
    otherwise on first use. Either way a factory error is raised at first use.
    """

    def __init__(self, tokenizer_factory: Callable[[], llguidance.LLTokenizer],
                 cache_size: int = DEFAULT_CACHE_SIZE, *,
                 build_in_background: bool = True) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._factory = tokenizer_factory
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._pending: Future[llguidance.LLTokenizer] | None = None
        if build_in_background:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llg-tokenizer")
            self._pending = pool.submit(tokenizer_factory)
            pool.shutdown(wait=False)  # the worker exits once the build is done
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.cache_size = cache_size
        self.stats = CacheStats()
        self._executor: llguidance.LLExecutor | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """The llguidance tokenizer; waits for the background build if it is still running."""
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    pending, self._pending = self._pending, None
                    # a failed background build is retried here, so its error (if it fails
                    # again) is raised with this caller's traceback, as without a background
                    self._tokenizer = (pending.result() if pending is not None
                                       and pending.exception() is None else self._factory())
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The cached start-state matcher of `spec` (compiled and validated on a miss)."""
        key = spec.cache_key
        template = self._cache.get(key)
        if template is not None:
            self.stats.hits += 1
            self._cache.move_to_end(key)
            return template
        self.stats.misses += 1
        template = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
        if template.is_error():
            raise ValueError(f"invalid structured output {_NAMES[spec.kind]}: "
                             f"{_first_lines(template.get_error())}")
        self._cache[key] = template
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return template

    def matchers(self, spec: StructuredOutputsParams, count: int) -> list[GrammarMatcher]:
        """`count` independent matchers in the start state (one per sample of a request)."""
        template = self.compile(spec)
        return [GrammarMatcher(template.deep_copy()) for _ in range(count)]

    def __len__(self) -> int:
        return len(self._cache)

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], rows: Sequence[int],
                      allowed: np.ndarray) -> None:
        """AND each matcher's allowed next tokens into `allowed[rows[i]]` (int32 [R, W] in
        the model's vocabulary; words past the tokenizer's vocabulary are cleared)."""
        if not matchers:
            return
        words = -(-self.vocab_size // 32)
        scratch = np.zeros((len(matchers), words), np.int32)
        if len(matchers) == 1:
            matchers[0].fill_bitmask(scratch, 0)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(
                [(m.llmatcher, i) for i, m in enumerate(matchers)],
                scratch.ctypes.data, words * 4, len(matchers))
        shared = min(words, allowed.shape[1])
        for i, row in enumerate(rows):
            allowed[row, :shared] &= scratch[i, :shared]
            allowed[row, shared:] = 0


def _first_lines(message: str, count: int = 6) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:count])


def grammar_accepts(compiler: GrammarCompiler, spec: StructuredOutputsParams,
                    token_ids: Iterable[int]) -> bool:
    """Whether the whole token sequence is a complete match of `spec` (llguidance's own
    check, independent of `GrammarMatcher`'s lazy bookkeeping)."""
    matcher = compiler.compile(spec).deep_copy()
    ids = [int(t) for t in token_ids]
    return matcher.validate_tokens(ids) == len(ids) and (
        matcher.consume_tokens(ids) and matcher.is_accepting())
