"""Host-side construction of `SamplingTensors`: the per-row parameter columns (cached while
the batch's rows keep their requests) and a stand-alone builder for tests and benchmarks."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import jax.numpy as jnp
import numpy as np

from jaxllm.sampling import SamplingTensors, request_key_data
from jaxllm.sampling_params import SamplingParams
from jaxllm.token_masks import all_allowed, constraint_arrays

# The per-row parameter columns of `SamplingTensors`, in the order of `_row_record`'s values.
_COLUMNS = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
            ("min_p", np.float32), ("presence_penalty", np.float32),
            ("frequency_penalty", np.float32), ("repetition_penalty", np.float32),
            ("greedy", bool), ("num_logprobs", np.int32), ("masked_logprobs", bool))
_NEUTRAL = SamplingParams(temperature=0.0)  # padding rows: greedy, neutral penalties


def _row_record(p: SamplingParams, vocab_size: int) -> tuple:
    """One row's column values (`_COLUMNS`' order), then its `RowKinds` flags (penalties,
    logit bias, token constraints, structured output)."""
    top_k = p.top_k_or_off
    return (p.temperature, top_k if top_k < vocab_size else 0, p.top_p, p.min_p,
            p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.greedy,
            -1 if p.logprobs is None else p.logprobs, p.has_structured_output,
            p.has_penalties, bool(p.logit_bias), p.has_token_constraints,
            p.has_structured_output)


def _columns_of(records: list[tuple]) -> dict[str, np.ndarray]:
    """Records -> the columns (transposed in C: one array per column)."""
    values = zip(*records, strict=True) if records else ((),) * len(_COLUMNS)
    return {name: np.array(column, dtype)
            for (name, dtype), column in zip(_COLUMNS, values, strict=False)}


def param_columns(params: Sequence[SamplingParams | None], rows: int,
                  vocab_size: int) -> dict[str, np.ndarray]:
    """The per-row parameter columns of `SamplingTensors` as host arrays; rows past the
    given params (and None entries) are padding: greedy with neutral penalties."""
    neutral = _row_record(_NEUTRAL, vocab_size)
    return _columns_of([_row_record(p, vocab_size) if p is not None else neutral
                        for p in params] + [neutral] * (rows - len(params)))


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
    """The last step's parameter columns, row kinds and key data, reused while every row
    holds the same request as then (most decode steps); rows are compared by identity (the
    cache keeps them alive, so an id is never reused while cached), and what it returns is
    shared, never written.

    When the batch changes (an admission, a finish: in serving, most steps at high
    concurrency), the host work is proportional to what changed: the previous batch's rows
    are kept as one matrix of their records (every value exact in float64), rows of known
    params are gathered from it in one indexing, and only new params are read."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._params: tuple[SamplingParams | None, ...] = ()
        self._rows = -1
        self._columns: dict[str, np.ndarray] = {}
        self._kinds = RowKinds.of(())
        # The last batch's records, row by row, and the row of each of its params, keyed by
        # identity (self._params keeps them alive, so no key is reused while it is here).
        self._neutral = np.array(_row_record(_NEUTRAL, vocab_size), np.float64)
        self._matrix = np.zeros((0, self._neutral.size), np.float64)
        self._row_of: dict[int, int] = {}
        self._keys: tuple[np.ndarray, ...] = ()
        self._key_data = np.zeros((0, 2), np.uint32)

    def _refresh(self, params: Sequence[SamplingParams | None], rows: int) -> None:
        if (rows == self._rows and len(params) == len(self._params)
                and all(map(operator.is_, params, self._params))):
            return
        n = len(params)
        # object.__hash__ is the identity hash (a bijection of the address) and, unlike id(),
        # raises no audit event: with an audit hook installed (filelock, which jax imports,
        # adds one) id() costs ~0.2 us more per call.
        ids = list(map(object.__hash__, params))
        at = np.fromiter(map(self._row_of.get, ids, repeat(-1)), np.intp, n)
        matrix = np.empty((max(rows, n), self._neutral.size), np.float64)
        matrix[n:] = self._neutral
        if len(self._matrix):
            matrix[:n] = self._matrix[at]  # (rows of new params are overwritten below)
        new = np.flatnonzero(at < 0).tolist()
        if new:
            matrix[new] = [_row_record(params[k] if params[k] is not None else _NEUTRAL,
                                       self.vocab_size) for k in new]
        self._params, self._rows = tuple(params), rows
        self._matrix, self._row_of = matrix[:n], dict(zip(ids, range(n), strict=True))
        self._columns = {name: matrix[:, j].astype(dtype)
                         for j, (name, dtype) in enumerate(_COLUMNS)}
        flags = matrix[:n, len(_COLUMNS):] != 0
        penalties, bias, constrained, grammar = flags.T
        self._kinds = RowKinds(penalties=bool(penalties.any()), logit_bias=bool(bias.any()),
                               constrained_rows=tuple(np.flatnonzero(constrained).tolist()),
                               grammar_rows=tuple(np.flatnonzero(grammar).tolist()))

    def columns(self, params: Sequence[SamplingParams | None], rows: int
                ) -> dict[str, np.ndarray]:
        self._refresh(params, rows)
        return self._columns

    def kinds(self, params: Sequence[SamplingParams], rows: int) -> RowKinds:
        self._refresh(params, rows)
        return self._kinds

    def key_data(self, keys: Sequence[np.ndarray], rows: int) -> np.ndarray:
        """uint32 [rows, 2]: the rows' PRNG key data (padding rows zero), reused while every
        row holds the same key array as in the last call (compared by identity, kept alive
        here; a request's key array is never written)."""
        if not (rows == self._key_data.shape[0] and len(keys) == len(self._keys)
                and all(map(operator.is_, keys, self._keys))):
            host = np.zeros((rows, 2), np.uint32)
            if keys:
                host[:len(keys)] = keys
            self._keys, self._key_data = tuple(keys), host
        return self._key_data
