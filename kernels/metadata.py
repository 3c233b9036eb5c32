"""AttentionMetadata: the page tables and lengths of one step, as one pytree for jit."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class AttentionMetadata:
    """Per-step ragged batch description shared by every attention layer of the model.

    kv_lens [S] int32: tokens of each sequence after this step (cached + new).
    page_indices [S, P] int32: each sequence's pages in order; columns past use hold anything.
    cu_q_lens [S+1] int32: sequence s owns flattened tokens cu_q_lens[s]:cu_q_lens[s+1].
    num_seqs [1] int32: sequences beyond it are padding.
    """

    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
