"""Logprobs of grammar rows are of the grammar-masked distribution (vLLM's behaviour), those of
every other row stay raw; checked against a float64 oracle on random logits and masks, through
the plain sampler, the speculative verifier, the step's tensor builder and the multi-host
broadcast. Fresh seeds each run (printed on failure)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import sample
from jaxllm.sampling_host import build_sampling_tensors
from jaxllm.sampling_params import SamplingParams
from jaxllm.spec.rejection import expand_sampling_tensors, rejection_sample
from jaxllm.step_inputs import SamplingTensorBuilder
from jaxllm.structured.spec import StructuredOutputsParams
from jaxllm.token_masks import pack_allowed, unpack_allowed_host
from tests.oracles.masked_logprobs_reference import reference_reported_logprobs
from tests.oracles.rejection_reference import reference_position_tensors

ROWS, VOCAB, K, CAP = 9, 400, 5, 32  # 400 tokens: the last mask word is partly padding
_jit_sample = jax.jit(sample, static_argnames=("max_logprobs", "candidate_cap"))
_jit_verify = jax.jit(rejection_sample, static_argnames=("max_logprobs", "candidate_cap"))


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def _random_batch(rng: np.random.Generator, rows: int = ROWS, vocab: int = VOCAB):
    """Random logits, params and grammar masks: about half the rows flagged (at least one
    of each kind), one flagged row with fewer allowed tokens than K, flagged rows whose other
    constraints (bad_words, allowed_token_ids) hide grammar tokens, a padding row last."""
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    flagged = rng.random(rows - 1) < 0.5
    flagged[rng.permutation(rows - 1)[:2]] = [True, False]
    grammar = np.ones((rows, vocab), bool)
    params: list[SamplingParams | None] = []
    tiny_row = int(rng.choice(np.flatnonzero(flagged)))
    for r in range(rows - 1):
        kw = dict(temperature=float(rng.choice([0.0, 0.7, 1.0])),
                  top_p=float(rng.choice([1.0, 0.9])), logprobs=int(rng.choice([0, 2, K])),
                  seed=int(rng.integers(2**31)))
        if rng.random() < 0.3:
            kw["logit_bias"] = {int(rng.integers(vocab)): float(rng.uniform(-5, 5))}
        if rng.random() < 0.3:
            kw["repetition_penalty"] = 1.5
        if flagged[r]:
            count = 2 if r == tiny_row else int(rng.integers(3, vocab // 2))
            allowed = rng.choice(vocab, count, replace=False)
            grammar[r] = False
            grammar[r, allowed] = True
            best = int(allowed[np.argmax(logits[r, allowed])])
            other = int(rng.choice(allowed[allowed != best]))
            if rng.random() < 0.5:  # sampling may not take the grammar's best: logprobs still do
                kw["bad_words_token_ids"] = [[best]]
            else:
                kw["allowed_token_ids"] = [other] + rng.choice(vocab, 5).tolist()
        params.append(SamplingParams(**kw))
    params.append(None)
    t = build_sampling_tensors(params, vocab_size=vocab, output_token_ids=[[1, 2, 2]] * rows,
                               key_data=rng.integers(0, 2**32, (rows, 2), dtype=np.uint32))
    packed = pack_allowed(grammar)
    t = t.replace(masked_logprobs=jnp.asarray(np.append(flagged, False)),
                  grammar_mask=jnp.asarray(packed),
                  allowed_mask=jnp.asarray(np.asarray(t.allowed_mask) & packed))
    return logits, t, flagged, tiny_row


def _assert_logprobs(got, tokens, logits, t, where):
    chosen, ranks, top_ids, top_lp = reference_reported_logprobs(logits, tokens, K, t)
    np.testing.assert_allclose(np.asarray(got[0]), chosen, atol=2e-5, err_msg=where)
    np.testing.assert_array_equal(np.asarray(got[1]), ranks, err_msg=where)
    np.testing.assert_array_equal(np.asarray(got[2]), top_ids, err_msg=where)
    got_top = np.asarray(got[3], np.float64)
    np.testing.assert_array_equal(np.isneginf(got_top), np.isneginf(top_lp), err_msg=where)
    finite = np.isfinite(top_lp)
    np.testing.assert_allclose(got_top[finite], top_lp[finite], atol=2e-5, err_msg=where)


@pytest.mark.parametrize("trial", range(3))
def test_sampler_logprobs_of_flagged_rows_are_of_the_grammar_masked_logits(trial):
    seed = _fresh_seed()
    where = f"seed={seed}"
    rng = np.random.default_rng(seed)
    logits, t, flagged, tiny_row = _random_batch(rng)
    out = _jit_sample(jnp.asarray(logits), t, max_logprobs=K, candidate_cap=CAP)
    tokens = np.asarray(out.token_ids)
    allowed = unpack_allowed_host(np.asarray(t.allowed_mask), VOCAB)
    assert allowed[np.arange(ROWS), tokens].all(), where
    _assert_logprobs((out.logprobs, out.ranks, out.top_logprob_ids, out.top_logprobs), tokens,
                     logits, t, where)
    # grammar-masked: finite entries are grammar tokens, and all of them when fewer than K
    grammar = unpack_allowed_host(np.asarray(t.grammar_mask), VOCAB)
    top_ids, top_lp = np.asarray(out.top_logprob_ids), np.asarray(out.top_logprobs)
    for r in np.flatnonzero(flagged):
        assert grammar[r, top_ids[r][np.isfinite(top_lp[r])]].all(), where
    tiny = np.isfinite(top_lp[tiny_row])
    assert tiny.sum() == 2 and abs(np.exp(top_lp[tiny_row][tiny]).sum() - 1) < 1e-5, where
    # the flag changes no token, and unflagged rows' logprobs not by a bit
    raw = _jit_sample(jnp.asarray(logits), t.replace(masked_logprobs=jnp.zeros(ROWS, bool)),
                      max_logprobs=K, candidate_cap=CAP)
    np.testing.assert_array_equal(np.asarray(raw.token_ids), tokens, err_msg=where)
    plain = np.append(~flagged, True)
    for name in ("logprobs", "ranks", "top_logprob_ids", "top_logprobs"):
        np.testing.assert_array_equal(np.asarray(getattr(out, name))[plain],
                                      np.asarray(getattr(raw, name))[plain], err_msg=where)
    # ... and what it changes is real: the raw numbers differ on every flagged row
    assert not np.allclose(np.asarray(raw.logprobs)[:-1][flagged],
                           np.asarray(out.logprobs)[:-1][flagged]), where


def test_flag_and_grammar_mask_do_not_recompile():
    rng = np.random.default_rng(_fresh_seed())
    logits, t, _, _ = _random_batch(rng)
    logits = jnp.asarray(logits)
    spec = StructuredOutputsParams(choice=["a", "b"])
    mixes = [t, t.replace(masked_logprobs=jnp.zeros(ROWS, bool)),
             build_sampling_tensors([SamplingParams(temperature=0.0)] * ROWS, vocab_size=VOCAB),
             build_sampling_tensors([SamplingParams(structured_outputs=spec, logprobs=3)] * ROWS,
                                    vocab_size=VOCAB)]
    assert np.asarray(mixes[-1].masked_logprobs).all()
    sizes = []
    for tensors in mixes:
        jax.block_until_ready(_jit_sample(logits, tensors, max_logprobs=K, candidate_cap=CAP))
        sizes.append(_jit_sample._cache_size())
    assert sizes == [sizes[0]] * len(mixes)


def test_verifier_reports_the_same_logprobs_as_the_sampler():
    """Grammar rows never speculate (num_draft 0) but share the verification batch: each
    emitted token's logprobs follow the same rule as the plain sampler's."""
    seed = _fresh_seed()
    where = f"seed={seed}"
    rng = np.random.default_rng(seed)
    drafts_k = 2
    positions = drafts_k + 1
    logits, t, flagged, _ = _random_batch(rng)
    target = (rng.standard_normal((ROWS, positions, VOCAB)) * 3).astype(np.float32)
    target[:, 0] = logits
    drafts = rng.integers(0, VOCAB, (ROWS, drafts_k)).astype(np.int32)
    num_draft = np.where(np.append(flagged, True), 0, rng.integers(0, drafts_k + 1, ROWS))
    out = _jit_verify(jnp.asarray(target), jnp.asarray(drafts), jnp.asarray(num_draft, jnp.int32),
                      expand_sampling_tensors(t, jnp.asarray(drafts)), max_logprobs=K,
                      candidate_cap=CAP)
    tokens = np.asarray(out.token_ids)
    emitted = tokens.reshape(-1) >= 0
    assert (np.asarray(out.num_accepted) <= num_draft).all(), where
    per_position = reference_position_tensors(t, drafts)
    flat = target.reshape(ROWS * positions, VOCAB)
    ref = reference_reported_logprobs(flat, np.maximum(tokens.reshape(-1), 0), K, per_position)
    got = [np.asarray(getattr(out, n)).reshape(ROWS * positions, *np.shape(r)[1:])
           for n, r in zip(("logprobs", "ranks", "top_logprob_ids", "top_logprobs"), ref,
                           strict=True)]
    np.testing.assert_allclose(got[0][emitted], ref[0][emitted], atol=2e-5, err_msg=where)
    np.testing.assert_array_equal(got[1][emitted], ref[1][emitted], err_msg=where)
    np.testing.assert_array_equal(got[2][emitted], ref[2][emitted], err_msg=where)
    top_got, top_ref = got[3][emitted].astype(np.float64), ref[3][emitted]
    np.testing.assert_array_equal(np.isneginf(top_got), np.isneginf(top_ref), err_msg=where)
    finite = np.isfinite(top_ref)
    np.testing.assert_allclose(top_got[finite], top_ref[finite], atol=2e-5, err_msg=where)


# --- the step's tensor builder and the multi-host broadcast ---------------------------------

class _FakeGrammars:
    """fill_bitmasks as GrammarCompiler's: AND each matcher's packed words into its row."""

    def fill_bitmasks(self, matchers, rows, allowed):
        for m, row in zip(matchers, rows, strict=True):
            allowed[row] &= m.words


def _seq(params, output, words=None):
    grammar = None if words is None else SimpleNamespace(sync=lambda ids: None, words=words)
    req = SimpleNamespace(output_token_ids=output, eos_token_ids=[0], prompt_token_ids=[1],
                          sampling_params=params, grammar=grammar, request_id="r")
    return SimpleNamespace(request=req, output_index=len(output))


def _build(builder, seqs, rows=4):
    return builder.build(SimpleNamespace(seqs=seqs), [s.request.sampling_params for s in seqs],
                         [np.zeros(2, np.uint32)] * len(seqs), rows)


def _grammar_words(rng, vocab=VOCAB):
    row = rng.random(vocab) < 0.3
    row[rng.integers(vocab)] = True
    return pack_allowed(row)


def test_builder_keeps_the_grammar_mask_apart_from_other_constraints():
    rng = np.random.default_rng(_fresh_seed())
    builder = SamplingTensorBuilder(VOCAB, _FakeGrammars())
    spec = StructuredOutputsParams(regex="[ab]+")
    plain = SamplingParams(temperature=0.0)
    constrained = SamplingParams(structured_outputs=spec, logprobs=2)
    picky = SamplingParams(structured_outputs=spec, allowed_token_ids=[3, 4, 5, 6])
    g1, g2 = _grammar_words(rng), _grammar_words(rng)

    neutral = _build(builder, [_seq(plain, [3])])
    assert neutral.grammar_mask is builder.dummy(4).grammar_mask is neutral.allowed_mask
    assert not np.asarray(neutral.masked_logprobs).any()

    only = _build(builder, [_seq(plain, []), _seq(constrained, [], g1)])
    assert only.grammar_mask is only.allowed_mask  # one transfer when nothing else constrains
    np.testing.assert_array_equal(np.asarray(only.masked_logprobs), [False, True, False, False])
    np.testing.assert_array_equal(np.asarray(only.grammar_mask)[1], g1)
    assert (np.asarray(only.grammar_mask)[[0, 2, 3]] == -1).all()

    both = _build(builder, [_seq(picky, [], g1), _seq(constrained, [], g2)])
    np.testing.assert_array_equal(np.asarray(both.masked_logprobs), [True, True, False, False])
    np.testing.assert_array_equal(np.asarray(both.grammar_mask)[:2], np.stack([g1, g2]))
    ids = pack_allowed(np.isin(np.arange(VOCAB), [3, 4, 5, 6]))
    np.testing.assert_array_equal(np.asarray(both.allowed_mask)[:2], np.stack([g1 & ids, g2]))


def test_multihost_broadcast_carries_the_flag_and_the_grammar_mask():
    from jaxllm.multihost import OP_SAMPLE, _message, _unpack_tensors

    rng = np.random.default_rng(_fresh_seed())
    builder = SamplingTensorBuilder(VOCAB, _FakeGrammars())
    spec = StructuredOutputsParams(regex="[ab]+")
    picky = SamplingParams(structured_outputs=spec, bad_words_token_ids=[[7]], logprobs=1)
    grammar_step = _build(builder, [_seq(SamplingParams(), [2]),
                                    _seq(picky, [2], _grammar_words(rng))])
    plain_step = _build(builder, [_seq(SamplingParams(), [2])])
    msg = _message(OP_SAMPLE, tensors=plain_step)
    assert msg["s.grammar_mask"].size == 1  # not sent when no row reads it
    for leader in (grammar_step, plain_step):
        follower = _unpack_tensors(_message(OP_SAMPLE, tensors=leader), VOCAB)
        for name in leader.__dataclass_fields__:
            a, b = np.asarray(getattr(leader, name)), np.asarray(getattr(follower, name))
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(a, b, err_msg=name)
