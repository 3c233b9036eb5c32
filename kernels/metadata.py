"""AttentionMetadata: the page tables and lengths of one step, as one pytree for jit."""

from __future__ import annotations

import jax
from flax import struct

from jaxllm.kernels.ragged_layout import TokenLayout, token_layout


@struct.dataclass
class AttentionMetadata:
    """Per-step ragged batch description shared by every attention layer of the model.

    kv_lens [S] int32: tokens of each sequence after this step (cached + new).
    page_indices [S, P] int32: each sequence's pages in order; columns past use hold anything.
    cu_q_lens [S+1] int32: sequence s owns flattened tokens cu_q_lens[s]:cu_q_lens[s+1].
    num_seqs [1] int32: sequences beyond it are padding.
    layout: each token's sequence, position and validity (ragged_layout.TokenLayout), filled
      once per step by an attention backend's `prepare_metadata` so that the layers do not
      each recompute it; None until then (the kernels then compute it themselves).
    """

    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    layout: TokenLayout | None = None


def with_token_layout(md: AttentionMetadata, num_tokens: int) -> AttentionMetadata:
    """`md` with its per-token layout for a step of `num_tokens` tokens (kept if present)."""
    if md.layout is not None:
        if md.layout.seq_ids.shape[0] != num_tokens:
            raise ValueError(f"metadata was prepared for {md.layout.seq_ids.shape[0]} tokens, "
                             f"the step has {num_tokens}")
        return md
    return md.replace(layout=token_layout(num_tokens, md.kv_lens, md.cu_q_lens, md.num_seqs))
