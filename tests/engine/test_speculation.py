"""Speculative decoding in the engine: greedy output with any proposer equals greedy output
without speculation, token for token; rollback, aborts mid-verification and preemption keep
the page invariants; nothing recompiles after warm-up.

Proposers: the n-gram proposer on prompts that repeat themselves, an oracle that proposes the
true greedy continuation (every draft accepted), and a random one (almost every draft
rejected). The distribution of *sampled* speculation is tested on the verifier itself
(tests/spec/test_rejection_statistics.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams
from jaxllm.spec import NgramProposer

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=8)


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


class OracleProposer:
    """Proposes the known greedy continuation of each request (all accepted)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.continuations = continuations

    def propose(self, request_id, token_ids, k):
        for prompt, out in self.continuations.items():
            if tuple(token_ids[:len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                return np.asarray(out[done:done + k], np.int32)
        return np.zeros(0, np.int32)

    def drop(self, request_id):
        pass


class RandomProposer:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def propose(self, request_id, token_ids, k):
        return self.rng.integers(3, 512, size=k).astype(np.int32)

    def drop(self, request_id):
        pass


def _run(engine: LLMEngine, prompts, params: SamplingParams, aborts=None) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(p, params, f"r{i}")
    done, step = {}, 0
    while engine.has_unfinished_requests():
        if aborts and step in aborts:
            done[aborts[step]] = engine.abort_request(aborts[step], return_output=True)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.scheduler.check_invariants()
        step += 1
    engine.step()  # a step still in flight
    assert not engine.scheduler.requests and engine.scheduler.allocator.num_used_pages == 0
    assert engine.runner.recompiles == 0
    return done


def _prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    motif = rng.integers(3, 512, size=6).tolist()
    # repetitive prompts give the n-gram proposer matches; plain random ones give none
    return [motif * 4, rng.integers(3, 512, size=9).tolist(), (motif[:3] * 5)[:13],
            rng.integers(3, 512, size=20).tolist()]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """Without and with speculation; 11 usable pages of 8 tokens: requests get preempted."""
    base = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_pages=12, **SMALL))
    spec = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_pages=12,
                                  speculative_mode="ngram", num_speculative_tokens=3, **SMALL))
    return base, spec


@pytest.mark.parametrize("proposer", ["ngram", "oracle", "random"])
def test_greedy_with_speculation_equals_greedy(engines, proposer):
    base, spec = engines
    seed = _fresh_seed()
    prompts = _prompts(seed)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    expected = _run(base, prompts, params)
    want = {rid: o.outputs[0].token_ids for rid, o in expected.items()}
    spec.speculation.proposer = {
        "ngram": NgramProposer(spec.speculation.config),
        "oracle": OracleProposer({tuple(p): want[f"r{i}"] for i, p in enumerate(prompts)}),
        "random": RandomProposer(seed),
    }[proposer]
    before = spec.get_stats()
    got = _run(spec, prompts, params)
    assert {rid: o.outputs[0].token_ids for rid, o in got.items()} == want, f"seed={seed}"
    for rid, out in got.items():  # logprobs of the target model, as without speculation
        for ea, eb in zip(expected[rid].outputs[0].logprobs, out.outputs[0].logprobs,
                          strict=True):
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)
    stats = spec.get_stats()
    proposed = stats.spec_proposed_tokens - before.spec_proposed_tokens
    accepted = stats.spec_accepted_tokens - before.spec_accepted_tokens
    assert proposed > 0, f"seed={seed}: nothing was proposed"
    if proposer == "oracle":
        assert accepted == proposed
    if proposer == "random":
        assert accepted < proposed


def test_stops_inside_accepted_drafts_and_aborts_and_preemption(engines):
    seed = _fresh_seed()
    prompts = _prompts(seed)
    engine = engines[1]
    preempted = engine.scheduler.num_preemptions
    free = _run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=24,
                                                ignore_eos=True))
    want = {rid: o.outputs[0].token_ids for rid, o in free.items()}
    engine.speculation.proposer = OracleProposer(
        {tuple(p): want[f"r{i}"] for i, p in enumerate(prompts)})
    stop_at = want["r0"][5]
    out = _run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=24,
                                               ignore_eos=True, stop_token_ids=[stop_at]),
               aborts={3: "r2"})
    first = want["r0"].index(stop_at)
    assert out["r0"].outputs[0].token_ids == want["r0"][:first + 1], f"seed={seed}"
    assert out["r0"].outputs[0].finish_reason == "stop"
    assert out["r2"].outputs[0].finish_reason == "abort"
    assert want["r2"][:len(out["r2"].outputs[0].token_ids)] == out["r2"].outputs[0].token_ids
    for rid in ("r1", "r3"):
        toks = out[rid].outputs[0].token_ids
        cut = toks.index(stop_at) + 1 if stop_at in toks else len(toks)
        assert toks == want[rid][:cut], f"seed={seed} {rid}"
    assert engine.scheduler.num_preemptions > preempted, f"seed={seed}"
