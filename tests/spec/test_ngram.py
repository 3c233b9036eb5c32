"""The n-gram proposer against a brute-force twin, its per-request history, the back-off
rule and the speculative config's validation."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.spec.backoff import SpeculationBackoff
from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.ngram import NgramProposer, TokenHistory, propose_ngram


def _brute_force(history: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Longest suffix first, most recent earlier occurrence; copy from `period` back."""
    length = len(history)
    for n in range(max_n, min_n - 1, -1):
        if n >= length:
            continue
        suffix = history[length - n:]
        for start in range(length - n - 1, -1, -1):
            if history[start:start + n] == suffix:
                period = length - (start + n)
                extended = list(history)
                for j in range(k):
                    extended.append(extended[length + j - period])
                return extended[length:]
    return []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_proposals_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    proposed = 0
    for _ in range(300):
        vocab = int(rng.choice([2, 3, 5, 20]))
        history = rng.integers(0, vocab, int(rng.integers(0, 60))).tolist()
        min_n = int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 4))
        k = int(rng.integers(1, 8))
        got = propose_ngram(np.asarray(history, np.int32), k, min_n, max_n)
        want = _brute_force(history, k, min_n, max_n)
        assert got.dtype == np.int32
        assert got.tolist() == want, (history, k, min_n, max_n)
        proposed += bool(want)
    assert 50 < proposed < 290, "cases should mix matches and misses"


def test_copies_the_continuation_and_repeats_short_periods():
    text = [7, 1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3]
    np.testing.assert_array_equal(propose_ngram(np.array(text), 3, 2, 3), [4, 5, 6])
    # the most recent of equal-length matches wins
    text = [1, 2, 8, 0, 1, 2, 9, 0, 1, 2]
    np.testing.assert_array_equal(propose_ngram(np.array(text), 2, 2, 2), [9, 0])
    # a longer match beats a more recent shorter one
    text = [5, 1, 2, 8, 0, 1, 2, 9, 5, 1, 2]
    np.testing.assert_array_equal(propose_ngram(np.array(text), 1, 2, 3), [8])
    # period 2: "a b a b" continues "a b a"
    np.testing.assert_array_equal(propose_ngram(np.array([4, 3, 4, 3]), 3, 2, 2), [4, 3, 4])
    assert propose_ngram(np.array([1, 2, 3, 4]), 3, 1, 2).size == 0
    assert propose_ngram(np.array([1, 2, 1, 2]), 3, 3, 3).size == 0  # no 3-gram recurs


def test_token_history_follows_growth_and_rebuilds_on_shrink():
    rng = np.random.default_rng(4)
    history = TokenHistory(capacity=1)
    tokens: list[int] = []
    for _ in range(40):
        tokens += rng.integers(0, 100, int(rng.integers(0, 30))).tolist()
        np.testing.assert_array_equal(history.sync(tokens), tokens)
    np.testing.assert_array_equal(history.sync(tokens[:5]), tokens[:5])


def test_proposer_keeps_one_history_per_request():
    proposer = NgramProposer(SpeculativeConfig(mode="ngram", ngram_min=1, ngram_max=3))
    a = [1, 2, 3, 1, 2]
    b = [9, 8, 9]
    np.testing.assert_array_equal(proposer.propose("a", a, 2), [3, 1])
    np.testing.assert_array_equal(proposer.propose("b", b, 2), [8, 9])
    np.testing.assert_array_equal(proposer.propose("a", a + [3, 1, 5, 1], 2), [5, 1])
    assert len(proposer) == 2
    proposer.drop("a")
    proposer.drop("missing")
    assert len(proposer) == 1


def test_backoff_pauses_doubles_and_recovers():
    b = SpeculationBackoff(window=2, min_rate=0.5, initial_pause=3, max_pause=8)
    assert b.proposal_length(4) == 4
    b.record(4, 0)
    b.record(0, 0)  # steps without proposals are not judged
    assert not b.paused
    b.record(4, 1)  # window full: 1 / 8 < 0.5
    assert [b.proposal_length(4) for _ in range(4)] == [0, 0, 0, 4]
    b.record(4, 0)
    b.record(4, 1)  # the probe fails again: pause doubles
    assert [b.proposal_length(4) for _ in range(7)] == [0] * 6 + [4]
    b.record(4, 0)
    b.record(4, 0)
    assert sum(b.proposal_length(4) == 0 for _ in range(10)) == 8  # capped at max_pause
    b.record(4, 4)
    b.record(4, 0)  # 4 / 8 meets 0.5: no pause, and the next failure pauses 3 again
    assert b.proposal_length(4) == 4
    b.record(2, 0)
    b.record(2, 0)
    assert [b.proposal_length(4) for _ in range(4)] == [0, 0, 0, 4]
    with pytest.raises(ValueError):
        b.record(2, 3)


def test_backoff_bounds_the_cost_of_hopeless_proposals():
    """With every proposal rejected, the share of steps that propose falls toward 0."""
    config = SpeculativeConfig(mode="ngram")
    b = SpeculationBackoff.from_config(config)
    steps = 2000
    proposing = 0
    for _ in range(steps):
        k = b.proposal_length(config.num_speculative_tokens)
        if k:
            proposing += 1
            b.record(k, 0)
    assert proposing / steps < 0.05


@pytest.mark.parametrize("kwargs", [
    dict(mode="medusa"),
    dict(mode="ngram", num_speculative_tokens=0),
    dict(mode="ngram", num_speculative_tokens=17),
    dict(mode="draft"),
    dict(mode="eagle", model=""),
    dict(mode="ngram", model="/some/draft"),
    dict(mode="ngram", ngram_min=0),
    dict(mode="ngram", ngram_min=4, ngram_max=3),
    dict(mode="ngram", backoff_window=0),
    dict(mode="ngram", min_acceptance_rate=1.5),
    dict(mode="ngram", backoff_steps=10, max_backoff_steps=5),
    dict(mode="ngram", disable_above_batch=0),
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SpeculativeConfig(**kwargs)


def test_config_modes():
    assert not SpeculativeConfig().enabled
    assert SpeculativeConfig(mode="draft", model="/d").enabled
    c = SpeculativeConfig(mode="ngram", disable_above_batch=8)
    assert c.speculates_at(8) and not c.speculates_at(9)
    assert not SpeculativeConfig().speculates_at(1)


def test_proposal_cap_keeps_emitted_tokens_within_the_limits():
    c = SpeculativeConfig(mode="ngram", num_speculative_tokens=4)
    assert c.proposal_cap(num_tokens=10, num_output_tokens=2, max_tokens=100,
                          max_model_len=1000) == 4
    # 3 tokens left to max_tokens: at most 2 drafts + 1 corrected/bonus token
    assert c.proposal_cap(10, 7, 10, 1000) == 2
    assert c.proposal_cap(10, 9, 10, 1000) == 0
    # 2 positions left in the context: 1 draft + 1 token
    assert c.proposal_cap(998, 0, 500, 1000) == 1
