"""Per-request sampling settings, named and defaulted as vLLM's `SamplingParams`.

Validation happens here, at admission, so a bad value is a clear ValueError (HTTP 400)
and never reaches the device.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from jaxllm.structured.spec import StructuredOutputsParams

# Most alternatives a request may ask for per position (logprobs / prompt_logprobs).
MAX_LOGPROBS = 20
# logit_bias values are clamped to this range by OpenAI's contract (-100 bans, +100 forces).
MAX_LOGIT_BIAS = 100.0
# Below this temperature a request is treated as greedy: dividing logits by it would overflow
# the useful float32 range and the distribution is one-hot in all but name.
GREEDY_TEMPERATURE = 1e-5


class RequestOutputKind(enum.IntEnum):
    """What each output of a request carries (vLLM's values).

    CUMULATIVE: every output holds everything so far (text, token ids, logprobs).
    DELTA: only what is new since the previous output; concatenating a request's outputs
    gives the cumulative one (cumulative_logprob and metrics stay cumulative). Streams of long
    outputs stop copying their whole history every step.
    FINAL_ONLY: one output, at the finish (what `LLM.generate` and non-streaming HTTP requests
    read); no per-step output objects, and text without stop strings is decoded once.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to pick each output token of one request and when to stop.

    top_k: 0 or -1 disable it. max_tokens None means "up to the model length".
    stop is normalised to a list of strings, stop_token_ids to a list of ints.
    logprobs / prompt_logprobs: number of top alternatives per position (0 = only the chosen
    token), None = not returned.
    logit_bias: token id -> additive bias on the raw logits. allowed_token_ids: the only tokens
    that may be sampled. bad_words: strings never generated; the caller that has the tokenizer
    fills bad_words_token_ids (`resolve_bad_words`), which is what the sampler reads.
    structured_outputs: the output must match a JSON schema / JSON object / regex / choice /
    grammar (`StructuredOutputsParams`, or a dict of its fields); the older guided_json,
    guided_regex, guided_choice and guided_grammar set it the same way and read back as None.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self._check_output_kind()
        self._check_numbers()
        self._check_lengths()
        self._check_stops()
        self._check_logprobs()
        self._check_token_constraints()
        self._check_structured_outputs()

    # --- validation -------------------------------------------------------------------
    def _check_output_kind(self) -> None:
        kind = self.output_kind
        if isinstance(kind, bool) or not isinstance(kind, int) or kind not in (
                k.value for k in RequestOutputKind):
            raise ValueError("output_kind must be a RequestOutputKind (CUMULATIVE, DELTA or "
                             f"FINAL_ONLY), got {kind!r}")
        self.output_kind = RequestOutputKind(kind)

    def _check_numbers(self) -> None:
        _require_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if value != value:  # NaN
                raise ValueError(f"{name} must not be NaN")
            setattr(self, name, float(value))
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _require_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 1e6:
            raise ValueError(f"repetition_penalty must be greater than 0, got {self.repetition_penalty}")
        if self.seed is not None:
            _require_int("seed", self.seed)

    def _check_lengths(self) -> None:
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        _require_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop_list: list[str] = []
        elif isinstance(stop, str):
            stop_list = [stop]
        elif isinstance(stop, list | tuple):
            stop_list = list(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        for s in stop_list:
            if not isinstance(s, str):
                raise ValueError(f"stop strings must be strings, got {s!r}")
            if not s:
                raise ValueError("stop strings must not be empty")
        self.stop = stop_list
        ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        for t in ids:
            _require_int("stop_token_ids entry", t)
            if t < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {t}")
        self.stop_token_ids = ids

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            _require_int(name, value)
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    def _check_token_constraints(self) -> None:
        if self.logit_bias is not None:
            bias: dict[int, float] = {}
            for token, value in dict(self.logit_bias).items():
                token = int(token) if isinstance(token, str) and token.isdigit() else token
                _require_int("logit_bias key", token)
                if token < 0:
                    raise ValueError(f"logit_bias token ids must be non-negative, got {token}")
                if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                    raise ValueError(f"logit_bias values must be numbers, got {value!r}")
                if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
                bias[token] = float(value)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            ids = list(self.allowed_token_ids)
            if not ids:
                raise ValueError("allowed_token_ids must not be empty")
            for t in ids:
                _require_int("allowed_token_ids entry", t)
                if t < 0:
                    raise ValueError(f"allowed_token_ids must be non-negative, got {t}")
            self.allowed_token_ids = ids
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
            for w in words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"bad_words must be non-empty strings, got {w!r}")
            self.bad_words = words or None
        if self.bad_words_token_ids is not None:
            seqs = [list(w) for w in self.bad_words_token_ids]
            for w in seqs:
                if not w:
                    raise ValueError("bad_words_token_ids entries must not be empty")
                for t in w:
                    _require_int("bad_words_token_ids entry", t)
            self.bad_words_token_ids = seqs or None

    def _check_structured_outputs(self) -> None:
        spec = StructuredOutputsParams.coerce(self.structured_outputs)
        guided = StructuredOutputsParams.from_guided(
            guided_json=self.guided_json, guided_regex=self.guided_regex,
            guided_choice=self.guided_choice, guided_grammar=self.guided_grammar)
        if spec is not None and guided is not None:
            raise ValueError("set structured_outputs or a guided_* field, not both")
        self.structured_outputs = spec or guided
        self.guided_json = self.guided_regex = self.guided_choice = self.guided_grammar = None

    # --- derived ----------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """True when the output is the argmax: temperature ~0 or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def top_k_or_off(self) -> int:
        """top_k with both disable spellings (0, -1) mapped to 0."""
        return max(self.top_k, 0)

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def has_token_constraints(self) -> bool:
        """Whether the sampler's allowed-token mask may differ from all-ones for this request."""
        return bool(self.min_tokens or self.allowed_token_ids or self.bad_words_token_ids)

    @property
    def has_structured_output(self) -> bool:
        return self.structured_outputs is not None

    def resolve_bad_words(self, encode: Callable[[str], list[int]]) -> SamplingParams:
        """A copy with bad_words_token_ids filled from bad_words (as vLLM tokenizes them):
        each word as written and, when it tokenizes to as many tokens with a different first
        token, with a leading space (the word in the middle of a sentence)."""
        if not self.bad_words:
            return self
        seqs = [list(w) for w in self.bad_words_token_ids or []]
        for word in self.bad_words:
            plain = list(encode(word.lstrip()))
            spaced = list(encode(" " + word.lstrip()))
            if plain:
                seqs.append(plain)
            if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
                seqs.append(spaced)
        return self.clone(bad_words_token_ids=seqs)

    def clone(self, **changes: Any) -> SamplingParams:
        """A validated copy with some fields changed."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs.update(changes)
        return SamplingParams(**kwargs)

    @classmethod
    def from_generation_config(cls, config: dict[str, Any] | None,
                               **overrides: Any) -> SamplingParams:
        """Defaults from a model's `generation_config.json` (as vLLM does), then `overrides`.

        Only the sampling knobs are taken (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens -> max_tokens); `do_sample` is ignored, as in vLLM.
        """
        config = config or {}
        taken: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if config.get(key) is not None:
                taken[key] = config[key]
        if config.get("max_new_tokens") is not None:
            taken["max_tokens"] = config["max_new_tokens"]
        if "top_k" in taken:
            taken["top_k"] = int(taken["top_k"])
        taken.update(overrides)
        return cls(**taken)


def _require_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


__all__ = ["MAX_LOGPROBS", "MAX_LOGIT_BIAS", "GREEDY_TEMPERATURE", "RequestOutputKind",
           "SamplingParams", "StructuredOutputsParams"]
