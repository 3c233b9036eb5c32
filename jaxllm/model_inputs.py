"""StepInputs: what one bucketed step feeds the model, as one pytree for jit.

The scheduler says which requests run, how many tokens each feeds and which pages they own
(`SchedulerOutput`); `build_step_inputs` lays that out as the padded device arrays of the
step's bucket. This dataclass is the one definition of the step's inputs: the runner calls
its programs with it, warm-up traces `StepInputs.blank(bucket)`, and multi-host leaders
broadcast its `to_flat()` fields (followers rebuild it with `from_flat`).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import struct

from jaxllm.buckets import Bucket
from jaxllm.kernels import AttentionMetadata

if TYPE_CHECKING:
    from jaxllm.scheduler import SchedulerOutput


@struct.dataclass
class StepInputs:
    """One step's model inputs, padded to a bucket (all int32).

    input_ids [T], positions [T]: every scheduled token, back to back; padding id 0, pos 0.
    attention: page tables and lengths (kernels.AttentionMetadata; padded sequences have
      kv_len 0, q_len 0 and tables on the null page).
    logits_indices [S]: the row of each sequence's last token (the one that samples).
    prev_sample_rows [T]: -1, or for a look-ahead token whose id the host does not know yet,
      the row of the previous step's sampled tokens that holds it (the overlapped loop; the
      step program gathers it on the device).
    """

    input_ids: jax.Array
    positions: jax.Array
    attention: AttentionMetadata
    logits_indices: jax.Array
    prev_sample_rows: jax.Array

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """(tokens, sequences, pages per sequence): the compiled program this step runs."""
        return (self.input_ids.shape[0], self.logits_indices.shape[0],
                self.attention.page_indices.shape[1])

    @classmethod
    def blank(cls, bucket: Bucket) -> StepInputs:
        """A step of `bucket`'s shapes with no sequences: what warm-up traces and runs."""
        t, s, p = bucket.num_tokens, bucket.num_seqs, bucket.pages_per_seq
        return cls(input_ids=np.zeros(t, np.int32), positions=np.zeros(t, np.int32),
                   attention=AttentionMetadata(kv_lens=np.zeros(s, np.int32),
                                               page_indices=np.zeros((s, p), np.int32),
                                               cu_q_lens=np.zeros(s + 1, np.int32),
                                               num_seqs=np.zeros(1, np.int32)),
                   logits_indices=np.zeros(s, np.int32),
                   prev_sample_rows=np.full(t, -1, np.int32))

    def to_flat(self) -> dict[str, np.ndarray]:
        """Every leaf as a host array, keyed by its path ("attention.kv_lens", ...)."""
        leaves = jax.tree_util.tree_flatten_with_path(self)[0]
        return {_name(path): np.asarray(leaf) for path, leaf in leaves}

    @classmethod
    def from_flat(cls, arrays: dict[str, np.ndarray]) -> StepInputs:
        """Inverse of to_flat (the bucket's shapes come from the arrays themselves)."""
        template = cls.blank(Bucket(1, 1, 1))
        paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        return jax.tree_util.tree_unflatten(treedef, [arrays[_name(p)] for p, _ in paths])

    @classmethod
    def field_ranks(cls) -> dict[str, int]:
        """Flat field name -> number of dimensions (the multi-host broadcast schema)."""
        return {k: v.ndim for k, v in cls.blank(Bucket(1, 1, 1)).to_flat().items()}


def _name(path) -> str:
    return ".".join(str(getattr(k, "name", k)) for k in path)


def build_step_inputs(sched: SchedulerOutput, bucket: Bucket | None = None) -> StepInputs:
    """Lay the scheduled sequences out as `bucket`'s padded arrays (default: the one the
    scheduler chose). ValueError if they do not fit."""
    b = bucket or sched.bucket
    if b is None:
        raise ValueError("empty step has no bucket")
    if sched.num_tokens > b.num_tokens or len(sched.seqs) > b.num_seqs:
        raise ValueError(f"step ({sched.num_tokens} tokens, {len(sched.seqs)} seqs) does not "
                         f"fit bucket {b}")
    n = len(sched.seqs)
    q_lens = np.array([s.num_new_tokens for s in sched.seqs], np.int32)
    starts = np.array([s.start_pos for s in sched.seqs], np.int32)
    cu_q_lens = np.zeros(b.num_seqs + 1, np.int32)
    np.cumsum(q_lens, out=cu_q_lens[1:n + 1])
    cu_q_lens[n + 1:] = cu_q_lens[n]
    total = int(cu_q_lens[n])
    input_ids = np.zeros(b.num_tokens, np.int32)
    positions = np.zeros(b.num_tokens, np.int32)
    if n:
        input_ids[:total] = list(itertools.chain.from_iterable(s.token_ids for s in sched.seqs))
        # position of token j of sequence s: start_s + (j - cu_s)
        positions[:total] = (np.arange(total, dtype=np.int32)
                             + np.repeat(starts - cu_q_lens[:n], q_lens))
    kv_lens = np.zeros(b.num_seqs, np.int32)
    kv_lens[:n] = starts + q_lens
    page_indices = np.full((b.num_seqs, b.pages_per_seq), sched.null_page, np.int32)
    # Every sequence's pages in one scatter (no per-sequence numpy call: host time per step).
    widths = np.fromiter((len(seq.page_ids) for seq in sched.seqs), np.int64, n)
    if n and widths.max() > b.pages_per_seq:
        raise ValueError(f"{int(widths.max())} pages do not fit bucket {b}")
    flat = np.fromiter(itertools.chain.from_iterable(seq.page_ids for seq in sched.seqs),
                       np.int32, int(widths.sum()))
    row_of = np.repeat(np.arange(n), widths)
    page_indices[row_of, np.arange(flat.size) - np.repeat(np.cumsum(widths) - widths, widths)] = flat
    logits_indices = np.zeros(b.num_seqs, np.int32)
    logits_indices[:n] = cu_q_lens[1:n + 1] - 1
    prev_sample_rows = np.full(b.num_tokens, -1, np.int32)
    looked_ahead = [(s, seq.prev_row) for s, seq in enumerate(sched.seqs) if seq.prev_row is not None]
    if looked_ahead:
        at, rows = zip(*looked_ahead, strict=True)
        prev_sample_rows[cu_q_lens[list(at)]] = rows
    return StepInputs(input_ids=input_ids, positions=positions,
                      attention=AttentionMetadata(kv_lens=kv_lens, page_indices=page_indices,
                                                  cu_q_lens=cu_q_lens,
                                                  num_seqs=np.array([n], np.int32)),
                      logits_indices=logits_indices, prev_sample_rows=prev_sample_rows)
