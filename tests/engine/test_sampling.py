"""The on-device sampler against its float64 numpy twin, plus seeds, logprobs and compiles."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import (
    compute_logprobs_topk,
    filtered_logprobs,
    mark_prompt_tokens,
    request_key_data,
    reset_rows,
    sample,
    unseeded_request_seed,
    update_counts,
)
from jaxllm.sampling_host import build_sampling_tensors
from jaxllm.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxllm.structured.spec import StructuredOutputsParams
from tests.oracles.sampling_reference import (
    reference_filtered_logprobs,
    reference_logprobs,
    reference_penalties,
)

# Few distinct shapes keep compiles (the bulk of this file's time) down: most tests share them.
ROWS, VOCAB, K, CAP = 8, 400, 5, 32  # VOCAB is not a multiple of the 256-token draw block


def _filtered(logits, tensors, cap=CAP):
    return _jit_filtered(logits, tensors, candidate_cap=cap)


def _sample(logits, tensors):
    return _jit_sample(logits, tensors, max_logprobs=K, candidate_cap=CAP)


_jit_filtered = jax.jit(filtered_logprobs, static_argnames="candidate_cap")
_jit_sample = jax.jit(sample, static_argnames=("max_logprobs", "candidate_cap"))


def _random_params(rng: np.random.Generator, seed: int | None = None) -> SamplingParams:
    kwargs = dict(
        temperature=float(rng.choice([0.0, 0.4, 1.0, 1.7])),
        top_k=int(rng.choice([0, -1, 1, 3, 20, 60])),
        top_p=float(rng.choice([1.0, 0.5, 0.9, rng.uniform(0.05, 0.99)])),
        min_p=float(rng.choice([0.0, 0.0, 0.05, 0.3])),
        seed=seed,
    )
    if rng.random() < 0.4:
        kwargs.update(presence_penalty=float(rng.uniform(-2, 2)),
                      frequency_penalty=float(rng.uniform(-2, 2)),
                      repetition_penalty=float(rng.uniform(0.5, 2.0)))
    return SamplingParams(**kwargs)


def _random_batch(rng, rows, vocab, scale=2.0, history=12):
    params = [_random_params(rng) for _ in range(rows)]
    logits = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    prompts = [rng.integers(0, vocab, rng.integers(0, history + 1)) for _ in range(rows)]
    outputs = [rng.integers(0, vocab, rng.integers(0, history + 1)) for _ in range(rows)]
    tensors = build_sampling_tensors(params, vocab_size=vocab, prompt_token_ids=prompts,
                                     output_token_ids=outputs,
                                     key_data=rng.integers(0, 2**32, (rows, 2), dtype=np.uint32))
    return params, logits, tensors


def _assert_same_distribution(got, ref):
    got = np.asarray(got, np.float64)
    assert np.array_equal(np.isneginf(got), np.isneginf(ref)), "kept token sets differ"
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seed,cap", [
    (101, CAP),  # most nuclei / top-k sets fit in the candidates
    (202, 8),    # most rows need the exact bisection fallback
    (303, CAP),
])
def test_filtered_distribution_matches_reference(seed, cap):
    rng = np.random.default_rng(seed)
    for _ in range(4):
        _, logits, tensors = _random_batch(rng, ROWS, VOCAB, scale=float(rng.uniform(0.5, 4)))
        got = _filtered(jnp.asarray(logits), tensors, cap)
        _assert_same_distribution(got, reference_filtered_logprobs(logits, tensors))


def test_filter_keeps_ties_at_the_boundary_like_the_reference():
    rng = np.random.default_rng(404)
    logits = np.round(rng.standard_normal((ROWS, VOCAB)) * 2) / 2  # many exact ties
    params = [SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in
              [(5, 1.0, 0), (17, 1.0, 0), (0, 0.6, 0), (40, 0.8, 0), (3, 0.99, 0), (150, 1.0, 0),
               (0, 0.7, 0.2), (9, 0.9, 0.1)]]
    tensors = build_sampling_tensors(params, vocab_size=VOCAB)
    for cap in (8, CAP):
        got = _filtered(jnp.asarray(logits, jnp.float32), tensors, cap)
        _assert_same_distribution(got, reference_filtered_logprobs(logits, tensors))


def _chi_square_ok(tokens: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Chi-square statistic over tokens with expected count >= 5 (rest pooled), and a bound."""
    n = tokens.size
    observed = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    expected = probs * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    df = max(int(keep.sum()) - 1, 1)
    return stat, df + 6.0 * np.sqrt(2.0 * df)  # ~1e-6 false-alarm rate


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.3, top_p=0.85),
    SamplingParams(top_k=7, temperature=0.6),
    SamplingParams(min_p=0.1, top_p=0.95),
    SamplingParams(repetition_penalty=1.6, frequency_penalty=0.7, presence_penalty=-0.4),
])
def test_sampling_frequencies_match_reference(params):
    rng = np.random.default_rng(505)
    vocab, rows, steps = VOCAB, 512, 8
    row_logits = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    history = rng.integers(0, vocab, 30)
    tensors = build_sampling_tensors(
        [params] * rows, vocab_size=vocab,
        key_data=rng.integers(0, 2**32, (rows, 2), dtype=np.uint32),
        prompt_token_ids=[history[:10]] * rows, output_token_ids=[history[10:]] * rows)
    logits = jnp.asarray(np.tile(row_logits, (rows, 1)))
    draws = []
    for step in range(steps):
        out = _sample(logits, tensors.replace(step=jnp.full(rows, step, jnp.int32)))
        draws.append(np.asarray(out.token_ids))
    tokens = np.concatenate(draws)
    probs = np.exp(reference_filtered_logprobs(logits[:1], tensors)[0])
    assert np.all(probs[tokens] > 0), "drew a token the filters remove"
    stat, bound = _chi_square_ok(tokens, probs)
    assert stat < bound, f"chi-square {stat:.1f} >= {bound:.1f}"


def test_greedy_rows_take_argmax_of_penalised_logits():
    rng = np.random.default_rng(606)
    vocab = VOCAB
    _, logits, tensors = _random_batch(rng, ROWS, vocab)
    greedy = np.zeros(ROWS, bool)
    greedy[::2] = True
    tensors = tensors.replace(greedy=jnp.asarray(greedy))
    out = _sample(jnp.asarray(logits), tensors)
    counts, prompt = np.asarray(tensors.output_counts), np.asarray(tensors.prompt_mask)
    for r in np.flatnonzero(greedy):
        penalised = reference_penalties(
            logits[r].astype(np.float64), counts[r].astype(np.float64), prompt[r],
            float(tensors.presence_penalty[r]), float(tensors.frequency_penalty[r]),
            float(tensors.repetition_penalty[r]))
        assert int(out.token_ids[r]) == int(np.argmax(penalised))
    # all-greedy batch (the skip-the-draw branch) without penalties: plain argmax
    plain = build_sampling_tensors([SamplingParams(temperature=0.0)] * ROWS, vocab_size=vocab)
    out = _sample(jnp.asarray(logits), plain)
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.argmax(logits, axis=1))


def test_logprobs_are_raw_log_softmax_with_top_k():
    rng = np.random.default_rng(707)
    vocab, k = VOCAB, K
    params = [SamplingParams(temperature=0.7, top_p=0.9, logprobs=k, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, logprobs=0), SamplingParams(top_k=4, logprobs=2),
              SamplingParams(min_p=0.2)] * 2
    logits = (rng.standard_normal((ROWS, vocab)) * 3).astype(np.float32)
    tensors = build_sampling_tensors(params, vocab_size=vocab,
                                     key_data=rng.integers(0, 2**32, (ROWS, 2), dtype=np.uint32),
                                     output_token_ids=[rng.integers(0, vocab, 5)] * ROWS)
    out = _sample(jnp.asarray(logits), tensors)
    tokens = np.asarray(out.token_ids)
    chosen, ranks, top_ids, top_lp = reference_logprobs(logits, tokens, k)
    np.testing.assert_allclose(np.asarray(out.logprobs), chosen, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.ranks), ranks)
    np.testing.assert_array_equal(np.asarray(out.top_logprob_ids), top_ids)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), top_lp, atol=1e-5)
    # prompt logprobs helper: given next tokens, and its argmax default
    nxt = rng.integers(0, vocab, ROWS)
    lp = jax.jit(compute_logprobs_topk, static_argnums=1)(jnp.asarray(logits), 3, jnp.asarray(nxt))
    chosen, ranks, top_ids, top_lp = reference_logprobs(logits, nxt, 3)
    np.testing.assert_allclose(np.asarray(lp.token_logprobs), chosen, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lp.ranks), ranks)
    np.testing.assert_array_equal(np.asarray(lp.top_ids), top_ids)
    np.testing.assert_allclose(np.asarray(lp.top_logprobs), top_lp, atol=1e-5)
    assert np.all(np.asarray(compute_logprobs_topk(jnp.asarray(logits), 0).ranks) == 1)


def _seeded_token(logits_row, params, step, rng, rows, position):
    """The token a seeded request gets at `position` in a batch of random other requests."""
    vocab = logits_row.size
    others, other_logits, _ = _random_batch(rng, rows, vocab)
    batch = list(others)
    batch[position] = params
    logits = other_logits.copy()
    logits[position] = logits_row
    keys = rng.integers(0, 2**32, (rows, 2), dtype=np.uint32)
    keys[position] = request_key_data(params.seed)
    steps = rng.integers(0, 50, rows)
    steps[position] = step
    tensors = build_sampling_tensors(batch, vocab_size=vocab, key_data=keys, steps=steps)
    return int(_sample(jnp.asarray(logits), tensors).token_ids[position])


def test_seed_gives_same_token_whatever_the_batch():
    rng = np.random.default_rng(808)
    vocab = VOCAB
    for trial in range(4):
        params = SamplingParams(temperature=1.5, top_p=0.97, seed=int(rng.integers(0, 2**40)))
        row = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
        step = int(rng.integers(0, 100))
        tokens = {_seeded_token(row, params, step, rng, rows, pos)
                  for rows, pos in [(ROWS, 0), (ROWS, 3), (ROWS, 7), (2 * ROWS, 11)]}
        assert len(tokens) == 1, f"trial {trial}: seeded request drew {tokens}"


def test_different_seeds_and_steps_draw_different_tokens():
    rng = np.random.default_rng(909)
    vocab, rows = VOCAB, 2 * ROWS
    logits = jnp.asarray(np.tile(rng.standard_normal(vocab).astype(np.float32) * 0.3, (rows, 1)))
    params = [SamplingParams(seed=int(s)) for s in rng.integers(0, 2**31, rows)]
    tensors = build_sampling_tensors(params, vocab_size=vocab)
    by_seed = np.asarray(_sample(logits, tensors).token_ids)
    assert len(set(by_seed.tolist())) > rows // 2  # near-flat: collisions are rare
    same_seed = build_sampling_tensors([params[0]] * rows, vocab_size=vocab,
                                       steps=np.arange(rows))
    by_step = np.asarray(_sample(logits, same_seed).token_ids)
    assert len(set(by_step.tolist())) > rows // 2
    assert not np.array_equal(request_key_data(7), request_key_data(7, sample_index=1))
    np.testing.assert_array_equal(request_key_data(7), request_key_data(7))
    engine_seeds = {unseeded_request_seed(0, i) for i in range(100)}
    assert len(engine_seeds) == 100 and unseeded_request_seed(1, 0) not in engine_seeds


def test_parameter_mixes_do_not_recompile():
    rng = np.random.default_rng(111)
    rows, vocab = ROWS, VOCAB
    fn = _jit_sample
    logits = jnp.asarray((rng.standard_normal((rows, vocab)) * 2).astype(np.float32))
    mixes = [
        [SamplingParams(temperature=0.0)] * rows,
        [SamplingParams(temperature=0.0, logprobs=3)] * rows,
        [SamplingParams(top_p=0.9, seed=3)] * rows,
        [SamplingParams(top_k=200, repetition_penalty=1.2)] * rows,
        [_random_params(rng, seed=int(s)) for s in range(rows)],
        [SamplingParams(min_p=0.1, logprobs=MAX_LOGPROBS)] * (rows - 1) + [None],
        [SamplingParams(logit_bias={3: 5.0}, allowed_token_ids=[1, 3, 9])] * rows,
        [SamplingParams(min_tokens=9, stop_token_ids=[4], bad_words_token_ids=[[2, 5]])] * rows,
    ]
    sizes = []  # jit caches are shared per function, so count new entries, not the total
    for mix in mixes:
        tensors = build_sampling_tensors(mix, vocab_size=vocab, num_rows=rows,
                                         output_token_ids=[[1, 2, 2]] * len(mix))
        jax.block_until_ready(fn(logits, tensors, max_logprobs=K, candidate_cap=CAP))
        sizes.append(fn._cache_size())
    assert sizes == [sizes[0]] * len(mixes)


def test_penalty_state_helpers_match_numpy():
    rng = np.random.default_rng(222)
    rows, vocab = 5, 64
    counts = jnp.zeros((rows, vocab), jnp.int32)
    expected = np.zeros((rows, vocab), np.int64)
    for _ in range(6):
        row_ids = rng.integers(-1, rows + 1, 8)  # -1 and `rows` are padding: dropped
        tokens = rng.integers(0, vocab, 8)
        counts = jax.jit(update_counts)(counts, jnp.asarray(row_ids), jnp.asarray(tokens))
        for r, tok in zip(row_ids, tokens, strict=True):
            if 0 <= r < rows:
                expected[r, tok] += 1
    np.testing.assert_array_equal(np.asarray(counts), expected)
    cleared = reset_rows(counts, jnp.asarray([1, 3, -1]))
    expected[[1, 3]] = 0
    np.testing.assert_array_equal(np.asarray(cleared), expected)
    mask = mark_prompt_tokens(jnp.zeros((rows, vocab), bool), jnp.asarray([0, 0, 4, 7]),
                              jnp.asarray([5, 9, 63, 1]))
    want = np.zeros((rows, vocab), bool)
    want[0, [5, 9]] = True
    want[4, 63] = True
    np.testing.assert_array_equal(np.asarray(mask), want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=1.1), "min_p"),
    (dict(n=0), "n must"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(stop=""), "empty"),
    (dict(stop=["ok", ""]), "empty"),
    (dict(stop=3), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(temperature=float("nan")), "NaN"),
    (dict(seed="x"), "seed"),
    (dict(output_kind=3), "output_kind"),
    (dict(output_kind="DELTA"), "output_kind"),
    (dict(output_kind=True), "output_kind"),
])
def test_sampling_params_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy and not p.has_penalties
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k_or_off == 0
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(top_p=0.5).clone(top_k=3).top_p == 0.5
    with pytest.raises(ValueError):
        p.clone(top_p=2.0)
    gen = {"temperature": 0.6, "top_p": 0.92, "top_k": 40, "max_new_tokens": 77,
           "do_sample": True, "bos_token_id": 1}
    d = SamplingParams.from_generation_config(gen, seed=5)
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens, d.seed) == (0.6, 0.92, 40, 77, 5)
    assert SamplingParams.from_generation_config(None) == SamplingParams()


def _random_params_pool(rng, size: int) -> list[SamplingParams]:
    pool = []
    for _ in range(size):
        kw = dict(temperature=float(rng.choice([0.0, rng.uniform(0.1, 2)])),
                  top_k=int(rng.choice([-1, 0, 1, rng.integers(2, 50), 600])),
                  top_p=float(rng.uniform(0.2, 1)), min_p=float(rng.choice([0, rng.uniform(0, .3)])),
                  logprobs=None if rng.random() < 0.5 else int(rng.integers(0, 5)))
        if rng.random() < 0.3:
            kw.update(presence_penalty=float(rng.uniform(-1, 1)),
                      repetition_penalty=float(rng.uniform(0.8, 1.3)))
        if rng.random() < 0.2:
            kw.update(logit_bias={int(rng.integers(0, 512)): float(rng.uniform(-5, 5))})
        if rng.random() < 0.2:
            kw.update(min_tokens=int(rng.integers(1, 4)), max_tokens=8)
        if rng.random() < 0.2:
            kw.update(structured_outputs=StructuredOutputsParams(regex="[ab]+"))
        pool.append(SamplingParams(**kw))
    return pool


def test_param_columns_read_each_rows_params():
    from jaxllm.sampling_host import param_columns

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    params = _random_params_pool(rng, 7) + [None]
    cols = param_columns(params, 11, 512)
    full = params[:-1] + [SamplingParams(temperature=0.0)] * 4  # None and padding: neutral
    expect = {
        "temperature": [p.temperature for p in full], "top_p": [p.top_p for p in full],
        "min_p": [p.min_p for p in full],
        "top_k": [max(p.top_k, 0) if max(p.top_k, 0) < 512 else 0 for p in full],
        "presence_penalty": [p.presence_penalty for p in full],
        "frequency_penalty": [p.frequency_penalty for p in full],
        "repetition_penalty": [p.repetition_penalty for p in full],
        "greedy": [p.temperature < 1e-5 or p.top_k == 1 for p in full],
        "num_logprobs": [-1 if p.logprobs is None else p.logprobs for p in full],
        "masked_logprobs": [p.structured_outputs is not None for p in full]}
    for name, values in expect.items():
        np.testing.assert_array_equal(cols[name], np.array(values, cols[name].dtype), name)


def test_param_column_cache_reuses_only_the_same_rows():
    from jaxllm.sampling_host import ParamColumnCache, RowKinds, param_columns

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    pool = _random_params_pool(rng, 6)
    cache = ParamColumnCache(512)
    rows = [pool[int(i)] for i in rng.integers(0, 6, 5)]
    first = cache.columns(rows, 8)
    assert cache.columns(list(rows), 8) is first  # same params objects in the same rows
    # Then random compositions: rows of the last batch shifted, dropped, repeated, new
    # params and None (a padding row) among them.
    choices = [*pool, None]
    last = rows
    for changed in (rows[:4], rows[::-1], rows[:4] + [SamplingParams(**vars(rows[4]))],
                    *([choices[int(i)] for i in rng.integers(0, 7, int(rng.integers(0, 9)))]
                      for _ in range(12))):
        got = cache.columns(changed, 8)
        same = len(changed) == len(last) and all(map(operator.is_, changed, last))
        assert (got is first) == same  # a new composition (even an equal copy) is rebuilt
        expected = param_columns(changed, 8, 512)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
        assert all(got[k].dtype == expected[k].dtype for k in expected)
        assert cache.kinds(changed, 8) == RowKinds.of(
            [p if p is not None else SamplingParams(temperature=0.0) for p in changed])
        first, last = got, changed
    assert cache.columns(rows, 16) is not cache.columns(rows, 8)


def test_key_data_cache_reuses_only_the_same_key_arrays():
    from jaxllm.sampling import request_key_data
    from jaxllm.sampling_host import ParamColumnCache

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    keys = [request_key_data(int(rng.integers(0, 2**31)), i) for i in range(5)]

    def expected(rows_keys, rows):
        host = np.zeros((rows, 2), np.uint32)
        host[:len(rows_keys)] = np.stack(rows_keys)
        return host

    cache = ParamColumnCache(512)
    first = cache.key_data(keys, 8)
    np.testing.assert_array_equal(np.asarray(first), expected(keys, 8))
    assert cache.key_data(list(keys), 8) is first  # the same requests' keys in the same rows
    for changed in (keys[:4], keys[::-1], keys[:4] + [keys[4].copy()]):
        got = cache.key_data(changed, 8)
        assert got is not first  # a new composition (even an equal copy) is rebuilt
        np.testing.assert_array_equal(np.asarray(got), expected(changed, 8))
    assert cache.key_data(keys, 16) is not cache.key_data(keys, 8)
    assert np.asarray(cache.key_data([], 4)).tolist() == [[0, 0]] * 4
