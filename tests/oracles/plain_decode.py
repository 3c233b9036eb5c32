"""The plain decode path: full dense forward each step, no cache, no batching tricks.

Slow by design (it recomputes every prefix) but simple enough to trust: it is the reference
the paged engine is checked against, and what tests compare with Hugging Face transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.models.base import CausalLM
from jaxllm.models.dense_attention import DenseMetadata, dense_causal_attention


def _bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


@nnx.jit(static_argnames="kv_dtype")
def _forward_all(model: CausalLM, ids, positions, segment_ids, kv_dtype=None):
    md = DenseMetadata(segment_ids=segment_ids, positions=positions, kv_dtype=kv_dtype)
    hidden, _ = model(ids, positions, None, md, dense_causal_attention)
    return model.compute_logits(hidden)


def flatten_batch(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate sequences into one padded token axis: ids, positions, segment ids (-1 = pad)."""
    total = sum(len(s) for s in seqs)
    t = _bucket(total)
    ids = np.zeros(t, np.int32)
    pos = np.zeros(t, np.int32)
    seg = np.full(t, -1, np.int32)
    off = 0
    for i, s in enumerate(seqs):
        ids[off:off + len(s)] = s
        pos[off:off + len(s)] = np.arange(len(s))
        seg[off:off + len(s)] = i
        off += len(s)
    return ids, pos, seg


def forward_logits(model: CausalLM, seqs: Sequence[Sequence[int]],
                   kv_dtype: str | None = None) -> list[np.ndarray]:
    """Float32 logits [len(s), V] for every token of every sequence (a ragged batch); K/V
    rounded to `kv_dtype` first when given (what a KV cache of that dtype holds)."""
    longest = max((len(s) for s in seqs), default=0)
    if longest > model.max_positions:
        raise ValueError(f"a sequence of {longest} tokens exceeds the model's "
                         f"{model.max_positions} positions (build_model(max_positions=...))")
    ids, pos, seg = flatten_batch(seqs)
    logits = np.asarray(_forward_all(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg),
                                     kv_dtype=kv_dtype))
    out, off = [], 0
    for s in seqs:
        out.append(logits[off:off + len(s)])
        off += len(s)
    return out


def plain_generate(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   eos_token_ids: set[int] | frozenset[int] = frozenset(),
                   temperature: float = 0.0, seed: int = 0,
                   kv_dtype: str | None = None) -> list[list[int]]:
    """Greedy (temperature 0) or sampled continuations, stopping at an EOS token (K/V rounded
    to `kv_dtype` when given, see forward_logits)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must not be empty")
    seqs = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    key = jax.random.PRNGKey(seed)
    for _ in range(max_new_tokens):
        live = [i for i in range(len(seqs)) if not done[i]]
        if not live:
            break
        logits = forward_logits(model, [seqs[i] for i in live], kv_dtype)
        last = np.stack([lg[-1] for lg in logits])
        if temperature == 0.0:
            toks = last.argmax(-1)
        else:
            key, sub = jax.random.split(key)
            toks = np.asarray(jax.random.categorical(sub, jnp.asarray(last) / temperature))
        for i, tok in zip(live, toks.tolist(), strict=True):
            seqs[i].append(tok)
            outs[i].append(tok)
            if tok in eos_token_ids:
                done[i] = True
    return outs
