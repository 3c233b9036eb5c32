"""The acceptance replay of benchmarks/spec_prompts.py against step-by-step bookkeeping."""

from __future__ import annotations

import numpy as np

from benchmarks.spec_prompts import (
    COPY_HEAVY,
    NO_COPY,
    AcceptanceStats,
    replay_ngram_speculation,
)
from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.ngram import propose_ngram

CONFIG = SpeculativeConfig(mode="ngram", num_speculative_tokens=4, ngram_min=2, ngram_max=3)


def _twin(prompt: list[int], output: list[int], k: int) -> AcceptanceStats:
    """No back-off: propose from the whole history each step, walk token by token."""
    stats = AcceptanceStats()
    pos = 0
    while pos < len(output):
        history = np.array(prompt + output[:pos], np.int32)
        proposal = propose_ngram(history, min(k, len(output) - pos - 1), CONFIG.ngram_min,
                                 CONFIG.ngram_max).tolist()
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == output[pos + accepted]:
            accepted += 1
        if proposal:
            stats.proposing_steps += 1
        stats.proposed += len(proposal)
        stats.accepted += accepted
        stats.steps += 1
        stats.tokens += accepted + 1
        pos += accepted + 1
    return stats


def test_replay_matches_its_twin_on_random_outputs():
    rng = np.random.default_rng(5)
    total = AcceptanceStats()
    for _ in range(40):
        vocab = int(rng.choice([4, 8, 30]))
        prompt = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        # outputs mixing copied stretches of the prompt with fresh tokens
        output: list[int] = []
        while len(output) < int(rng.integers(1, 60)):
            if rng.random() < 0.5 and len(prompt) > 4:
                start = int(rng.integers(0, len(prompt) - 4))
                output += prompt[start:start + int(rng.integers(2, 8))]
            else:
                output += rng.integers(0, vocab, 3).tolist()
        got = replay_ngram_speculation(prompt, output, CONFIG, backoff=False)
        assert got == _twin(prompt, output, CONFIG.num_speculative_tokens)
        assert got.tokens == len(output)
        assert got.accepted + got.steps == got.tokens
        total = total + got
    assert total.accepted > 0 and total.proposed > total.accepted


def test_copying_output_is_mostly_accepted_and_noise_backs_off():
    rng = np.random.default_rng(6)
    passage = rng.integers(0, 1000, 200).tolist()
    copied = replay_ngram_speculation([1, 2] + passage, passage[:2] + passage[2:150], CONFIG)
    assert copied.acceptance_rate > 0.9
    assert copied.tokens_per_step > 3.5
    prompt = rng.integers(0, 6, 50).tolist()
    noise = rng.integers(0, 6, 400).tolist()  # small vocabulary: n-grams recur by chance
    with_backoff = replay_ngram_speculation(prompt, noise, CONFIG)
    without = replay_ngram_speculation(prompt, noise, CONFIG, backoff=False)
    assert without.proposing_steps > 0.8 * without.steps
    assert with_backoff.proposing_steps < 0.5 * without.proposing_steps


def test_prompt_sets():
    for prompts in (COPY_HEAVY, NO_COPY):
        assert len(prompts) == 8
        assert len(set(prompts.values())) == 8 and all(p.strip() for p in prompts.values())
