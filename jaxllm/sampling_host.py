"""Host-side construction of `SamplingTensors`: the per-row parameter columns (cached while
the batch's rows keep their requests) and a stand-alone builder for tests and benchmarks."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxllm.sampling import SamplingTensors, request_key_data
from jaxllm.sampling_params import SamplingParams
from jaxllm.token_masks import all_allowed, constraint_arrays


def param_columns(params: Sequence[SamplingParams | None], rows: int,
                  vocab_size: int) -> dict[str, np.ndarray]:
    """The per-row parameter columns of `SamplingTensors` as host arrays; rows past the
    given params (and None entries) are padding: greedy with neutral penalties."""
    neutral = SamplingParams(temperature=0.0)
    full = [p if p is not None else neutral for p in params] + [neutral] * (rows - len(params))

    def col(fn, dtype):
        return np.array([fn(p) for p in full], dtype=dtype)

    return {
        "temperature": col(lambda p: p.temperature, np.float32),
        "top_k": col(lambda p: p.top_k_or_off if p.top_k_or_off < vocab_size else 0, np.int32),
        "top_p": col(lambda p: p.top_p, np.float32),
        "min_p": col(lambda p: p.min_p, np.float32),
        "presence_penalty": col(lambda p: p.presence_penalty, np.float32),
        "frequency_penalty": col(lambda p: p.frequency_penalty, np.float32),
        "repetition_penalty": col(lambda p: p.repetition_penalty, np.float32),
        "greedy": col(lambda p: p.greedy, bool),
        "num_logprobs": col(lambda p: -1 if p.logprobs is None else p.logprobs, np.int32),
        "masked_logprobs": col(lambda p: p.has_structured_output, bool),
    }


def build_sampling_tensors(
    params: Sequence[SamplingParams | None],
    *,
    vocab_size: int,
    key_data: np.ndarray | None = None,
    steps: Sequence[int] | None = None,
    num_rows: int | None = None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplingTensors:
    """Pack per-request params (None = padding row) into device arrays of `num_rows` rows.

    key_data: uint32 [len(params), 2] (default: from each request's seed, else zeros).
    prompt_token_ids / output_token_ids fill the penalty state densely on the host; a runner
    that samples every step keeps that state on device instead (`update_counts`).
    The allowed-token mask and bias come from each request's params, its output so far and
    step (default: the output length); eos_token_ids are what min_tokens hides. Grammars are
    not filled here (the engine's `SamplingTensorBuilder` does): grammar_mask is all ones.
    """
    n = len(params)
    rows = n if num_rows is None else num_rows
    if rows < n:
        raise ValueError(f"num_rows ({rows}) is smaller than the number of requests ({n})")
    keys = np.zeros((rows, 2), np.uint32)
    if key_data is not None:
        keys[:n] = np.asarray(key_data, np.uint32).reshape(n, 2)
    else:
        for i, p in enumerate(params):
            if p is not None and p.seed is not None:
                keys[i] = request_key_data(p.seed)
    step = np.zeros(rows, np.int32)
    if steps is not None:
        step[:n] = np.asarray(steps, np.int32)
    counts = np.zeros((rows, vocab_size), np.int32)
    mask = np.zeros((rows, vocab_size), bool)
    for i, toks in enumerate(output_token_ids or []):
        np.add.at(counts[i], np.asarray(toks, np.int64), 1)
    for i, toks in enumerate(prompt_token_ids or []):
        mask[i, np.asarray(toks, np.int64)] = True
    outputs = list(output_token_ids or [])
    outputs += [[]] * (n - len(outputs))
    positions = [int(step[i]) if steps is not None else len(outputs[i]) for i in range(n)]
    bias, allowed = constraint_arrays(
        params, [(positions[i], outputs[i], eos_token_ids) for i in range(n)], rows, vocab_size)
    columns = {k: jnp.asarray(v) for k, v in param_columns(params, rows, vocab_size).items()}
    return SamplingTensors(**columns, key_data=jnp.asarray(keys), step=jnp.asarray(step),
                           output_counts=jnp.asarray(counts), prompt_mask=jnp.asarray(mask),
                           logit_bias=jnp.asarray(bias), allowed_mask=jnp.asarray(allowed),
                           grammar_mask=jnp.asarray(all_allowed(rows, vocab_size)))


@dataclass(frozen=True)
class RowKinds:
    """Which rows of a step need more than the parameter columns (from their params alone)."""

    penalties: bool  # some row has a presence / frequency / repetition penalty
    logit_bias: bool  # some row has a logit_bias
    constrained_rows: tuple[int, ...]  # rows with min_tokens, allowed_token_ids or bad words
    grammar_rows: tuple[int, ...]  # rows with structured output

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> RowKinds:
        return cls(penalties=any(p.has_penalties for p in params),
                   logit_bias=any(bool(p.logit_bias) for p in params),
                   constrained_rows=tuple(i for i, p in enumerate(params)
                                          if p.has_token_constraints),
                   grammar_rows=tuple(i for i, p in enumerate(params)
                                      if p.has_structured_output))


class ParamColumnCache:
    """The last step's parameter columns and row kinds, reused while every row holds the
    same request's params as then (most decode steps): building them is a Python pass over
    every row per column, per step. Rows are compared by identity (the cache keeps the params
    alive, so an id is never reused while cached); the columns are shared, never written.
    They are kept as device arrays: a step then hands the sampler no per-row host column to
    copy (each host array is a transfer per call)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._params: tuple[SamplingParams | None, ...] = ()
        self._rows = -1
        self._columns: dict[str, jnp.ndarray] = {}
        self._kinds = RowKinds.of(())
        self._keys: tuple[np.ndarray, ...] = ()
        self._keys_rows = -1
        self._key_data: jnp.ndarray | None = None

    def _refresh(self, params: Sequence[SamplingParams | None], rows: int) -> None:
        if (rows == self._rows and len(params) == len(self._params)
                and all(map(operator.is_, params, self._params))):
            return
        self._params, self._rows = tuple(params), rows
        self._columns = {k: jnp.asarray(v)
                         for k, v in param_columns(params, rows, self.vocab_size).items()}
        self._kinds = RowKinds.of(params)

    def columns(self, params: Sequence[SamplingParams | None], rows: int
                ) -> dict[str, jnp.ndarray]:
        self._refresh(params, rows)
        return self._columns

    def kinds(self, params: Sequence[SamplingParams], rows: int) -> RowKinds:
        self._refresh(params, rows)
        return self._kinds

    def key_data(self, keys: Sequence[np.ndarray], rows: int) -> jnp.ndarray:
        """uint32 [rows, 2]: the rows' PRNG key data (padding rows zero), reused while every
        row holds the same key array as in the last call (compared by identity, kept alive
        here); the arrays are never written after a request is made."""
        if not (rows == self._keys_rows and len(keys) == len(self._keys)
                and all(map(operator.is_, keys, self._keys))):
            host = np.zeros((rows, 2), np.uint32)
            if keys:
                host[:len(keys)] = keys
            self._keys, self._keys_rows = tuple(keys), rows
            self._key_data = jnp.asarray(host)
        return self._key_data
