"""Turns one scheduled step into device calls: one jitted program per bucket shape.

Two calls, so that features can slot in between them (grammar bitmasks, speculative
verification, the overlapped loop): `forward(StepInputs)` runs embed -> layers (ragged paged
attention, fused cache write, cache donated) -> final norm -> logits for the rows that sample;
`sample(logits, SamplingTensors)` runs the on-device sampler. Both dispatch asynchronously;
the host blocks only in `fetch`. Every shape the scheduler can ask for is compiled during
warm-up; afterwards any new compilation is logged as an error and counted.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxllm.buckets import Bucket
from jaxllm.executable_store import (
    ExecutableStore,
    compile_for_store,
    describe_inputs,
    environment_fingerprint,
    source_fingerprint,
)
from jaxllm.kernels import get_backend
from jaxllm.kernels.native_build import native_targets_used, register_native_target
from jaxllm.model_inputs import StepInputs
from jaxllm.models.base import CausalLM
from jaxllm.precision import with_matmul_precision
from jaxllm.sampling import SamplerOutput, SamplingTensors, sample
from jaxllm.spec import VerifyLayout, expand_sampling_tensors, rejection_sample
from jaxllm.spec.verify_layout import fits_in_logits

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Host copies of what one step sampled, one row per scheduled sequence; after a
    verification every field has one more axis, the emitted tokens ([S, K+1], -1 after)."""

    token_ids: np.ndarray  # [S]
    logprobs: np.ndarray  # [S] raw log-probability of the chosen token
    ranks: np.ndarray  # [S]
    top_ids: np.ndarray  # [S, L]
    top_logprobs: np.ndarray  # [S, L]

    def position(self, row: int, i: int) -> tuple[float, int, np.ndarray, np.ndarray]:
        """(logprob, rank, top ids, top logprobs) of row's i-th emitted token."""
        if self.token_ids.ndim == 1:
            return (self.logprobs[row], self.ranks[row], self.top_ids[row],
                    self.top_logprobs[row])
        return (self.logprobs[row, i], self.ranks[row, i], self.top_ids[row, i],
                self.top_logprobs[row, i])


class DeviceSample(NamedTuple):
    """Device outputs of one sampler call (not yet waited for)."""

    output: SamplerOutput  # what fetch() copies to the host
    # The sampled ids padded to `max_rows`: what a look-ahead step's placeholders gather
    # (StepInputs.prev_sample_rows) without the host ever seeing them.
    next_input_ids: jax.Array


@dataclass
class ForwardOutput:
    """Device outputs of one step's forward pass (not yet waited for)."""

    logits: jax.Array  # [S, V] float32, one row per sequence (its last token)
    hidden: jax.Array  # [T, E] final hidden states of every token (prompt logprobs)


def counted_call(owner, raw, fn, what: str, key):
    """`fn` (the jitted `raw`, maybe wrapped), counting in `owner.recompiles` and logging
    the compilations a call adds once `owner.warm_compiles` is set: warm-up's programs are
    called directly, so a call through the jit after it is a shape warm-up missed."""

    def call(*args):
        before = raw._cache_size()
        out = fn(*args)
        added = raw._cache_size() - before
        if added > 0 and owner.warm_compiles is not None:
            owner.recompiles += added
            logger.error("recompiled %s for shape %s after warm-up (%d so far)", what, key,
                         owner.recompiles)
        return out
    return call


def _widest_float(leaves) -> jnp.dtype:
    """The floating dtype holding the most parameter elements (a model's compute dtype)."""
    sizes: dict = {}
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            sizes[leaf.dtype] = sizes.get(leaf.dtype, 0) + leaf.size
    return max(sizes, key=sizes.get) if sizes else jnp.dtype(jnp.float32)


class ModelRunner:
    """Owns the model state and the KV caches on device; runs bucketed steps."""

    def __init__(self, model: CausalLM, kv_caches: list[jax.Array], *,
                 attention_impl: str | None = None, max_logprobs: int = 20,
                 attention_wrapper=None, max_rows: int | None = None,
                 compute_dtype=None) -> None:
        """`max_rows`: the most sequences a step can have; with it, steps can take token ids
        from the previous step's sampler output on the device (the overlapped loop).
        `compute_dtype`: the model's (None: its widest floating parameters'); a float32
        model's programs are traced at full float32 matmul precision (jaxllm.precision)."""
        self.graphdef, state = nnx.split(model)
        # The jitted programs take the state as a flat list of arrays: flattening an nnx.State
        # runs Python per variable (~1 ms per call for this model's 273), a list is flattened
        # in C++, and a lone decode step is ~18 ms.
        self.state_leaves, self._state_treedef = jax.tree.flatten(state)
        self.config = model.config
        self.kv_caches = kv_caches
        self.max_logprobs = max_logprobs
        # The attention backend (kernels' registry; None: the platform's default): its per-step
        # metadata is built once per step in _step, not in every layer.
        self.backend = get_backend(attention_impl)
        attn = self.backend.attention_fn
        self.attention_fn = attention_wrapper(attn) if attention_wrapper is not None else attn
        self.max_rows = max_rows or 1
        self._no_prev = jnp.zeros(self.max_rows, jnp.int32)  # for steps without look-ahead
        self.compute_dtype = jnp.dtype(compute_dtype or _widest_float(self.state_leaves))
        # The sampler is its own program, compiled once per row count rather than once per
        # (tokens, seqs, pages) bucket: compile time is what users wait for at start-up.
        self._jits = (jax.jit(self._step, donate_argnums=(1,)), jax.jit(self._sample),
                      jax.jit(self._prompt_logprobs), jax.jit(self._verify),
                      jax.jit(self._verify_logits))
        (self._step_fn, self._sample_fn, self._prompt_logprobs_fn, self._verify_fn,
         self._verify_logits_fn) = (with_matmul_precision(f, self.compute_dtype)
                                    for f in self._jits)
        self.warm_compiles: int | None = None  # programs compiled (or loaded) by warm-up
        self.loaded_programs = 0  # of which loaded from an ExecutableStore
        self.recompiles = 0
        # Warm-up's programs, called directly (no re-trace on a shape's first call):
        self._steps: dict[tuple[int, int, int], jax.stages.Compiled] = {}  # (tokens, seqs, pages)
        self._samplers: dict[int, jax.stages.Compiled] = {}  # by rows
        self._verifiers: dict[tuple[int, int], jax.stages.Compiled] = {}  # (token rows, rows)
        self._logit_verifiers: dict[tuple[int, int], jax.stages.Compiled] = {}  # (seqs, rows)
        self._prompt_programs: dict[int, jax.stages.Compiled] = {}  # by token rows

    # -- jitted bodies -------------------------------------------------------------------
    @property
    def state(self) -> nnx.State:
        """The model's state (parameters as placed on the devices), for inspection."""
        return jax.tree.unflatten(self._state_treedef, self.state_leaves)

    def _model(self, state_leaves) -> CausalLM:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._state_treedef, state_leaves))

    def _step(self, state_leaves, kv_caches, inputs: StepInputs, prev_tokens):
        model = self._model(state_leaves)
        rows = inputs.prev_sample_rows
        input_ids = jnp.where(rows >= 0, prev_tokens[jnp.clip(rows, 0, prev_tokens.shape[0] - 1)],
                              inputs.input_ids)
        md = self.backend.prepare_metadata(inputs.attention, input_ids.shape[0])
        hidden, kv_caches = model(input_ids, inputs.positions, kv_caches, md, self.attention_fn)
        logits = model.compute_logits(hidden[inputs.logits_indices])
        return logits, kv_caches, hidden

    def _sample(self, logits, tensors: SamplingTensors) -> DeviceSample:
        out = sample(logits, tensors, max_logprobs=self.max_logprobs)
        ids = out.token_ids.astype(jnp.int32)[:self.max_rows]
        return DeviceSample(out, jnp.pad(ids, (0, self.max_rows - ids.shape[0])))

    def _verify(self, state_leaves, hidden, hidden_rows, draft_ids, num_draft,
                tensors: SamplingTensors) -> DeviceSample:
        """Speculative verification: logits at each speculating row's last token and drafts
        (hidden_rows [R, K+1]), then exact rejection sampling (jaxllm.spec.rejection)."""
        model = self._model(state_leaves)
        rows, positions = hidden_rows.shape
        logits = model.compute_logits(hidden[hidden_rows.reshape(-1)]).reshape(rows, positions, -1)
        return self._reject(logits, draft_ids, num_draft, tensors)

    def _verify_logits(self, logits, draft_ids, num_draft, tensors: SamplingTensors) -> DeviceSample:
        """Speculative verification reading the forward's logits, whose first R * (K+1) rows
        are the verified positions row by row (the step's logits_indices were laid out so,
        `jaxllm.spec.verify_layout.logits_indices_for`): no second LM head."""
        rows, positions = draft_ids.shape[0], draft_ids.shape[1] + 1
        return self._reject(logits[:rows * positions].reshape(rows, positions, -1), draft_ids,
                            num_draft, tensors)

    def _reject(self, logits, draft_ids, num_draft, tensors: SamplingTensors) -> DeviceSample:
        out = rejection_sample(logits.astype(jnp.float32), draft_ids, num_draft,
                               expand_sampling_tensors(tensors, draft_ids),
                               max_logprobs=self.max_logprobs)
        return DeviceSample(out, jnp.zeros(self.max_rows, jnp.int32))

    def _prompt_logprobs(self, state_leaves, hidden, rows, targets):
        """Log-probabilities of `targets` and the top-k after hidden states `hidden[rows]`."""
        model = self._model(state_leaves)
        logp = jax.nn.log_softmax(model.compute_logits(hidden[rows]), axis=-1)
        chosen = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        rank = 1 + jnp.sum(logp > chosen[:, None], axis=-1)
        top_vals, top_ids = jax.lax.top_k(logp, self.max_logprobs)
        return chosen, rank, top_ids, top_vals

    # -- host API ------------------------------------------------------------------------
    def forward(self, inputs: StepInputs, prev_tokens: jax.Array | None = None) -> ForwardOutput:
        """Dispatch one step's forward pass (asynchronously). `prev_tokens`: the previous
        step's `DeviceSample.next_input_ids`, when `inputs` has look-ahead placeholders.
        Host arrays go to jit as numpy: its C++ dispatch moves them in one go, measurably
        cheaper than a jnp.asarray per array (the host gap between steps)."""
        shape = inputs.shape_key
        step = self._steps.get(shape) or self._counted(0, "step", shape)
        prev = self._no_prev if prev_tokens is None else prev_tokens
        logits, self.kv_caches, hidden = step(self.state_leaves, self.kv_caches, inputs, prev)
        return ForwardOutput(logits, hidden)

    def sample(self, logits: jax.Array, tensors: SamplingTensors) -> DeviceSample:
        """Dispatch the sampler over `logits` rows (asynchronously); its program is compiled
        per row count, so a caller verifying several tokens per sequence passes them as rows.
        Per-row token masks and biases travel in `tensors`."""
        rows = logits.shape[0]
        sampler = self._samplers.get(rows) or self._counted(1, "sampler", rows)
        return sampler(logits, tensors)

    def verify(self, forward: ForwardOutput, layout: VerifyLayout,
               tensors: SamplingTensors) -> DeviceSample:
        """Dispatch the verification of a step's proposals (asynchronously): one row per
        sequence of the step (num_draft 0: a plain sample); its output has [R, K+1] tokens,
        -1 past each row's emitted ones. No look-ahead step reads it (next_input_ids zero).
        With `layout.in_logits` the forward already computed the verified positions' logits;
        otherwise the LM head runs here on their hidden states."""
        rows = layout.hidden_rows.shape[0]
        if layout.in_logits:
            key = (forward.logits.shape[0], rows)
            fn = self._logit_verifiers.get(key) or self._counted(4, "verify_logits", key)
            return fn(forward.logits, layout.draft_token_ids, layout.num_draft, tensors)
        key = (forward.hidden.shape[0], rows)
        fn = self._verifiers.get(key) or self._counted(3, "verify", key)
        return fn(self.state_leaves, forward.hidden, layout.hidden_rows, layout.draft_token_ids,
                  layout.num_draft, tensors)

    def execute(self, inputs: StepInputs, tensors: SamplingTensors):
        """forward + sample: (device sampler output, hidden states)."""
        out = self.forward(inputs)
        return self.sample(out.logits, tensors), out.hidden

    def lower_step(self, bucket: Bucket) -> jax.stages.Lowered:
        """The step program of `bucket`, lowered (for inspecting its HLO)."""
        return self._step_fn.trace(self.state_leaves, self.kv_caches,
                                   StepInputs.blank(bucket), self._no_prev).lower()

    @staticmethod
    def fetch(sampled: DeviceSample) -> StepResult:
        """Block on a step's sampler output and copy it to the host."""
        out = jax.device_get(sampled.output)
        return StepResult(np.asarray(out.token_ids), np.asarray(out.logprobs), np.asarray(out.ranks),
                          np.asarray(out.top_logprob_ids), np.asarray(out.top_logprobs))

    def prompt_logprobs(self, hidden: jax.Array, rows: np.ndarray, targets: np.ndarray):
        """Prompt logprobs for given token rows of the last step (rows padded to hidden's T)."""
        t = hidden.shape[0]
        n = len(rows)
        pr = np.zeros(t, np.int32)
        pt = np.zeros(t, np.int32)
        pr[:n], pt[:n] = rows, targets
        fn = (self._prompt_programs.get(t)
              or self._counted(2, "prompt_logprobs", t))
        res = fn(self.state_leaves, hidden, jnp.asarray(pr), jnp.asarray(pt))
        chosen, rank, ids, vals = (np.asarray(x)[:n] for x in jax.device_get(res))
        return chosen, rank, ids, vals

    def warm_up(self, buckets: Iterable[Bucket], dummy_tensors, *, compile_threads: int = 2,
                store: ExecutableStore | None = None, num_speculative_tokens: int = 0,
                verify_rows: Iterable[int] = (), prompt_logprobs: bool = True) -> float:
        """Compile every bucket's step, sampler and (unless `prompt_logprobs` is False: a
        draft model never reports them) prompt-logprobs programs ahead of time; returns
        seconds taken.

        Programs are traced and lowered here, then compiled on `compile_threads` threads (XLA
        releases the GIL while compiling), without running them: executing a dummy step of
        the widest buckets took seconds each. Steps call these programs directly afterwards.
        The samplers and prompt-logprobs programs are traced from the compiled steps' outputs
        (a sharded step's logits come out sharded; only the compiled program says how).
        With a `store`, programs saved by an earlier start are loaded instead of traced (most
        of a warm start was tracing), and newly compiled ones are saved to it.
        `num_speculative_tokens` > 0 also prepares each bucket's verification programs, one per
        row count in `verify_rows`: from the forward's logits where its rows hold every
        verified position, else from the hidden states.
        """
        start = time.perf_counter()
        buckets = list(buckets)
        shared = describe_inputs((self.state_leaves, self.kv_caches)) if store else ""
        pending: list[tuple] = []  # (table, key, name, inputs, lowered, native targets)

        def want(table: dict, key, name: str, args: tuple, trace, derived: bool = False) -> None:
            """Load (table, key) from the store, or queue its lowering for compile_pending.
            `derived`: args include a step's outputs (see describe_inputs)."""
            if key in table or any(p[0] is table and p[1] == key for p in pending):
                return
            inputs = (f"{shared}\n{describe_inputs(args, shardings=not derived)}"
                      if store else "")
            program = store.load(name, inputs) if store else None
            if program is not None:
                table[key] = program
                self.loaded_programs += 1
                return
            lowered = trace(*args).lower()
            needs = native_targets_used(lowered.as_text()) if store else []
            pending.append((table, key, name, inputs, lowered, needs))

        def compile_pending(desc: str) -> None:
            with ThreadPoolExecutor(max(1, compile_threads)) as pool:
                compiled = list(tqdm(pool.map(lambda p: compile_for_store(p[4]), pending),
                                     total=len(pending), desc=desc, unit="program"))
            for (table, key, name, inputs, _, needs), (program, savable) in zip(
                    pending, compiled, strict=True):
                table[key] = program
                if store and savable:
                    store.save(name, inputs, program, needs)
                elif store:
                    logger.info("program %s came from JAX's compilation cache: not saved", name)
            pending.clear()

        self.loaded_programs = 0
        for b in tqdm(buckets, desc="preparing step buckets", unit="shape"):
            want(self._steps, (b.num_tokens, b.num_seqs, b.pages_per_seq), "step",
                 (StepInputs.blank(b), self._no_prev),
                 lambda *a: self._step_fn.trace(self.state_leaves, self.kv_caches, *a))
        compile_pending("compiling step buckets")
        for b in buckets:
            logits, _, hidden = self._steps[(b.num_tokens, b.num_seqs, b.pages_per_seq)].out_info
            want(self._samplers, b.num_seqs, "sampler", (logits, dummy_tensors(b.num_seqs)),
                 self._sample_fn.trace, derived=True)
            rows = jax.ShapeDtypeStruct((b.num_tokens,), jnp.int32)
            if prompt_logprobs:
                want(self._prompt_programs, b.num_tokens, "prompt_logprobs",
                     (hidden, rows, rows),
                     lambda *a: self._prompt_logprobs_fn.trace(self.state_leaves, *a),
                     derived=True)
            k = num_speculative_tokens
            for r in verify_rows if k and b.num_tokens > 1 else ():  # a verification feeds >= 2
                i32 = jnp.int32
                drafts = (jax.ShapeDtypeStruct((r, k), i32), jax.ShapeDtypeStruct((r,), i32))
                if fits_in_logits(r, k, b.num_seqs):
                    want(self._logit_verifiers, (b.num_seqs, r), "verify_logits",
                         (logits, *drafts, dummy_tensors(r)), self._verify_logits_fn.trace,
                         derived=True)
                    continue
                want(self._verifiers, (b.num_tokens, r), "verify",
                     (hidden, jax.ShapeDtypeStruct((r, k + 1), i32), *drafts, dummy_tensors(r)),
                     lambda *a: self._verify_fn.trace(self.state_leaves, *a), derived=True)
        compile_pending("compiling samplers")
        self.warm_compiles = (len(self._steps) + len(self._samplers) + len(self._prompt_programs)
                              + len(self._verifiers) + len(self._logit_verifiers))
        return time.perf_counter() - start

    def warm_up_by_running(self, buckets: Iterable[Bucket], dummy_tensors) -> float:
        """Compile every bucket by executing a dummy step through `execute`: for runners
        whose execute does more than run the step (multi-host leaders broadcast it, so the
        followers compile in lockstep)."""
        start = time.perf_counter()
        for b in tqdm(list(buckets), desc="compiling step buckets", unit="shape"):
            out, hidden = self.execute(StepInputs.blank(b), dummy_tensors(b.num_seqs))
            jax.block_until_ready(out)
            self.prompt_logprobs(hidden, np.zeros(1, np.int32), np.zeros(1, np.int32))
        self.warm_compiles = self._jit_cache_entries()
        return time.perf_counter() - start

    def program_store(self, directory: str) -> ExecutableStore:
        """A store for this runner's programs: keyed by the code, the environment and the
        model's static structure (what its jitted functions close over)."""
        import jaxllm
        import jaxllm.kernels

        static = "\n".join([repr(self.graphdef), repr(self.attention_fn), str(self.max_logprobs),
                            str(self._state_treedef)])
        static = re.sub(r" at 0x[0-9a-f]+", "", static)  # function reprs carry addresses
        fingerprint = hashlib.sha256("\0".join([
            source_fingerprint([jaxllm, jaxllm.kernels]), environment_fingerprint(), static,
        ]).encode()).hexdigest()
        return ExecutableStore(directory, fingerprint, prepare=register_native_target)

    @property
    def compile_count(self) -> int:
        """Programs compiled so far: by warm-up, and after it (recompiles)."""
        return (self.warm_compiles or 0) + self.recompiles

    def _jit_cache_entries(self) -> int:
        return sum(f._cache_size() for f in self._jits)

    def _counted(self, which: int, what: str, key):
        """Program `which` (0 step, 1 sampler, 2 prompt logprobs, 3 verify, 4 verify from logits),
        called through its jit
        and counting and logging the compilations a call adds after warm-up: warm-up's
        programs are called directly, so any is a shape it missed."""
        fn = (self._step_fn, self._sample_fn, self._prompt_logprobs_fn, self._verify_fn,
              self._verify_logits_fn)[which]
        return counted_call(self, self._jits[which], fn, what, key)

    def drop_kv_caches(self) -> list[tuple[tuple[int, ...], jnp.dtype, object]]:
        """Free the KV cache arrays (sleep); returns what is needed to re-create them."""
        specs = [(c.shape, c.dtype, c.sharding) for c in self.kv_caches]
        for c in self.kv_caches:
            c.delete()
        self.kv_caches = []
        return specs

    def restore_kv_caches(self, specs) -> None:
        self.kv_caches = [jax.device_put(jnp.zeros(s, d), sh) for s, d, sh in specs]
