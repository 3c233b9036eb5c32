"""Per-step sampling tensors built from the scheduled rows' SamplingParams.

The parameter columns come from `jaxllm.sampling_host.param_columns` (shared with
`build_sampling_tensors`) and are reused while every row holds the same request as in the
previous step (`ParamColumnCache`: host time per step in steady decoding). The penalty state
([rows, vocab] counts and prompt mask) is only built on the host when some row of the step uses
a penalty; otherwise one cached all-zero device array per row count is reused, so the common
case moves no vocab-sized data. The same holds for the logit bias ([rows, vocab], only when
some row has a logit_bias) and the packed allowed-token mask (only when some row is
constrained: min_tokens not reached, allowed_token_ids, bad_words, a grammar). A grammar row's
mask comes from its sequence's matcher (synced to the output first), ANDed with the row's other
constraints; the grammar's bits alone also go in `grammar_mask`, what that row's logprobs are
normalised over (the same device array as the allowed mask when no row has another constraint).
Everything else goes to jit as host arrays, as the real steps and warm-up both do (a device
copy costs ~20 us per array on the CPU backend, more than passing a small host array)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from jaxllm.sampling import SamplingTensors
from jaxllm.sampling_host import ParamColumnCache, param_columns
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import ScheduledSeq, SchedulerOutput
from jaxllm.token_masks import all_allowed, constraint_arrays

if TYPE_CHECKING:
    from jaxllm.structured.compiler import GrammarCompiler


class SamplingTensorBuilder:
    def __init__(self, vocab_size: int, grammars: GrammarCompiler | None = None) -> None:
        self.vocab_size = vocab_size
        self._columns = ParamColumnCache(vocab_size)
        self.grammars = grammars  # fills grammar rows' masks (None: no structured output)
        self._zero_state: dict[int, tuple[jnp.ndarray, jnp.ndarray]] = {}
        self._neutral: dict[int, tuple[jnp.ndarray, jnp.ndarray]] = {}

    def _zeros(self, rows: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        if rows not in self._zero_state:
            self._zero_state[rows] = (jnp.zeros((rows, self.vocab_size), jnp.int32),
                                      jnp.zeros((rows, self.vocab_size), bool))
        return self._zero_state[rows]

    def _unconstrained(self, rows: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Cached device (zero bias, all-ones mask) for steps where no row needs them."""
        if rows not in self._neutral:
            bias, allowed = constraint_arrays([], [], rows, self.vocab_size)
            self._neutral[rows] = (jnp.asarray(bias), jnp.asarray(allowed))
        return self._neutral[rows]

    def _constraints(self, sched: SchedulerOutput, params: Sequence[SamplingParams],
                     rows: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Bias, allowed mask and grammar mask of the step; cached neutral arrays when nobody
        needs them."""
        kinds = self._columns.kinds(params, rows)
        grammar_rows = list(kinds.grammar_rows)
        needed = kinds.logit_bias or any(_constrained(params[i], sched.seqs[i])
                                         for i in kinds.constrained_rows)
        if not needed and not grammar_rows:
            bias, allowed = self._unconstrained(rows)
            return bias, allowed, allowed
        state = [(seq.output_index, seq.request.output_token_ids, seq.request.eos_token_ids)
                 for seq in sched.seqs]
        if needed:
            bias, allowed = constraint_arrays(params, state, rows, self.vocab_size)
            bias = jnp.asarray(bias)
        else:  # only grammars: the cached zero bias, a fresh all-ones mask to fill
            bias, allowed = self._unconstrained(rows)[0], None
        if not grammar_rows:
            return bias, jnp.asarray(allowed), self._unconstrained(rows)[1]
        grammar = all_allowed(rows, self.vocab_size)
        self._fill_grammar_rows(sched, grammar_rows, grammar)
        grammar_dev = jnp.asarray(grammar)
        if allowed is None:
            return bias, grammar_dev, grammar_dev
        return bias, jnp.asarray(allowed & grammar), grammar_dev

    def _fill_grammar_rows(self, sched: SchedulerOutput, grammar_rows: list[int],
                           allowed: np.ndarray) -> None:
        """AND each grammar row's matcher mask into `allowed` (all ones: the grammar mask
        alone), the matcher first brought up to the output before the token the row samples."""
        if self.grammars is None:
            raise ValueError("a request has a grammar but the engine has no grammar compiler")
        matchers = []
        for i in grammar_rows:
            seq = sched.seqs[i]
            matcher = seq.request.grammar
            if matcher is None:
                raise ValueError(f"request {seq.request.request_id!r} asks for structured output "
                                 "but has no grammar matcher (admit it through the engine)")
            matcher.sync(seq.request.output_token_ids[:seq.output_index])
            matchers.append(matcher)
        self.grammars.fill_bitmasks(matchers, grammar_rows, allowed)

    def build(self, sched: SchedulerOutput, params: Sequence[SamplingParams],
              key_data: Sequence[np.ndarray], rows: int) -> SamplingTensors:
        """Tensors for the step's rows (row i = sched.seqs[i]); padding rows are greedy."""
        n = len(sched.seqs)
        keys = self._columns.key_data(key_data, rows)
        step = np.zeros(rows, np.int32)  # each row's sampled token's output index
        step[:n] = [seq.output_index for seq in sched.seqs]  # (look-ahead aware)
        if self._columns.kinds(params, rows).penalties:
            counts = np.zeros((rows, self.vocab_size), np.int32)
            mask = np.zeros((rows, self.vocab_size), bool)
            for i, seq in enumerate(sched.seqs):
                req = seq.request
                if req.output_token_ids:
                    np.add.at(counts[i], np.asarray(req.output_token_ids, np.int64), 1)
                mask[i, np.asarray(req.prompt_token_ids, np.int64)] = True
            state = (jnp.asarray(counts), jnp.asarray(mask))  # device, like the cached zeros
        else:
            state = self._zeros(rows)
        bias, allowed, grammar = self._constraints(sched, params, rows)
        return SamplingTensors(**self._columns.columns(params, rows), key_data=keys,
                               step=step, output_counts=state[0], prompt_mask=state[1],
                               logit_bias=bias, allowed_mask=allowed, grammar_mask=grammar)

    def dummy(self, rows: int) -> SamplingTensors:
        """All-greedy padding tensors for warm-up."""
        k0, m0 = self._zeros(rows)
        bias, allowed = self._unconstrained(rows)
        return SamplingTensors(**param_columns([], rows, self.vocab_size),
                               key_data=np.zeros((rows, 2), np.uint32),
                               step=np.zeros(rows, np.int32), output_counts=k0, prompt_mask=m0,
                               logit_bias=bias, allowed_mask=allowed, grammar_mask=allowed)


def _constrained(params: SamplingParams, seq: ScheduledSeq) -> bool:
    """Whether a row's mask can differ from all-ones at this step (min_tokens only matters
    until it is reached)."""
    return bool(params.allowed_token_ids or params.bad_words_token_ids
                or seq.output_index < params.min_tokens)
