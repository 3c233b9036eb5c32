"""EAGLE proposals (`--speculative-mode eagle --speculative-model PATH`): an EAGLE-1 head
(`jaxllm.models.eagle_head`) drafts greedily from the target's hidden states, and the target
verifies its tokens as it does any proposal.

Design (it mirrors the draft model's, `jaxllm.spec.draft`):
- Positions follow vLLM's convention: the head at position p takes the token x_{p+1} and the
  target's final hidden state f_p, and its output g_p gives (through the target's LM head)
  its guess for x_{p+2}. For a request with n known tokens (the target has computed
  x_0..x_{n-2}, so f_0..f_{n-2} exist), a proposal feeds positions [valid, n-2] with
  (x_{p+1}, f_p) as one ragged chunk per sequence: position n-2's output gives d1. Then d2
  comes from position n-1 fed (d1, g_{n-2}), the head's own output replacing the target's
  feature, and so on up to dk at position n-3+k. Those self-fed positions are never valid
  afterwards, so after a proposal the head's valid length is n-1. Each single-token call
  takes the previous call's greedy tokens and output hidden states on the device; the host
  waits once for all k drafts.
- Features: a paged store [num_pages * page_size, E] in the target's dtype on the target's
  page ids, written after every target forward (`after_forward`) at the step's token slots
  (position -> page table -> slot) by a small jitted program per token bucket with the store
  donated. Keyed by page ids, it needs no bookkeeping for prefix-cache hits, chunked
  prefill, preemption or n > 1: a shared page's features were written by whoever computed
  its KV, and rejected drafts' slots are overwritten later (like KV rolled back by lengths).
- The head's KV cache also lives at the target's page ids (its own arrays, the target's
  page count and page size), so rollback by lengths and the allocator serve it as they do
  the draft model's. Unlike a draft model's, the head's KV at position p depends on the next
  token x_{p+1}: requests sharing a full page (a prefix hit, n > 1 samples) write the same
  values into every slot of it but the last, whose next token is on the following page and
  may differ between them. There the last writer wins and the other request's later
  proposals read its value. Like float rounding between differently shaped steps, that can
  only change a proposal, never what the verifier emits; re-feeding that slot at every
  proposal instead would make two such requests rewrite their whole context each step.
- Greedy, so exact: a proposal is the argmax of the target's LM head over the head's output,
  a deterministic function of the history, and the verifier's rule for deterministic
  proposals (`jaxllm.spec.rejection`, no draft probabilities) stays exact.
- Shapes: the head's calls are padded to the target's `BucketSet`; its step programs (one
  per bucket) and the feature writes (one per token bucket) are compiled when it is loaded,
  before the target's warm-up, so nothing compiles afterwards.
- One device: the head runs unsharded (tensor / data parallel engines refuse eagle mode).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.buckets import BucketSet
from jaxllm.model_inputs import StepInputs, build_step_inputs
from jaxllm.precision import with_matmul_precision
from jaxllm.runner import counted_call
from jaxllm.scheduler_output import ScheduledSeq, SchedulerOutput
from jaxllm.spec.chained import propose_chained

if TYPE_CHECKING:
    from jaxllm.config import EngineConfig, ModelConfig
    from jaxllm.kernels import AttentionBackend
    from jaxllm.loading import EngineParts
    from jaxllm.models.eagle_head import EagleHead
    from jaxllm.request import Request
    from jaxllm.runner import ForwardOutput

logger = logging.getLogger(__name__)


def token_slots(inputs: StepInputs, page_size: int, num_slots: int) -> np.ndarray:
    """The cache slot (page * page_size + offset) of every token of a laid-out step, from its
    positions and page tables; `num_slots` (out of range) for padding tokens."""
    md = inputs.attention
    slots = np.full(inputs.input_ids.shape[0], num_slots, np.int32)
    n = int(md.num_seqs[0])
    cu = np.asarray(md.cu_q_lens)
    total = int(cu[n])
    if total:
        seq = np.repeat(np.arange(n), np.diff(cu[:n + 1]))
        pos = np.asarray(inputs.positions[:total])
        slots[:total] = (np.asarray(md.page_indices)[seq, pos // page_size] * page_size
                         + pos % page_size)
    return slots


class EagleRunner:
    """The head's device side: its KV cache, the feature store and their jitted programs."""

    def __init__(self, head: EagleHead, target, kv_caches: list[jax.Array], store: jax.Array,
                 attention: AttentionBackend, max_rows: int) -> None:
        self.graphdef, state = nnx.split(head)
        self.leaves, self._treedef = jax.tree.flatten(state)
        # The target's embedding (unless the head has its own) and LM head: the same arrays
        # as the target's runner holds, passed whole (XLA keeps only what the program reads).
        self.target_graphdef, target_state = nnx.split(target)
        self.target_leaves, self._target_treedef = jax.tree.flatten(target_state)
        self.kv_caches = kv_caches
        self.store = store
        self.backend = attention
        self.max_rows = max_rows
        self.dtype = head.dtype
        hidden = head.config.hidden_size
        self._no_prev = (jnp.zeros(max_rows, jnp.int32), jnp.zeros((max_rows, hidden), self.dtype))
        self._jits = (jax.jit(self._step, donate_argnums=(2,)),
                      jax.jit(self._write, donate_argnums=(0,)))
        self._step_fn, self._write_fn = (with_matmul_precision(f, self.dtype) for f in self._jits)
        self._steps: dict[tuple[int, int, int], Any] = {}  # (tokens, seqs, pages) -> program
        self._writes: dict[tuple[int, Any], Any] = {}  # (tokens, hidden dtype) -> program
        self.warm_compiles: int | None = None
        self.recompiles = 0

    @property
    def num_slots(self) -> int:
        return self.store.shape[0]

    # -- jitted bodies -------------------------------------------------------------------
    def _step(self, leaves, target_leaves, kv_caches, store, inputs: StepInputs, slots,
              prev_tokens, prev_hidden):
        head = nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, leaves))
        target = nnx.merge(self.target_graphdef,
                           jax.tree.unflatten(self._target_treedef, target_leaves))
        rows = inputs.prev_sample_rows
        chained = rows >= 0
        r = jnp.clip(rows, 0, prev_tokens.shape[0] - 1)
        ids = jnp.where(chained, prev_tokens[r], inputs.input_ids)
        features = jnp.where(chained[:, None], prev_hidden[r],
                             jnp.take(store, slots, axis=0, mode="clip").astype(prev_hidden.dtype))
        embed = head.embed_tokens if head.embed_tokens is not None else target.embed_tokens
        md = self.backend.prepare_metadata(inputs.attention, ids.shape[0])
        out, kv_caches = head(embed(ids), features, inputs.positions, kv_caches, md,
                              self.backend.attention_fn)
        last = out[inputs.logits_indices]
        tokens = jnp.argmax(target.compute_logits(last), axis=-1).astype(jnp.int32)
        pad = self.max_rows - tokens.shape[0]
        return (jnp.pad(tokens, (0, pad)),
                jnp.pad(last.astype(prev_hidden.dtype), ((0, pad), (0, 0))), kv_caches)

    @staticmethod
    def _write(store, hidden, slots):
        return store.at[slots].set(hidden.astype(store.dtype), mode="drop")

    # -- host API ------------------------------------------------------------------------
    def step(self, inputs: StepInputs, slots: np.ndarray, prev=None):
        """Dispatch one head step; (greedy tokens [max_rows], output hidden [max_rows, E]) of
        each sequence's last token, on the device. `prev`: a previous call's result, read by
        the rows `inputs.prev_sample_rows` names."""
        key = inputs.shape_key
        fn = self._steps.get(key) or self._counted(0, "eagle step", key)
        prev_tokens, prev_hidden = prev if prev is not None else self._no_prev
        tokens, hidden, self.kv_caches = fn(self.leaves, self.target_leaves, self.kv_caches,
                                            self.store, inputs, slots, prev_tokens, prev_hidden)
        return tokens, hidden

    def write_features(self, hidden: jax.Array, slots: np.ndarray) -> None:
        """Store a target forward's hidden states [T, E] at its tokens' slots (dispatched)."""
        key = (hidden.shape[0], jnp.dtype(hidden.dtype))
        fn = self._writes.get(key) or self._counted(1, "feature write", key)
        self.store = fn(self.store, hidden, slots)

    def warm_up(self, buckets: BucketSet, hidden_dtype, compile_threads: int = 2) -> float:
        """Compile every bucket's step and every token bucket's feature write; seconds taken."""
        start = time.perf_counter()
        pending = []
        for b in buckets.all():
            pending.append((self._steps, (b.num_tokens, b.num_seqs, b.pages_per_seq),
                            self._step_fn.lower(self.leaves, self.target_leaves, self.kv_caches,
                                                self.store, StepInputs.blank(b),
                                                np.zeros(b.num_tokens, np.int32), *self._no_prev)))
        hidden_dtype = jnp.dtype(hidden_dtype)
        for t in buckets.token_buckets:
            hidden = jax.ShapeDtypeStruct((t, self.store.shape[1]), hidden_dtype)
            pending.append((self._writes, (t, hidden_dtype),
                            self._write_fn.lower(self.store, hidden, np.zeros(t, np.int32))))
        with ThreadPoolExecutor(max(1, compile_threads)) as pool:
            compiled = list(pool.map(lambda p: p[2].compile(), pending))
        for (table, key, _), program in zip(pending, compiled, strict=True):
            table[key] = program
        self.warm_compiles = len(self._steps) + len(self._writes)
        return time.perf_counter() - start

    @property
    def compile_count(self) -> int:
        return (self.warm_compiles or 0) + self.recompiles

    def _counted(self, which: int, what: str, key):
        """A program warm-up did not prepare, called through its jit: counts and logs the
        compilations it adds after warm-up."""
        return counted_call(self, self._jits[which], (self._step_fn, self._write_fn)[which],
                            what, key)

    # -- sleep ---------------------------------------------------------------------------
    def drop_kv_caches(self) -> list:
        """Free the head's KV cache and the feature store (sleep); what restores them."""
        arrays = [*self.kv_caches, self.store]
        specs = [(a.shape, a.dtype, a.sharding) for a in arrays]
        for a in arrays:
            a.delete()
        self.kv_caches, self.store = [], None
        return specs

    def restore_kv_caches(self, specs) -> None:
        arrays = [jax.device_put(jnp.zeros(s, d), sh) for s, d, sh in specs]
        self.kv_caches, self.store = arrays[:-1], arrays[-1]


@dataclass
class EagleState:
    """What the head's KV holds for one request: positions [0, valid) were fed the request's
    own tokens and the target's features. `epoch`: the request's num_preemptions then."""

    epoch: int
    valid: int


class EagleProposer:
    """Greedy EAGLE proposals (see the module docstring). `deferred`: placeholders are
    reserved by `Speculation.drafts_for` and `fill` proposes after scheduling."""

    deferred = True

    def __init__(self, runner: EagleRunner, buckets: BucketSet) -> None:
        self.runner = runner
        self.buckets = buckets
        self.page_size = buckets.page_size
        self.token_budget = buckets.max_num_batched_tokens
        self._state: dict[str, EagleState] = {}
        self.calls = 0  # head step calls (tests and benchmarks)

    @classmethod
    def load(cls, config: EngineConfig, parts: EngineParts, buckets: BucketSet, num_pages: int,
             attention: AttentionBackend) -> EagleProposer:
        """Load `config.speculative_model` (ValueError: not an EAGLE-1 head of this target),
        allocate its KV cache and the feature store, and compile its programs."""
        from jaxllm.cache.kv_cache import allocate_kv_caches
        from jaxllm.models.eagle_head import EagleHead, load_eagle_checkpoint
        from jaxllm.spec.config import check_speculative_model_path

        check_speculative_model_path(config.speculative_model, "eagle")
        if parts.mesh is not None or config.tensor_parallel_size > 1:
            raise ValueError("speculative mode 'eagle' runs on one device: tensor- and "
                             "data-parallel engines cannot use it yet")
        ckpt = load_eagle_checkpoint(config.speculative_model, parts.model_config, parts.dtype)
        cfg = ckpt.config
        head = EagleHead(cfg, ckpt.params, parts.dtype,
                         max(parts.max_model_len, cfg.max_position_embeddings))
        kv = allocate_kv_caches(cfg, num_pages, parts.page_size, parts.kv_dtype,
                                backend=attention)
        store = jnp.zeros((num_pages * parts.page_size, cfg.hidden_size), parts.dtype)
        runner = EagleRunner(head, parts.model, kv, store, attention, config.max_num_seqs)
        seconds = runner.warm_up(buckets, parts.dtype, config.compile_threads or 2)
        logger.info("EAGLE head %s: %d layer(s), KV cache and features %d pages x %d tokens; "
                    "warm-up prepared %d programs in %.1f s", config.speculative_model,
                    cfg.num_layers, num_pages, parts.page_size, runner.compile_count, seconds)
        return cls(runner, buckets)

    # -- the Proposer protocol -----------------------------------------------------------
    def propose(self, request_id: str, token_ids, k: int) -> np.ndarray:
        raise RuntimeError("EAGLE proposals are made after scheduling (EagleProposer.fill)")

    def drop(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._state)

    # -- features ------------------------------------------------------------------------
    def after_forward(self, inputs: StepInputs, forward: ForwardOutput) -> None:
        """Store the target's hidden states of a step just dispatched (its token slots)."""
        self.runner.write_features(forward.hidden,
                                   token_slots(inputs, self.page_size, self.runner.num_slots))

    # -- proposing -----------------------------------------------------------------------
    def valid_length(self, req: Request) -> int:
        """Positions of req whose head KV is valid now: 0 for a new or preempted request,
        else n - 1 for the n tokens it had at its last proposal (those tokens are verified:
        they never change while the request runs)."""
        state = self._state.get(req.request_id)
        if state is None or state.epoch != req.num_preemptions:
            return 0
        return state.valid

    def fill(self, sched: SchedulerOutput) -> None:
        """Propose the placeholder drafts of `sched`'s speculating sequences (in place)."""
        seqs = [s for s in sched.seqs if s.drafts]
        if not seqs:
            return
        feeds: list[tuple[int, list[int]]] = []  # first position, tokens x_{p+1} to feed
        for s in seqs:
            req = s.request
            n = req.num_tokens
            if s.start_pos != n - 1 or s.prev_row is not None or n < 2:
                raise ValueError(f"{req.request_id}: a speculating row must feed its last known "
                                 f"token (start {s.start_pos}, {n} tokens)")
            valid = min(self.valid_length(req), n - 2)
            feeds.append((valid, req.all_token_ids[valid + 1:n]))
        null = sched.null_page
        propose_chained(
            seqs, feeds, token_budget=self.token_budget, page_size=self.page_size,
            first_offset=-2,  # d_{i+1} comes from position n - 2 + i fed (d_i, g_{n-3+i})
            run=lambda pieces, prev, sample: self._run(pieces, null, prev),
            tokens_of=lambda out: out[0])
        for s in seqs:
            req = s.request
            self._state[req.request_id] = EagleState(req.num_preemptions, req.num_tokens - 1)

    def _run(self, pieces: list[ScheduledSeq], null_page: int, prev):
        """One head step over `pieces` (dispatched, not waited for)."""
        num_tokens = sum(p.num_new_tokens for p in pieces)
        bucket = self.buckets.pick(num_tokens, len(pieces), max(len(p.page_ids) for p in pieces))
        inputs = build_step_inputs(SchedulerOutput(pieces, bucket, num_tokens, self.page_size,
                                                   null_page))
        self.calls += 1
        return self.runner.step(inputs, token_slots(inputs, self.page_size, self.runner.num_slots),
                                prev)


def eagle_bytes_per_page(config: EngineConfig, target: ModelConfig, page_size: int, kv_dtype,
                         attention: AttentionBackend, dtype) -> int:
    """Bytes per page an EAGLE head adds to the target's (its KV cache plus the feature
    store), read from its config.json without loading weights; 0 when not in eagle mode or
    the config cannot be read cheaply (loading reports that)."""
    from jaxllm.cache.kv_cache import bytes_per_page
    from jaxllm.models.eagle_head import read_eagle_config

    if config.speculative_mode != "eagle":
        return 0
    try:
        head = read_eagle_config(config.speculative_model or "", target)
    except ValueError:
        return 0
    return (bytes_per_page(head, page_size, kv_dtype, attention)
            + page_size * head.hidden_size * np.dtype(dtype).itemsize)
