"""Turns one scheduled step into device calls: one jitted function per bucket shape.

embed -> layers (ragged paged attention, fused cache write, cache donated) -> final norm ->
logits for the rows that sample -> on-device sampler. Every shape the scheduler can ask for is
compiled during warm-up; afterwards any new compilation is logged as an error and counted.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxllm.buckets import Bucket
from jaxllm.kernels import AttentionMetadata, ragged_paged_attention_from_metadata
from jaxllm.models.llama import LlamaModel
from jaxllm.sampling import SamplingTensors, sample

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Host copies of what one step sampled, one row per scheduled sequence."""

    token_ids: np.ndarray  # [S]
    logprobs: np.ndarray  # [S] raw log-probability of the chosen token
    ranks: np.ndarray  # [S]
    top_ids: np.ndarray  # [S, K]
    top_logprobs: np.ndarray  # [S, K]


def _blank_step_arrays(b: Bucket) -> dict[str, np.ndarray]:
    """A step of bucket b's shapes with no sequences: what warm-up traces and runs."""
    return {
        "input_ids": np.zeros(b.num_tokens, np.int32),
        "positions": np.zeros(b.num_tokens, np.int32),
        "kv_lens": np.zeros(b.num_seqs, np.int32),
        "page_indices": np.zeros((b.num_seqs, b.pages_per_seq), np.int32),
        "cu_q_lens": np.zeros(b.num_seqs + 1, np.int32),
        "num_seqs": np.zeros(1, np.int32),
        "logits_indices": np.zeros(b.num_seqs, np.int32),
    }


def _metadata(arrays: dict[str, np.ndarray]) -> AttentionMetadata:
    return AttentionMetadata(kv_lens=arrays["kv_lens"], page_indices=arrays["page_indices"],
                             cu_q_lens=arrays["cu_q_lens"], num_seqs=arrays["num_seqs"])


def _attention(impl: str | None):
    return functools.partial(ragged_paged_attention_from_metadata, impl=impl)


class ModelRunner:
    """Owns the model state and the KV caches on device; runs bucketed steps."""

    def __init__(self, model: LlamaModel, kv_caches: list[jax.Array], *,
                 attention_impl: str | None = None, max_logprobs: int = 20,
                 attention_wrapper=None) -> None:
        self.graphdef, state = nnx.split(model)
        # The jitted programs take the state as a flat list of arrays: flattening an nnx.State
        # runs Python per variable (~1 ms per call for this model's 273), a list is flattened
        # in C++, and a lone decode step is ~18 ms.
        self.state_leaves, self._state_treedef = jax.tree.flatten(state)
        self.config = model.config
        self.kv_caches = kv_caches
        self.max_logprobs = max_logprobs
        attn = _attention(attention_impl)
        self.attention_fn = attention_wrapper(attn) if attention_wrapper is not None else attn
        self._step_fn = jax.jit(self._step, donate_argnums=(1,))
        # The sampler is its own program, compiled once per row count rather than once per
        # (tokens, seqs, pages) bucket: compile time is what users wait for at start-up.
        self._sample_fn = jax.jit(functools.partial(sample, max_logprobs=max_logprobs))
        self._prompt_logprobs_fn = jax.jit(self._prompt_logprobs)
        self.warm_compiles: int | None = None  # programs compiled by warm-up
        self.recompiles = 0
        self._warm_steps: set[tuple[int, int, int]] = set()  # (tokens, seqs, pages) warmed
        self._warm_sample_rows: set[int] = set()
        self._warm_prompt_rows: set[int] = set()
        self._first_calls: set[tuple[str, object]] = set()

    # -- jitted bodies -------------------------------------------------------------------
    @property
    def state(self) -> nnx.State:
        """The model's state (parameters as placed on the devices), for inspection."""
        return jax.tree.unflatten(self._state_treedef, self.state_leaves)

    def _model(self, state_leaves) -> LlamaModel:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._state_treedef, state_leaves))

    def _step(self, state_leaves, kv_caches, input_ids, positions, md, logits_indices):
        model = self._model(state_leaves)
        hidden, kv_caches = model(input_ids, positions, kv_caches, md, self.attention_fn)
        logits = model.compute_logits(hidden[logits_indices])
        return logits, kv_caches, hidden

    def _prompt_logprobs(self, state_leaves, hidden, rows, targets):
        """Log-probabilities of `targets` and the top-k after hidden states `hidden[rows]`."""
        model = self._model(state_leaves)
        logp = jax.nn.log_softmax(model.compute_logits(hidden[rows]), axis=-1)
        chosen = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        rank = 1 + jnp.sum(logp > chosen[:, None], axis=-1)
        top_vals, top_ids = jax.lax.top_k(logp, self.max_logprobs)
        return chosen, rank, top_ids, top_vals

    # -- host API ------------------------------------------------------------------------
    def execute(self, arrays: dict[str, np.ndarray], tensors: SamplingTensors):
        """Dispatch one step (asynchronously); returns device outputs and hidden states.

        Host arrays go to jit as numpy: its C++ dispatch moves them in one go, measurably
        cheaper than a jnp.asarray per array (the host gap between steps)."""
        step_before = self._step_fn._cache_size()
        sample_before = self._sample_fn._cache_size()
        logits, self.kv_caches, hidden = self._step_fn(
            self.state_leaves, self.kv_caches, arrays["input_ids"], arrays["positions"],
            _metadata(arrays), arrays["logits_indices"])
        out = self._sample_fn(logits, tensors)
        t, s = arrays["input_ids"].shape[0], arrays["logits_indices"].shape[0]
        self._note_compiles(step_before, self._step_fn._cache_size(), "step",
                            (t, s, arrays["page_indices"].shape[1]), self._warm_steps)
        self._note_compiles(sample_before, self._sample_fn._cache_size(), "sampler", s,
                            self._warm_sample_rows)
        return out, hidden

    @staticmethod
    def fetch(out) -> StepResult:
        """Block on a step's sampler output and copy it to the host."""
        out = jax.device_get(out)
        return StepResult(np.asarray(out.token_ids), np.asarray(out.logprobs), np.asarray(out.ranks),
                          np.asarray(out.top_logprob_ids), np.asarray(out.top_logprobs))

    def prompt_logprobs(self, hidden: jax.Array, rows: np.ndarray, targets: np.ndarray):
        """Prompt logprobs for given token rows of the last step (rows padded to hidden's T)."""
        t = hidden.shape[0]
        n = len(rows)
        pr = np.zeros(t, np.int32)
        pt = np.zeros(t, np.int32)
        pr[:n], pt[:n] = rows, targets
        before = self._prompt_logprobs_fn._cache_size()
        res = self._prompt_logprobs_fn(self.state_leaves, hidden, jnp.asarray(pr), jnp.asarray(pt))
        self._note_compiles(before, self._prompt_logprobs_fn._cache_size(), "prompt_logprobs", t,
                            self._warm_prompt_rows)
        chosen, rank, ids, vals = (np.asarray(x)[:n] for x in jax.device_get(res))
        return chosen, rank, ids, vals

    def warm_up(self, buckets: Iterable[Bucket], dummy_tensors, *, compile_threads: int = 2
                ) -> float:
        """Compile every bucket's step, sampler and prompt-logprobs programs ahead of time;
        returns seconds taken.

        Programs are traced and lowered here, then compiled on `compile_threads` threads (XLA
        releases the GIL while compiling), without running them: executing a dummy step of
        the widest buckets took seconds each. The executables land in JAX's in-memory cache
        (and the persistent one, when enabled), so a step's first real call only re-traces.
        """
        start = time.perf_counter()
        buckets = list(buckets)
        lowered = []
        for b in tqdm(buckets, desc="tracing step buckets", unit="shape"):
            step = self._trace_step(b).lower()
            logits, _, hidden = step.out_info
            lowered.append(step)
            if b.num_seqs not in self._warm_sample_rows:
                self._warm_sample_rows.add(b.num_seqs)
                lowered.append(self._sample_fn.trace(logits, dummy_tensors(b.num_seqs)).lower())
            if b.num_tokens not in self._warm_prompt_rows:
                self._warm_prompt_rows.add(b.num_tokens)
                rows = jax.ShapeDtypeStruct((b.num_tokens,), jnp.int32)
                lowered.append(self._prompt_logprobs_fn.trace(self.state_leaves, hidden, rows, rows).lower())
            self._warm_steps.add((b.num_tokens, b.num_seqs, b.pages_per_seq))
        with ThreadPoolExecutor(max(1, compile_threads)) as pool:
            list(tqdm(pool.map(lambda low: low.compile(), lowered), total=len(lowered),
                      desc="compiling step buckets", unit="program"))
        self.warm_compiles = len(lowered)
        return time.perf_counter() - start

    def warm_up_by_running(self, buckets: Iterable[Bucket], dummy_tensors) -> float:
        """Compile every bucket by executing a dummy step through `execute`: for runners
        whose execute does more than run the step (multi-host leaders broadcast it, so the
        followers compile in lockstep)."""
        start = time.perf_counter()
        for b in tqdm(list(buckets), desc="compiling step buckets", unit="shape"):
            arrays = _blank_step_arrays(b)
            out, hidden = self.execute(arrays, dummy_tensors(b.num_seqs))
            jax.block_until_ready(out)
            self.prompt_logprobs(hidden, np.zeros(1, np.int32), np.zeros(1, np.int32))
        self.warm_compiles = self._jit_cache_entries()
        return time.perf_counter() - start

    def _trace_step(self, b: Bucket):
        arrays = _blank_step_arrays(b)
        return self._step_fn.trace(self.state_leaves, self.kv_caches, arrays["input_ids"],
                                   arrays["positions"], _metadata(arrays), arrays["logits_indices"])

    @property
    def compile_count(self) -> int:
        """Programs compiled so far: by warm-up, and after it (recompiles)."""
        return (self.warm_compiles or 0) + self.recompiles

    def _jit_cache_entries(self) -> int:
        return (self._step_fn._cache_size() + self._sample_fn._cache_size()
                + self._prompt_logprobs_fn._cache_size())

    def _note_compiles(self, before: int, after: int, what: str, key, warmed: set) -> None:
        """Count jit cache entries added after warm-up, except the one entry a warmed shape
        adds on its first call (its executable comes from warm-up's compile)."""
        if after <= before or self.warm_compiles is None:
            return
        added = after - before
        if key in warmed and (what, key) not in self._first_calls:
            self._first_calls.add((what, key))
            added -= 1
        if added > 0:
            self.recompiles += added
            logger.error("recompiled %s for shape %s after warm-up (%d so far)", what, key,
                         self.recompiles)

    def drop_kv_caches(self) -> list[tuple[tuple[int, ...], jnp.dtype, object]]:
        """Free the KV cache arrays (sleep); returns what is needed to re-create them."""
        specs = [(c.shape, c.dtype, c.sharding) for c in self.kv_caches]
        for c in self.kv_caches:
            c.delete()
        self.kv_caches = []
        return specs

    def restore_kv_caches(self, specs) -> None:
        self.kv_caches = [jax.device_put(jnp.zeros(s, d), sh) for s, d, sh in specs]
