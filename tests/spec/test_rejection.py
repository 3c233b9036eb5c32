"""Speculative verification against its float64 numpy twin, against the plain sampler, and
statistically: the emitted tokens follow the target distribution (and a broken rule fails)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import sample
from jaxllm.sampling_host import build_sampling_tensors
from jaxllm.sampling_params import SamplingParams
from jaxllm.spec.rejection import (
    expand_sampling_tensors,
    rejection_sample,
    verification_uniforms,
)
from tests.oracles.rejection_reference import (
    reference_position_tensors,
    reference_rejection_sample,
)
from tests.oracles.sampling_reference import reference_filtered_logprobs, reference_logprobs

ROWS, K, VOCAB, CAP, LOGPROBS = 12, 4, 300, 32, 3  # few shapes: compiles dominate
MARGIN = 1e-4  # decisions this close to flipping may differ between float32 and float64

_expand = jax.jit(expand_sampling_tensors)
_verify = jax.jit(rejection_sample, static_argnames=("max_logprobs", "candidate_cap"))


def _random_params(rng: np.random.Generator) -> SamplingParams:
    kwargs = dict(temperature=float(rng.choice([0.0, 0.5, 1.0, 1.4])),
                  top_k=int(rng.choice([0, 0, 5, 40])),
                  top_p=float(rng.choice([1.0, 1.0, 0.9, rng.uniform(0.3, 0.99)])),
                  min_p=float(rng.choice([0.0, 0.0, 0.05])),
                  logprobs=[None, None, 0, LOGPROBS][int(rng.integers(4))])
    if rng.random() < 0.4:
        kwargs.update(presence_penalty=float(rng.uniform(-1, 1)),
                      frequency_penalty=float(rng.uniform(-1, 1)),
                      repetition_penalty=float(rng.uniform(0.7, 1.5)))
    return SamplingParams(**kwargs)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _random_case(rng: np.random.Generator, with_draft_probs: bool):
    """Ragged rows: logits [R, K+1, V], drafts mostly drawn from (a sharpened) target, some
    random; num_draft in [0, K]; R-row tensors with penalty history and random keys."""
    params = [_random_params(rng) for _ in range(ROWS)]
    scale = float(rng.uniform(1.0, 4.0))
    logits = (rng.standard_normal((ROWS, K + 1, VOCAB)) * scale).astype(np.float32)
    if with_draft_probs:
        noise = rng.standard_normal((ROWS, K, VOCAB)) * scale
        q = _softmax(0.7 * logits[:, :K] + 0.5 * noise).astype(np.float32)
    else:
        q = _softmax(2.0 * logits[:, :K].astype(np.float64))
    drafts = np.array([[rng.choice(VOCAB, p=q[r, i] / q[r, i].sum()) if rng.random() < 0.8
                        else rng.integers(VOCAB) for i in range(K)] for r in range(ROWS)],
                      np.int32)
    num_draft = rng.integers(0, K + 1, ROWS).astype(np.int32)
    history = [rng.integers(0, VOCAB, rng.integers(0, 10)) for _ in range(ROWS)]
    tensors = build_sampling_tensors(
        params, vocab_size=VOCAB, key_data=rng.integers(0, 2**32, (ROWS, 2), dtype=np.uint32),
        steps=rng.integers(0, 50, ROWS), prompt_token_ids=history, output_token_ids=history)
    return logits, drafts, num_draft, tensors, (q if with_draft_probs else None)


def _run(logits, drafts, num_draft, tensors, q):
    flat = _expand(tensors, jnp.asarray(drafts))
    out = _verify(jnp.asarray(logits), jnp.asarray(drafts), jnp.asarray(num_draft), flat,
                  None if q is None else jnp.asarray(q), max_logprobs=LOGPROBS,
                  candidate_cap=CAP)
    u_accept, u_draw = (np.asarray(u, np.float64).reshape(ROWS, K + 1)
                        for u in verification_uniforms(flat.key_data, flat.step))
    return out, reference_rejection_sample(logits, drafts, num_draft, tensors, q, u_accept,
                                           u_draw)


@pytest.mark.parametrize("seed,with_draft_probs", [(11, False), (12, True), (13, False),
                                                   (14, True), (15, False)])
def test_verification_matches_reference(seed, with_draft_probs):
    rng = np.random.default_rng(seed)
    compared = accepted = 0
    for _ in range(3):
        case = _random_case(rng, with_draft_probs)
        out, ref = _run(*case)
        got_accepted, got_tokens = np.asarray(out.num_accepted), np.asarray(out.token_ids)
        for r in np.flatnonzero(ref.margin > MARGIN):
            assert got_accepted[r] == ref.num_accepted[r], f"row {r}: accepted count"
            np.testing.assert_array_equal(got_tokens[r], ref.token_ids[r], err_msg=f"row {r}")
            compared += 1
            accepted += int(ref.num_accepted[r])
        assert np.all((got_accepted >= 0) & (got_accepted <= case[2]))
        emitted = got_tokens >= 0
        np.testing.assert_array_equal(emitted.sum(axis=1), got_accepted + 1)
        assert np.all(emitted[:, :-1] >= emitted[:, 1:]), "-1 padding only after the tokens"
    assert compared >= 3 * ROWS - 3, "too many near-boundary rows: the comparison is vacuous"
    assert accepted > 0, "no draft was accepted: the case does not exercise acceptance"


def test_per_position_tensors_match_reference():
    rng = np.random.default_rng(21)
    _, drafts, _, tensors, _ = _random_case(rng, False)
    got = _expand(tensors, jnp.asarray(drafts))
    ref = reference_position_tensors(tensors, drafts)
    for name in tensors.__dataclass_fields__:
        np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                      np.asarray(getattr(ref, name)), err_msg=name)


def test_emitted_logprobs_are_the_raw_model_logprobs():
    rng = np.random.default_rng(31)
    logits, drafts, num_draft, tensors, q = _random_case(rng, False)
    tensors = tensors.replace(num_logprobs=jnp.full(ROWS, LOGPROBS, jnp.int32))
    out, _ = _run(logits, drafts, num_draft, tensors, q)
    tokens = np.asarray(out.token_ids)
    flat = logits.reshape(ROWS * (K + 1), VOCAB)
    chosen, ranks, top_ids, top_lp = reference_logprobs(flat, np.maximum(tokens, 0).ravel(),
                                                        LOGPROBS)
    emitted = tokens.ravel() >= 0
    np.testing.assert_allclose(np.asarray(out.logprobs).ravel()[emitted], chosen[emitted],
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.ranks).ravel()[emitted], ranks[emitted])
    np.testing.assert_array_equal(
        np.asarray(out.top_logprob_ids).reshape(-1, LOGPROBS)[emitted], top_ids[emitted])
    np.testing.assert_allclose(
        np.asarray(out.top_logprobs).reshape(-1, LOGPROBS)[emitted], top_lp[emitted], atol=1e-5)


def test_without_drafts_it_is_the_plain_sampler():
    """num_draft = 0: the one emitted token is the token `sample` draws (same key, index)."""
    rng = np.random.default_rng(41)
    logits, drafts, _, tensors, _ = _random_case(rng, False)
    out, _ = _run(logits, drafts, np.zeros(ROWS, np.int32), tensors, None)
    plain = jax.jit(sample, static_argnames=("max_logprobs", "candidate_cap"))(
        jnp.asarray(logits[:, 0]), tensors, max_logprobs=LOGPROBS, candidate_cap=CAP)
    np.testing.assert_array_equal(np.asarray(out.token_ids)[:, 0], np.asarray(plain.token_ids))
    assert np.all(np.asarray(out.num_accepted) == 0)


def test_greedy_rows_accept_exactly_the_argmax_prefix():
    rng = np.random.default_rng(51)
    logits, drafts, _, tensors, _ = _random_case(rng, False)
    tensors = tensors.replace(greedy=jnp.ones(ROWS, bool), presence_penalty=jnp.zeros(ROWS),
                              frequency_penalty=jnp.zeros(ROWS),
                              repetition_penalty=jnp.ones(ROWS),
                              logit_bias=jnp.zeros((ROWS, VOCAB)))
    argmax = np.argmax(logits, axis=2)
    matches = rng.integers(0, K + 1, ROWS)  # row r: the first `matches` drafts are right
    for r in range(ROWS):
        drafts[r] = np.where(np.arange(K) < matches[r], argmax[r, :K], (argmax[r, :K] + 1) % VOCAB)
    num_draft = np.full(ROWS, K, np.int32)
    out, _ = _run(logits, drafts, num_draft, tensors, None)
    np.testing.assert_array_equal(np.asarray(out.num_accepted), matches)
    tokens = np.asarray(out.token_ids)
    for r in range(ROWS):
        np.testing.assert_array_equal(tokens[r, :matches[r] + 1], argmax[r, :matches[r] + 1])


# --- the output distribution ----------------------------------------------------------------

STAT_ROWS, STAT_VOCAB = 20_000, 6
STAT_PARAMS = SamplingParams(temperature=0.9, top_k=5)  # one token filtered out


def _chi_square_passes(tokens: np.ndarray, probs: np.ndarray) -> bool:
    """Chi-square of token counts against probs, below a bound with ~1e-6 false alarms."""
    observed = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    if np.any(observed[probs == 0] > 0):
        return False
    keep = probs > 0
    expected = probs[keep] * tokens.size
    stat = float(np.sum((observed[keep] - expected) ** 2 / expected))
    df = int(keep.sum()) - 1
    return stat < df + 6.0 * np.sqrt(2.0 * df)


def _stat_case(rng: np.random.Generator, sampled_drafts: bool):
    """Many rows sharing one 2-position target; drafts from a different distribution q."""
    target = np.tile(rng.standard_normal((1, 3, STAT_VOCAB)).astype(np.float32) * 1.5,
                     (STAT_ROWS, 1, 1))
    q_rows = _softmax(rng.standard_normal((2, STAT_VOCAB)) * 1.5)
    drafts = np.stack([rng.choice(STAT_VOCAB, STAT_ROWS, p=q_rows[i]) for i in range(2)],
                      axis=1).astype(np.int32)
    q = np.broadcast_to(q_rows.astype(np.float32), (STAT_ROWS, 2, STAT_VOCAB))
    tensors = build_sampling_tensors(
        [STAT_PARAMS] * STAT_ROWS, vocab_size=STAT_VOCAB,
        key_data=rng.integers(0, 2**32, (STAT_ROWS, 2), dtype=np.uint32))
    # no penalties: every position's distribution is its logits' filtered softmax
    p = np.exp(reference_filtered_logprobs(
        target[0], build_sampling_tensors([STAT_PARAMS] * 3, vocab_size=STAT_VOCAB)))
    return target, drafts, q if sampled_drafts else None, tensors, p


def _emitted(target, drafts, q, tensors):
    flat = _expand(tensors, jnp.asarray(drafts))
    out = _verify(jnp.asarray(target), jnp.asarray(drafts),
                  jnp.full(STAT_ROWS, 2, jnp.int32), flat, None if q is None else jnp.asarray(q))
    return np.asarray(out.token_ids)


def _follows_target(tokens: np.ndarray, p: np.ndarray) -> bool:
    """First emitted token ~ p_0; second (where a row emitted two) ~ p_1."""
    second = tokens[:, 1][tokens[:, 1] >= 0]
    return _chi_square_passes(tokens[:, 0], p[0]) and _chi_square_passes(second, p[1])


@pytest.mark.parametrize("sampled_drafts", [False, True])
def test_emitted_tokens_follow_the_target_distribution(sampled_drafts):
    rng = np.random.default_rng(61 + sampled_drafts)
    target, drafts, q, tensors, p = _stat_case(rng, sampled_drafts)
    tokens = _emitted(target, drafts, q, tensors)
    assert (tokens[:, 1] >= 0).mean() > 0.1, "too few second tokens to test them"
    assert _follows_target(tokens, p)


def test_the_distribution_check_catches_broken_rules():
    """The same check fails for rules that are subtly or plainly wrong."""
    rng = np.random.default_rng(71)
    target, drafts, q, tensors, p = _stat_case(rng, True)
    # (a sampled draft verified as one-hot is still exact, only accepted less often: for any
    # fixed d, accepting with p(d) and else drawing from p without d gives p)
    assert _follows_target(_emitted(target, drafts, None, tensors), p)
    # the draft distributions one position off: min(1, p_0(d) / q_1(d)) for d ~ q_0
    assert not _follows_target(_emitted(target, drafts, q[:, ::-1], tensors), p)
    # accept every draft: the drafts' own distribution comes out
    always = np.concatenate([drafts, np.zeros((STAT_ROWS, 1), np.int32)], axis=1)
    assert not _follows_target(always, p)
    # on rejection, draw from p instead of the residual max(0, p - q)
    u = rng.random((STAT_ROWS, 2))
    accept = u[:, 0] * q[:, 0][np.arange(STAT_ROWS), drafts[:, 0]] < p[0][drafts[:, 0]]
    redraw = np.array([rng.choice(STAT_VOCAB, p=p[0]) for _ in range(STAT_ROWS)])
    first = np.where(accept, drafts[:, 0], redraw)
    second = np.where(accept, rng.choice(STAT_VOCAB, STAT_ROWS, p=p[1]), -1)
    assert not _follows_target(np.stack([first, second, second * 0 - 1], axis=1), p)


def test_draw_follows_the_cdf_and_never_picks_a_zero_weight_token():
    from jaxllm.spec.rejection import _draw

    rng = np.random.default_rng(81)
    rows, vocab = 64, 600  # 3 blocks of 256, the last one partial
    weights = rng.random((rows, vocab)) * (rng.random((rows, vocab)) < 0.05)
    weights[:, 256:512] *= rng.random((rows, 1)) < 0.5  # some rows: a whole empty block
    weights[np.arange(rows), rng.integers(0, vocab, rows)] += 0.5  # no empty row
    u = rng.random(rows)
    u[:4] = [0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5, 1e-9]
    got = np.asarray(jax.jit(_draw)(jnp.asarray(weights, jnp.float32), jnp.asarray(u, jnp.float32)))
    assert np.all(weights[np.arange(rows), got] > 0)
    cum = np.cumsum(weights, axis=1) / weights.sum(axis=1, keepdims=True)
    for r in range(rows):
        want = min(int(np.searchsorted(cum[r], u[r], side="right")),
                   int(np.flatnonzero(weights[r])[-1]))
        if np.min(np.abs(cum[r] - u[r])) > MARGIN:
            assert got[r] == want, r
