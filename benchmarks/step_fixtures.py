"""Ready-made model steps for the benchmarks that time the runner alone (no scheduler).

Imported by the scripts next to it (`python benchmarks/<script>.py` puts this folder on
sys.path).
"""

from __future__ import annotations

import numpy as np

from jaxllm.buckets import Bucket
from jaxllm.kernels import AttentionMetadata
from jaxllm.model_inputs import StepInputs


def decode_step_inputs(batch: int, ctx: int, page_size: int,
                       bucket: Bucket | None = None) -> StepInputs:
    """A decode step of `batch` sequences that each hold `ctx` tokens (the last one is the
    step's query token), on pages 1, 2, ... in order (page 0 untouched).

    Padded to `bucket`'s shape; without one, to the next power of two >= batch (at least 8)
    tokens and sequences, and the pages `ctx` needs per sequence."""
    per = -(-ctx // page_size)
    if bucket is None:
        t = max(8, 1 << (batch - 1).bit_length())
        bucket = Bucket(num_tokens=t, num_seqs=t, pages_per_seq=per)
    t, s, p = bucket.num_tokens, bucket.num_seqs, bucket.pages_per_seq
    pages = np.zeros((s, p), np.int32)
    pages[:batch, :per] = 1 + np.arange(batch * per).reshape(batch, per)
    kv_lens = np.zeros(s, np.int32)
    kv_lens[:batch] = ctx
    cu = np.full(s + 1, batch, np.int32)
    cu[:batch + 1] = np.arange(batch + 1)
    positions = np.zeros(t, np.int32)
    positions[:batch] = ctx - 1
    logits_indices = np.zeros(s, np.int32)
    logits_indices[:batch] = np.arange(batch)
    return StepInputs(input_ids=np.ones(t, np.int32), positions=positions,
                      attention=AttentionMetadata(kv_lens=kv_lens, page_indices=pages, cu_q_lens=cu,
                                                  num_seqs=np.array([batch], np.int32)),
                      logits_indices=logits_indices, prev_sample_rows=np.full(t, -1, np.int32))
