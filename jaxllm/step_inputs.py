"""Per-step sampling tensors built from the scheduled rows' SamplingParams.

The penalty state ([rows, vocab] counts and prompt mask) is only built on the host when some
row of the step uses a penalty; otherwise one cached all-zero device array per row count is
reused, so the common case moves no vocab-sized data.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxllm.sampling import SamplingTensors
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import SchedulerOutput


def _uses_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


class SamplingTensorBuilder:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._zero_state: dict[int, tuple[jnp.ndarray, jnp.ndarray]] = {}

    def _zeros(self, rows: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        if rows not in self._zero_state:
            self._zero_state[rows] = (jnp.zeros((rows, self.vocab_size), jnp.int32),
                                      jnp.zeros((rows, self.vocab_size), bool))
        return self._zero_state[rows]

    def build(self, sched: SchedulerOutput, params: Sequence[SamplingParams],
              key_data: Sequence[np.ndarray], rows: int) -> SamplingTensors:
        """Tensors for the step's rows (row i = sched.seqs[i]); padding rows are greedy."""
        n = len(params)
        temperature = np.zeros(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        top_p = np.ones(rows, np.float32)
        min_p = np.zeros(rows, np.float32)
        presence = np.zeros(rows, np.float32)
        frequency = np.zeros(rows, np.float32)
        repetition = np.ones(rows, np.float32)
        greedy = np.ones(rows, bool)
        keys = np.zeros((rows, 2), np.uint32)
        step = np.zeros(rows, np.int32)
        num_logprobs = np.full(rows, -1, np.int32)
        for i, p in enumerate(params):
            temperature[i], top_p[i], min_p[i] = p.temperature, p.top_p, p.min_p
            k = p.top_k_or_off
            top_k[i] = k if k < self.vocab_size else 0
            presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
            repetition[i] = p.repetition_penalty
            greedy[i] = p.greedy
            keys[i] = key_data[i]
            step[i] = sched.seqs[i].request.num_output_tokens
            num_logprobs[i] = -1 if p.logprobs is None else p.logprobs
        if any(_uses_penalties(p) for p in params):
            counts = np.zeros((rows, self.vocab_size), np.int32)
            mask = np.zeros((rows, self.vocab_size), bool)
            for i in range(n):
                req = sched.seqs[i].request
                if req.output_token_ids:
                    np.add.at(counts[i], np.asarray(req.output_token_ids, np.int64), 1)
                mask[i, np.asarray(req.prompt_token_ids, np.int64)] = True
            state = (jnp.asarray(counts), jnp.asarray(mask))  # device, like the cached zeros
        else:
            state = self._zeros(rows)
        return SamplingTensors(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            presence_penalty=presence, frequency_penalty=frequency,
            repetition_penalty=repetition, greedy=greedy, key_data=keys, step=step,
            num_logprobs=num_logprobs, output_counts=state[0], prompt_mask=state[1])

    def dummy(self, rows: int) -> SamplingTensors:
        """All-greedy padding tensors for warm-up (host arrays, as `build` passes them: jit
        keys its cache on where inputs live, so warm-up must match the real steps)."""
        zeros = np.zeros(rows, np.float32)
        k0, m0 = self._zeros(rows)
        return SamplingTensors(
            temperature=zeros, top_k=np.zeros(rows, np.int32), top_p=np.ones(rows, np.float32),
            min_p=zeros, presence_penalty=zeros, frequency_penalty=zeros,
            repetition_penalty=np.ones(rows, np.float32), greedy=np.ones(rows, bool),
            key_data=np.zeros((rows, 2), np.uint32), step=np.zeros(rows, np.int32),
            num_logprobs=np.full(rows, -1, np.int32), output_counts=k0, prompt_mask=m0)
