"""Draft-model proposals (`--speculative-mode draft --speculative-model PATH`): a smaller model
of the same vocabulary runs in the engine, greedily, and its tokens are verified by the target.

Design:
- The draft has its own `ModelRunner` and its own KV cache arrays, allocated with the target's
  number of pages, page size and attention backend. Draft KV lives at the same page ids as the
  target's, so the target's page tables, allocator and rollback-by-lengths serve both: the
  draft never owns, frees or copies a page.
- Proposals are made after `Scheduler.schedule()`: the scheduler reserves k_r placeholder
  drafts for a speculating sequence (`Speculation.drafts_for`, pages and budget included),
  then `fill` (called by the engine between `schedule()` and `build_step_inputs`) runs the
  draft over the speculating sequences, batched, and writes its tokens into each
  `ScheduledSeq` (`drafts` and the tail of `token_ids`).
- The draft proposes greedily (the argmax of its logits, through the runner's sampler with
  all-greedy tensors), so a proposal is a deterministic function of the history: q is one-hot
  and the verifier's exact rule for deterministic proposals (`jaxllm.spec.rejection`, no
  `draft_probs`) stays exact, greedy and sampled.
- KV catch-up: per request, the positions whose draft KV is valid. It starts at 0 (a new or
  preempted request; a request's pages never change while it runs), and after a
  verification it is cut to the first position where the tokens the draft was fed differ
  from the request's tokens (rejected drafts' KV is stale; accepted ones' is kept). A
  proposal feeds the tokens after that, up to and including the last known token, as one
  ragged chunk per sequence (d1 from the last token's logits), then k - 1 single-token calls
  give d2..dk; each call takes its input tokens from the previous call's sampler output on
  the device, and the host waits once, for all k. A catch-up longer than the token budget
  (a new request's whole prompt) is split over several calls. Non-speculating steps do no
  draft work: catch-up happens lazily at the next proposal.
- Shared pages: with prefix caching or n > 1, several requests read the same prompt pages,
  and each one's catch-up writes draft KV into them. That is harmless: a shared page holds
  the same tokens at the same positions after the same prefix for all of them, so they
  write the same values (up to float rounding of differently shaped steps, which can only
  change a proposal, never what the verifier emits). The draft's writes go to its own
  arrays, so the target's rule that shared pages are never written is untouched.
- Shapes: the draft's calls use the target's `BucketSet` (a catch-up chunk is at most
  max_num_batched_tokens tokens, a call has at most max_num_seqs sequences), and its step
  and sampler programs are compiled at warm-up, so nothing compiles afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm.buckets import BucketSet
from jaxllm.model_inputs import build_step_inputs
from jaxllm.scheduler_output import ScheduledSeq, SchedulerOutput
from jaxllm.spec.chained import propose_chained
from jaxllm.spec.config import check_speculative_model_path

if TYPE_CHECKING:
    from jaxllm.config import EngineConfig
    from jaxllm.kernels import AttentionBackend
    from jaxllm.loading import EngineParts
    from jaxllm.request import Request
    from jaxllm.runner import DeviceSample, ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class DraftState:
    """What the draft's KV cache holds for one request: positions [0, start) hold the draft KV
    of the request's tokens; positions start.. hold the KV of `fed` (proposals fed to the
    draft, not verified when fed). `epoch`: the request's num_preemptions when written."""

    epoch: int
    start: int
    fed: list[int] = field(default_factory=list)

    def valid_length(self, token_ids: list[int]) -> int:
        """Positions whose draft KV is valid for `token_ids`: up to the first fed proposal
        that the request's tokens do not confirm."""
        n = self.start
        for token in self.fed:
            if n >= len(token_ids) or token_ids[n] != token:
                break
            n += 1
        return n


class DraftProposer:
    """Greedy proposals by a draft model sharing the target's page ids; see the module
    docstring. `deferred`: `Speculation.drafts_for` reserves placeholders and `fill` proposes
    after scheduling (`propose` is never called)."""

    deferred = True

    def __init__(self, runner: ModelRunner, buckets: BucketSet, vocab_size: int) -> None:
        from jaxllm.step_inputs import SamplingTensorBuilder

        self.runner = runner
        self.buckets = buckets
        self.page_size = buckets.page_size
        self.token_budget = buckets.max_num_batched_tokens  # tokens one draft call may feed
        self._tensors = SamplingTensorBuilder(vocab_size)
        self._greedy: dict[int, Any] = {}  # all-greedy sampling tensors by row count
        self._state: dict[str, DraftState] = {}
        self.calls = 0  # draft forward calls (for tests and benchmarks)

    # -- building ------------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig, parts: EngineParts, buckets: BucketSet, num_pages: int,
             attention: AttentionBackend) -> DraftProposer:
        """Load `config.speculative_model`, allocate its KV cache (the target's `num_pages`
        pages of `parts.page_size` tokens, `attention`'s layout) and compile its programs."""
        import time

        from jaxllm.cache.kv_cache import allocate_kv_caches
        from jaxllm.runner import ModelRunner

        draft = load_draft_parts(config, parts)
        kv = allocate_kv_caches(draft.model_config, num_pages, parts.page_size, draft.kv_dtype,
                                sharding=draft.kv_sharding, backend=attention,
                                head_shards=config.tensor_parallel_size)
        runner = ModelRunner(draft.model, kv, attention_impl=config.attention_impl,
                             attention_wrapper=draft.attention_wrapper,
                             max_rows=config.max_num_seqs, compute_dtype=draft.dtype)
        proposer = cls(runner, buckets, draft.model_config.vocab_size)
        store = (runner.program_store(str(Path(config.compilation_cache_dir) / "draft-programs"))
                 if config.compilation_cache_dir else None)
        start = time.perf_counter()
        runner.warm_up(buckets.all(), proposer._tensors.dummy,
                       compile_threads=config.compile_threads or 2, store=store,
                       prompt_logprobs=False)
        logger.info("draft model %s: %d layers, KV cache %d pages x %d tokens (%s); warm-up "
                    "prepared %d programs in %.1f s", config.speculative_model,
                    draft.model_config.num_layers, num_pages, parts.page_size,
                    np.dtype(draft.kv_dtype).name, runner.compile_count,
                    time.perf_counter() - start)
        return proposer

    # -- the Proposer protocol -----------------------------------------------------------
    def propose(self, request_id: str, token_ids, k: int) -> np.ndarray:
        raise RuntimeError("draft proposals are made after scheduling (DraftProposer.fill)")

    def drop(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._state)

    # -- proposing -----------------------------------------------------------------------
    def valid_length(self, req: Request) -> int:
        """Positions of req whose draft KV is valid now."""
        state = self._state.get(req.request_id)
        if state is None or state.epoch != req.num_preemptions:
            return 0
        return state.valid_length(req.all_token_ids)

    def fill(self, sched: SchedulerOutput) -> None:
        """Propose the placeholder drafts of `sched`'s speculating sequences (in place)."""
        seqs = [s for s in sched.seqs if s.drafts]
        if not seqs:
            return
        feeds: list[tuple[int, list[int]]] = []  # per sequence: first position, tokens to feed
        for s in seqs:
            req = s.request
            n = req.num_tokens
            if s.start_pos != n - 1 or s.prev_row is not None:
                raise ValueError(f"{req.request_id}: a speculating row must feed its last known "
                                 f"token (start {s.start_pos}, {n} tokens)")
            valid = min(self.valid_length(req), n - 1)
            feeds.append((valid, req.all_token_ids[valid:n]))
        null = sched.null_page
        proposals = propose_chained(
            seqs, feeds, token_budget=self.token_budget, page_size=self.page_size,
            first_offset=-1,  # d_i is fed at position n - 1 + i
            run=lambda pieces, prev, sample: self._run(pieces, null, prev, sample=sample),
            tokens_of=lambda out: out.next_input_ids)
        for s, drafts in zip(seqs, proposals, strict=True):
            req = s.request
            # fed: the last token at n - 1, then d1..d_{k-1}
            self._state[req.request_id] = DraftState(req.num_preemptions, req.num_tokens,
                                                     drafts[:-1])

    def _run(self, pieces: list[ScheduledSeq], null_page: int, prev: DeviceSample | None,
             *, sample: bool) -> DeviceSample | None:
        """One draft step over `pieces` (dispatched, not waited for); with `sample`, the
        greedy token after each piece's last token."""
        num_tokens = sum(p.num_new_tokens for p in pieces)
        bucket = self.buckets.pick(num_tokens, len(pieces), max(len(p.page_ids) for p in pieces))
        inputs = build_step_inputs(SchedulerOutput(pieces, bucket, num_tokens, self.page_size,
                                                   null_page))
        out = self.runner.forward(inputs, prev.next_input_ids if prev is not None else None)
        self.calls += 1
        if not sample:
            return None
        rows = bucket.num_seqs
        if rows not in self._greedy:
            self._greedy[rows] = self._tensors.dummy(rows)
        return self.runner.sample(out.logits, self._greedy[rows])


def load_draft_parts(config: EngineConfig, target: EngineParts) -> EngineParts:
    """The draft model of `config.speculative_model`, built like the target (same dtype
    setting, placed on the target's mesh), with the target's max_model_len and page size.
    No tokenizer is read: the vocabulary must be the target's (ValueError otherwise)."""
    from jaxllm.config import ModelConfig
    from jaxllm.conversions.checkpoint import detect_format, load_checkpoint
    from jaxllm.loading import _HostModel, _parts_on, resolve_model_path
    from jaxllm.models.dtypes import resolve_compute_dtype
    from jaxllm.parallel import pad_heads_for_tp

    name = config.speculative_model
    check_speculative_model_path(name)
    try:
        path = resolve_model_path(name)
        fmt = detect_format(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--speculative-model {name}: {e}") from e
    if fmt == "hf":  # check the vocabulary before reading any weights
        _check_vocab(ModelConfig.from_file(path), target.model_config, name)
    ckpt = load_checkpoint(path, dtype=config.dtype)
    _check_vocab(ckpt.config, target.model_config, name)
    cfg, params = ckpt.config, ckpt.params
    if config.tensor_parallel_size > 1:
        cfg, params = pad_heads_for_tp(cfg, params, config.tensor_parallel_size)
    host = _HostModel(cfg, params, target.tokenizer, {}, path.stem if path.is_file() else path.name,
                      resolve_compute_dtype(config.dtype, ckpt.config.torch_dtype))
    draft_config = dataclasses.replace(
        config, model=str(path), speculative_mode="disable", speculative_model=None,
        max_model_len=target.max_model_len, page_size=target.page_size, quantization="none")
    return _parts_on(draft_config, host, target.mesh)


def draft_model_config(config: EngineConfig):
    """The draft's `ModelConfig` read from its config.json without loading weights (so the
    KV budget can be split with the target before either cache exists); None when that is
    not cheap (a .gguf file, a converted directory, a hub id not downloaded yet)."""
    from jaxllm.config import ModelConfig

    path = Path(config.speculative_model or "").expanduser()
    if config.speculative_mode != "draft" or not (path / "config.json").is_file():
        return None
    return ModelConfig.from_file(path)


def _check_vocab(draft, target, name: str) -> None:
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"--speculative-model {name}: its vocabulary has {draft.vocab_size} "
                         f"tokens, the target's {target.vocab_size}; a draft model must share "
                         "the target's tokenizer and vocabulary")
