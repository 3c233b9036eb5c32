"""Logit bias and the allowed-token bitmask (min_tokens, allowed_token_ids, bad_words) in the
device sampler, against the numpy oracle and a set-based restatement of each rule."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling_host import build_sampling_tensors
from jaxllm.sampling_params import SamplingParams
from jaxllm.step_inputs import SamplingTensorBuilder
from jaxllm.token_masks import (
    num_mask_words,
    pack_allowed,
    unpack_allowed,
    unpack_allowed_host,
)
from tests.engine.test_sampling import (
    CAP,
    ROWS,
    VOCAB,
    _assert_same_distribution,
    _filtered,
    _random_params,
    _sample,
)
from tests.oracles.sampling_reference import reference_filtered_logprobs

EOS = (7, 11)


def _constrained_params(rng: np.random.Generator, output: list[int], vocab: int
                        ) -> tuple[SamplingParams, set[int]]:
    """Random sampling knobs plus random constraints, and the token set they allow next."""
    base = _random_params(rng)
    allowed = set(range(vocab))
    kwargs: dict = {}
    if rng.random() < 0.5:
        kwargs["logit_bias"] = {int(t): float(rng.choice([-100, 100, rng.uniform(-5, 5)]))
                                for t in rng.integers(0, vocab, rng.integers(1, 6))}
    if rng.random() < 0.4:
        ids = sorted({int(t) for t in rng.integers(0, vocab, rng.integers(2, 40))})
        kwargs["allowed_token_ids"] = ids
        allowed &= set(ids)
    if rng.random() < 0.5:
        kwargs["min_tokens"] = int(rng.integers(0, 2 * len(output) + 2))
        kwargs["stop_token_ids"] = [int(t) for t in rng.integers(0, vocab, 2)]
        kwargs["ignore_eos"] = bool(rng.random() < 0.3)
        if len(output) < kwargs["min_tokens"]:
            allowed -= set(kwargs["stop_token_ids"])
            if not kwargs["ignore_eos"]:
                allowed -= set(EOS)
    if rng.random() < 0.5:
        single = [int(rng.integers(0, vocab))]
        matching = list(output[-2:]) + [int(rng.integers(0, vocab))] if len(output) >= 2 else []
        other = [int(rng.integers(0, vocab)), int(rng.integers(0, vocab)), 5]
        words = [w for w in (single, matching, other) if w]
        kwargs["bad_words_token_ids"] = words
        allowed -= {single[0]}
        if matching:
            allowed -= {matching[-1]}
        if list(output[-2:]) == other[:2]:
            allowed -= {other[-1]}
    kwargs["max_tokens"] = max(kwargs.get("min_tokens", 0), 16)
    return base.clone(**kwargs), allowed


def _constrained_batch(rng, rows, vocab):
    outputs = [[int(t) for t in rng.integers(0, vocab, rng.integers(0, 8))] for _ in range(rows)]
    pairs = [_constrained_params(rng, o, vocab) for o in outputs]
    params = [p for p, _ in pairs]
    logits = (rng.standard_normal((rows, vocab)) * float(rng.uniform(0.5, 4))).astype(np.float32)
    tensors = build_sampling_tensors(
        params, vocab_size=vocab, output_token_ids=outputs, eos_token_ids=EOS,
        key_data=rng.integers(0, 2**32, (rows, 2), dtype=np.uint32))
    return params, [a for _, a in pairs], logits, tensors


def test_bitmask_packs_and_unpacks_on_host_and_device():
    rng = np.random.default_rng(1201)
    for vocab in (1, 31, 32, 33, VOCAB):
        bits = rng.random((3, vocab)) < 0.5
        words = pack_allowed(bits)
        assert words.shape == (3, num_mask_words(vocab)) and words.dtype == np.int32
        np.testing.assert_array_equal(unpack_allowed_host(words, vocab), bits)
        np.testing.assert_array_equal(np.asarray(unpack_allowed(jnp.asarray(words), vocab)), bits)
    assert np.all(pack_allowed(np.ones((2, 70), bool)) == -1)


@pytest.mark.parametrize("seed", [1301, 1302, 1303])
def test_constrained_distribution_matches_reference_and_rules(seed):
    rng = np.random.default_rng(seed)
    for _ in range(3):
        _, allowed, logits, tensors = _constrained_batch(rng, ROWS, VOCAB)
        mask = unpack_allowed_host(np.asarray(tensors.allowed_mask), VOCAB)
        for r, want in enumerate(allowed):
            assert set(np.flatnonzero(mask[r]).tolist()) == want
        got = _filtered(jnp.asarray(logits), tensors, CAP)
        _assert_same_distribution(got, reference_filtered_logprobs(logits, tensors))
        out = _sample(jnp.asarray(logits), tensors)
        for r, token in enumerate(np.asarray(out.token_ids).tolist()):
            if allowed[r]:
                assert token in allowed[r], f"row {r} drew a disallowed token"


def test_logit_bias_bans_and_forces_and_logprobs_stay_raw():
    rng = np.random.default_rng(1401)
    logits = (rng.standard_normal((ROWS, VOCAB)) * 2).astype(np.float32)
    top = np.argmax(logits, axis=1)
    forced = rng.integers(0, VOCAB, ROWS)
    params = []
    for r in range(ROWS):
        bias = {int(top[r]): -100.0} if r % 2 else {int(forced[r]): 100.0}
        params.append(SamplingParams(temperature=float(rng.choice([0.0, 1.0])), seed=r,
                                     logit_bias=bias, logprobs=0))
    tensors = build_sampling_tensors(params, vocab_size=VOCAB)
    out = _sample(jnp.asarray(logits), tensors)
    tokens = np.asarray(out.token_ids)
    for r in range(ROWS):
        if r % 2:
            assert tokens[r] != top[r]
        else:
            assert tokens[r] == forced[r]
    raw = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(raw)[np.arange(ROWS), tokens],
                               atol=1e-5)


def test_builder_reuses_neutral_arrays_and_masks_until_min_tokens():
    builder = SamplingTensorBuilder(VOCAB)
    plain = SamplingParams(temperature=0.0)
    picky = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5],
                           bad_words_token_ids=[[9, 10]])

    def seq(params, output, index=None):
        req = SimpleNamespace(output_token_ids=output, eos_token_ids=EOS, prompt_token_ids=[1],
                              sampling_params=params)
        return SimpleNamespace(request=req, output_index=len(output) if index is None else index)

    def build(seqs):
        sched = SimpleNamespace(seqs=seqs)
        return builder.build(sched, [s.request.sampling_params for s in seqs],
                             [np.zeros(2, np.uint32)] * len(seqs), 4)

    a, b = build([seq(plain, [3])]), build([seq(plain, [4, 4])])
    assert a.allowed_mask is b.allowed_mask and a.logit_bias is b.logit_bias
    assert a.allowed_mask is builder.dummy(4).allowed_mask
    early = build([seq(plain, []), seq(picky, [2, 9])])
    mask = unpack_allowed_host(np.asarray(early.allowed_mask), VOCAB)
    assert mask[0].all() and mask[2:].all()
    assert set(np.flatnonzero(~mask[1]).tolist()) == {5, 7, 11, 10}
    later = build([seq(picky, [2, 9, 1])])  # min_tokens reached; tail no longer matches
    assert unpack_allowed_host(np.asarray(later.allowed_mask), VOCAB).all()
    ahead = build([seq(picky, [2, 9], index=3)])  # look-ahead row: tail unknown, min reached
    assert unpack_allowed_host(np.asarray(ahead.allowed_mask), VOCAB).all()


def test_new_sampling_params_validate_and_resolve_bad_words():
    p = SamplingParams(logit_bias={"5": 3, 7: -100}, allowed_token_ids=[1, 2])
    assert p.logit_bias == {5: 3.0, 7: -100.0} and p.allowed_token_ids == [1, 2]
    for bad in (dict(logit_bias={1: 101}), dict(logit_bias={-1: 1}), dict(allowed_token_ids=[]),
                dict(allowed_token_ids=[-2]), dict(bad_words=[" "]), dict(logit_bias={"x": 1})):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    encode = {"hello": [4, 5], " hello": [6, 5], "x": [9], " x": [8, 9]}.__getitem__
    resolved = SamplingParams(bad_words=["hello", " x"]).resolve_bad_words(encode)
    assert resolved.bad_words_token_ids == [[4, 5], [6, 5], [9]]
    assert SamplingParams().resolve_bad_words(encode).bad_words_token_ids is None
