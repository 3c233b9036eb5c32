"""Exact verification of proposed tokens: the emitted tokens are distributed exactly as
plain decoding's (rejection sampling, Leviathan et al. / Chen et al. 2023), greedy rows emit
exactly plain greedy decoding's tokens.

One row per speculating sequence, fixed shapes: target logits [R, K+1, V] (position i holds
the logits after draft i-1, position 0 those after the last verified token), drafts [R, K],
`num_draft` [R] (ragged: positions past a row's drafts are ignored; 0 = a plain decode).
Per row, with p_i the target's processed distribution at position i (the sampler's own
`filtered_logprobs`: bias, mask, penalties, temperature, top-k, top-p, min-p; greedy rows are
one-hot at the argmax) and q_i the proposal's (one-hot at the draft for n-gram proposals):

- draft d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the
  first rejection; greedy rows accept while d_i is the argmax;
- at the first rejected position a, the token is drawn from normalize(max(0, p_a - q_a));
  if every draft was accepted, the bonus token is drawn from p at position num_draft.
So a row emits num_accepted + 1 tokens (1 to K+1).

Randomness: position i of a row uses the keys of output index step + i, where `step` is the
output index of the row's first emitted token: the draw uniform is the plain sampler's
uniform for that index (fold_in(request key, index)), the acceptance uniform is one more
fold_in of it. A seeded request given the same proposals emits the same tokens in any batch.

The per-position sampling tensors (`expand_sampling_tensors`) count the drafts before each
position as output tokens, so penalties at position i see exactly the history plain decoding
would have had there. Constraints that change within the k + 1 positions (min_tokens being
reached, bad words, grammars) are not modelled by that expansion: such rows either do not
speculate or get per-position tensors built by the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jaxllm.sampling import (
    DEFAULT_CANDIDATE_CAP,
    KEY_IMPL,
    SamplingTensors,
    apply_bias_and_mask,
    apply_penalties,
    filtered_logprobs,
    logprobs_if_asked,
)

_ACCEPT_STREAM = 1  # fold_in tag of the acceptance uniform under an output index's key
_DRAW_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw


@struct.dataclass
class VerifyOutput:
    """What one verification returns, per speculating row.

    token_ids[r, :num_accepted[r] + 1] are the emitted tokens (accepted drafts, then the
    corrected or bonus token), -1 after. logprobs / ranks / top_* are those the plain sampler
    reports for each emitted token (raw; grammar rows, which never speculate, over their
    grammar's tokens), zeros when no row asked.
    """

    num_accepted: jax.Array  # i32 [R]
    token_ids: jax.Array  # i32 [R, K+1]
    logprobs: jax.Array  # f32 [R, K+1]
    ranks: jax.Array  # i32 [R, K+1]
    top_logprob_ids: jax.Array  # i32 [R, K+1, L]
    top_logprobs: jax.Array  # f32 [R, K+1, L]

    @property
    def num_emitted(self) -> jax.Array:
        return self.num_accepted + 1


def verification_uniforms(key_data: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(acceptance, draw) uniforms in [0, 1) for flat rows with request keys [N, 2] and output
    indices [N]; the draw uniform is the one `jaxllm.sampling.sample` uses for that index."""
    keys = jax.random.wrap_key_data(key_data, impl=KEY_IMPL)
    keys = jax.vmap(jax.random.fold_in)(keys, step)
    draw = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    accept = jax.vmap(lambda k: jax.random.uniform(
        jax.random.fold_in(k, _ACCEPT_STREAM), (), jnp.float32))(keys)
    return accept, draw


def expand_sampling_tensors(t: SamplingTensors, draft_token_ids: jax.Array) -> SamplingTensors:
    """Per-position tensors: R rows -> R * (K+1) rows (row r * (K+1) + i is position i of
    row r): output index step + i, and drafts 0..i-1 counted as output tokens (penalties)."""
    rows, num_drafts = draft_token_ids.shape
    positions = num_drafts + 1
    vocab = t.output_counts.shape[1]

    def repeat(x: jax.Array) -> jax.Array:
        return jnp.repeat(x, positions, axis=0, total_repeat_length=rows * positions)

    flat = jax.tree.map(repeat, t)
    offsets = jnp.tile(jnp.arange(positions, dtype=t.step.dtype), rows)
    counts = flat.output_counts.reshape(rows, positions, vocab)
    drafts = jnp.clip(draft_token_ids, 0, vocab - 1)
    row_ids = jnp.arange(rows)[:, None]
    later = jnp.arange(positions)[None, :]
    for j in range(num_drafts):  # draft j is history for positions j+1 .. K
        counts = counts.at[row_ids, later, drafts[:, j:j + 1]].add(
            (later > j).astype(counts.dtype))
    return flat.replace(step=flat.step + offsets,
                        output_counts=counts.reshape(rows * positions, vocab))


def rejection_sample(target_logits: jax.Array, draft_token_ids: jax.Array,
                     num_draft: jax.Array, tensors: SamplingTensors,
                     draft_probs: jax.Array | None = None, *, max_logprobs: int = 0,
                     candidate_cap: int = DEFAULT_CANDIDATE_CAP) -> VerifyOutput:
    """Verify each row's drafts; see the module docstring.

    target_logits f32 [R, K+1, V]; draft_token_ids i32 [R, K]; num_draft i32 [R] in [0, K];
    tensors: R * (K+1) per-position rows (`expand_sampling_tensors`); draft_probs f32
    [R, K, V] (the proposer's processed distributions) or None for one-hot proposals
    (n-gram, or a greedy draft); max_logprobs (static): L of top_logprob_*.
    """
    rows, positions, vocab = target_logits.shape
    num_drafts = positions - 1
    if draft_token_ids.shape != (rows, num_drafts):
        raise ValueError(f"draft_token_ids {draft_token_ids.shape} do not match logits "
                         f"{target_logits.shape} (expected [R, K])")
    if tensors.num_rows != rows * positions:
        raise ValueError(f"need {rows * positions} per-position sampling rows, got "
                         f"{tensors.num_rows}")
    flat_logits = target_logits.reshape(rows * positions, vocab).astype(jnp.float32)
    greedy = tensors.greedy.reshape(rows, positions)[:, 0]
    num_draft = jnp.clip(num_draft, 0, num_drafts)
    drafts = jnp.clip(draft_token_ids, 0, vocab - 1)
    is_draft = jnp.arange(num_drafts)[None, :] < num_draft[:, None]
    # greedy rows: the argmax of the processed logits (what filtered_logprobs one-hots)
    penalised = apply_penalties(apply_bias_and_mask(flat_logits, tensors), tensors)
    argmax = _first_argmax(penalised).reshape(rows, positions)

    def sampled_rows() -> tuple[jax.Array, jax.Array]:
        """Acceptance of each draft and the token drawn where the row stops, by the
        sampled rule (every row computes it; greedy rows ignore it)."""
        logp = filtered_logprobs(flat_logits, tensors, candidate_cap=candidate_cap)
        probs = jnp.exp(logp).reshape(rows, positions, vocab)
        u_accept, u_draw = (u.reshape(rows, positions)
                            for u in verification_uniforms(tensors.key_data, tensors.step))
        p_draft = jnp.take_along_axis(probs[:, :num_drafts], drafts[..., None], axis=2)[..., 0]
        if draft_probs is None:
            q_draft = jnp.ones_like(p_draft)
        else:
            q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=2)[..., 0]
        # u < p / q without dividing (q = 0 with p > 0 accepts; p = 0 never does)
        ok = (u_accept[:, :num_drafts] * q_draft < p_draft) & is_draft
        stop = _leading_true(ok)
        at = stop[:, None, None]
        p_last = jnp.take_along_axis(probs, at, axis=1)[:, 0]
        if draft_probs is None:
            d_last = jnp.take_along_axis(jnp.pad(drafts, ((0, 0), (0, 1))), at[:, :, 0], axis=1)
            q_last = (jnp.arange(vocab)[None, :] == d_last).astype(p_last.dtype)
        else:
            q_last = jnp.take_along_axis(jnp.pad(draft_probs, ((0, 0), (0, 1), (0, 0))), at,
                                         axis=1)[:, 0]
        residual = jnp.maximum(p_last - q_last, 0.0)
        # p == q on the support leaves no residual mass (a rejection then has probability 0)
        use_residual = (stop < num_draft) & (jnp.sum(residual, axis=1) > 0)
        weights = jnp.where(use_residual[:, None], residual, p_last)
        return ok, _draw(weights, jnp.take_along_axis(u_draw, at[:, :, 0], axis=1)[:, 0])

    def greedy_only() -> tuple[jax.Array, jax.Array]:
        return jnp.zeros((rows, num_drafts), bool), jnp.zeros(rows, jnp.int32)

    sampled_ok, drawn = lax.cond(jnp.all(greedy), greedy_only, sampled_rows)
    greedy_ok = (drafts == argmax[:, :num_drafts]) & is_draft
    num_accepted = _leading_true(jnp.where(greedy[:, None], greedy_ok, sampled_ok))
    last = jnp.where(greedy, jnp.take_along_axis(argmax, num_accepted[:, None], axis=1)[:, 0],
                     drawn)

    index = jnp.arange(positions)[None, :]
    padded_drafts = jnp.pad(drafts, ((0, 0), (0, 1)))
    token_ids = jnp.where(index < num_accepted[:, None], padded_drafts,
                          jnp.where(index == num_accepted[:, None], last[:, None], -1))
    lp = _emitted_logprobs(flat_logits, token_ids, tensors, max_logprobs)
    return VerifyOutput(num_accepted=num_accepted,
                        token_ids=token_ids.astype(jnp.int32),
                        logprobs=lp[0].reshape(rows, positions),
                        ranks=lp[1].reshape(rows, positions),
                        top_logprob_ids=lp[2].reshape(rows, positions, max_logprobs),
                        top_logprobs=lp[3].reshape(rows, positions, max_logprobs))


def _leading_true(ok: jax.Array) -> jax.Array:
    """Per row, how many leading entries are True (the accepted drafts)."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _first_argmax(x: jax.Array) -> jax.Array:
    """First index of each row's maximum (the sampler's tie rule)."""
    row_max = jnp.max(x, axis=1, keepdims=True)
    iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.minimum(jnp.min(jnp.where(x == row_max, iota, x.shape[1]), axis=1),
                       x.shape[1] - 1)


def _draw(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF draw from unnormalised non-negative weights [R, V] with uniforms [R]: the
    first token whose cumulative weight exceeds u * total. Two levels (block sums, then
    within one block) because a cumsum over the whole vocabulary is slow on XLA CPU; each
    level is clamped to its last entry with positive weight, so rounding never picks a
    token of weight 0."""
    rows, vocab = weights.shape
    blocks = -(-vocab // _DRAW_BLOCK)
    padded = jnp.pad(weights, ((0, 0), (0, blocks * _DRAW_BLOCK - vocab)))
    per_block = padded.reshape(rows, blocks, _DRAW_BLOCK)
    block_mass = jnp.sum(per_block, axis=2)
    block_cum = jnp.cumsum(block_mass, axis=1)
    target = u * block_cum[:, -1]
    block = jnp.minimum(jnp.sum(block_cum <= target[:, None], axis=1), _last_positive(block_mass))
    before = jnp.take_along_axis(block_cum - block_mass, block[:, None], axis=1)[:, 0]
    within = jnp.take_along_axis(per_block, block[:, None, None], axis=1)[:, 0]
    offset = jnp.minimum(jnp.sum(jnp.cumsum(within, axis=1) <= (target - before)[:, None],
                                 axis=1), _last_positive(within))
    return (block * _DRAW_BLOCK + offset).astype(jnp.int32)


def _last_positive(x: jax.Array) -> jax.Array:
    """Per row, the last index with x > 0 (0 if none)."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.max(jnp.where(x > 0, iota, 0), axis=1)


def _emitted_logprobs(flat_logits: jax.Array, token_ids: jax.Array, tensors: SamplingTensors,
                      k: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Log-probabilities, ranks and top-k of every position's token, as the plain sampler
    computes them (-1 slots read token 0 and are meaningless); zeros unless some row asked."""
    tokens = jnp.maximum(token_ids.reshape(flat_logits.shape[0]), 0)
    out = logprobs_if_asked(flat_logits, tokens, tensors, k)
    return out.token_logprobs, out.ranks, out.top_ids, out.top_logprobs
