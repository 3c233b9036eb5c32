"""Sampled speculative decoding through the whole engine keeps plain decoding's distribution.

The engine of conftest.py: a tiny random Llama over 32 tokens (its LM head scaled up so
that the distributions are peaked: the draft's argmax is accepted often, but far from
always), its own draft model; the same 4-token prompt sent as N seeded requests at
temperature 1, 4 tokens each (max_tokens leaves room for 2 drafts after the first token), so
the second and third tokens come out of verifications (accepted
drafts, corrected tokens, bonus tokens). The counts of the first three tokens are compared
by chi-square with their exact marginals, computed from the cache-free forward
(tests/oracles/plain_decode.py): P(t0), P(t1) = sum over t0, P(t2) = sum over (t0, t1).

The same check passes for the engine without speculation (same engine, speculation off) and
fails when verification is broken, two ways, in the same engine (the verify call wrapped):
drafts checked against the target's distribution one position later, and the target's
distribution taken at temperature 0.5 (as if the verifier's sampling tensors were wrong).
The bound has about 1e-6 false alarms per check; the seeds are fixed, so the test is
deterministic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams
from tests.oracles.plain_decode import forward_logits
from tests.spec.conftest import VOCAB

N, PROMPT = 2000, [3, 9, 1, 14]


@pytest.fixture(scope="module")
def exact(draft_dirs):
    """Exact marginals of the first three sampled tokens [3, V] (float64)."""
    from jaxllm.conversions import load_checkpoint
    from jaxllm.models import build_model

    cfg, params = load_checkpoint(draft_dirs["target"], dtype="float32")
    model = build_model(cfg, params, "float32")

    def probs(contexts):  # VOCAB contexts per call: one small compiled shape
        last = np.stack([lg[-1] for i in range(0, len(contexts), VOCAB)
                         for lg in forward_logits(model, contexts[i:i + VOCAB])])
        last = last.astype(np.float64)
        e = np.exp(last - last.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    v = range(VOCAB)
    p0 = probs([PROMPT])[0]
    p1 = probs([PROMPT + [a] for a in v])  # [t0, t1]
    p2 = probs([PROMPT + [a, b] for a in v for b in v]).reshape(VOCAB, VOCAB, VOCAB)
    joint01 = p0[:, None] * p1
    return np.stack([p0, joint01.sum(axis=0), np.einsum("ab,abx->x", joint01, p2)])


@pytest.fixture
def engine(spec_engine):
    return spec_engine


def _sample(engine: LLMEngine, tag: str) -> np.ndarray:
    """The first three tokens of N seeded requests [N, 3]."""
    for i in range(N):
        engine.add_request(PROMPT, SamplingParams(temperature=1.0, max_tokens=4, seed=i,
                                                  ignore_eos=True), f"{tag}{i}")
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids[:3]
    engine.step()
    assert engine.runner.recompiles == 0
    assert engine.speculation.proposer.runner.recompiles == 0
    return np.array([tokens[f"{tag}{i}"] for i in range(N)])


def _chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square statistic over df; cells expecting < 5 are pooled into one."""
    observed = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    expected = probs * tokens.size
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    stat = float(np.sum((observed - expected) ** 2 / np.maximum(expected, 1e-12)))
    df = observed.size - 1
    return stat / (df + 6.0 * np.sqrt(2.0 * df))  # > 1: about 1e-6 false alarms


def _fits(tokens: np.ndarray, exact: np.ndarray) -> list[float]:
    return [_chi_square(tokens[:, i], exact[i]) for i in range(3)]


def _off_by_one(verify):
    """Each draft checked against the target's distribution one position later."""
    def broken(hidden, layout, tensors):
        rows = np.concatenate([layout.hidden_rows[:, 1:], layout.hidden_rows[:, -1:]], axis=1)
        return verify(hidden, dataclasses.replace(layout, hidden_rows=rows), tensors)
    return broken


def _colder(verify):
    """The target's distributions at temperature 0.5 instead of the requests' 1."""
    def broken(hidden, layout, tensors):
        return verify(hidden, layout, tensors.replace(temperature=tensors.temperature * 0.5))
    return broken


def test_sampled_speculation_keeps_the_plain_distribution(engine, exact):
    spec = engine.speculation
    config = spec.config
    spec.config = dataclasses.replace(config, mode="disable", model=None)
    try:
        plain = _fits(_sample(engine, "plain"), exact)
    finally:
        spec.config = config
    assert max(plain) < 1, f"plain decoding vs exact marginals: {plain}"
    before = engine.get_stats()
    speculative = _fits(_sample(engine, "spec"), exact)
    stats = engine.get_stats()
    proposed = stats.spec_proposed_tokens - before.spec_proposed_tokens
    accepted = stats.spec_accepted_tokens - before.spec_accepted_tokens
    assert proposed > N and 0.2 < accepted / proposed < 0.9, (accepted, proposed)
    assert max(speculative) < 1, f"speculative decoding vs exact marginals: {speculative}"


@pytest.mark.parametrize("breakage", [_off_by_one, _colder])
def test_the_check_fails_when_verification_is_broken(engine, exact, monkeypatch, breakage):
    monkeypatch.setattr(engine.runner, "verify", breakage(engine.runner.verify))
    fits = _fits(_sample(engine, breakage.__name__), exact)
    assert max(fits[1:]) > 1, f"a broken verification passed the check: {fits}"
