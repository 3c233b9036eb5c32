"""Draft-model speculation (`speculative_mode="draft"`) in the engine: greedy output equals
greedy output without speculation, token for token, whatever the draft (the target itself:
every draft accepted; another random model of another family: mostly rejected), with mixed
prompt lengths, chunked prefill, prefix-cache hits, preemption and an abort; no page leaks;
nothing recompiles after warm-up, in the target's runner or the draft's. Plus the
configuration errors. (The draft's KV bookkeeping on its own: test_draft_fill.py.)"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams
from jaxllm.spec.draft import DraftProposer
from tests.spec.conftest import ENGINE

PROMPT_LENGTHS = (3, 9, 20, 40)  # see ENGINE in conftest.py: chunks, splits, preemption


@pytest.fixture(scope="module")
def drafts(spec_engine, draft_dirs):
    """The engine's own draft (the target itself) and a random draft of another family,
    loaded for the same engine (its KV cache on the same page ids) to be swapped in."""
    engine = spec_engine
    parts = SimpleNamespace(model_config=engine.model_config, page_size=engine.page_size,
                            max_model_len=engine.max_model_len, mesh=None,
                            tokenizer=engine.tokenizer)
    config = dataclasses.replace(engine.config, speculative_model=str(draft_dirs["other"]))
    other = DraftProposer.load(config, parts, engine.buckets,
                               engine.scheduler.allocator.num_pages, engine.attention)
    return {"target": engine.speculation.proposer, "other": other}


@contextmanager
def _proposer(engine: LLMEngine, proposer):
    own = engine.speculation.proposer
    engine.speculation.proposer = proposer
    try:
        yield engine
    finally:
        engine.speculation.proposer = own


@contextmanager
def _plain(engine: LLMEngine):
    """The same engine (same programs) without speculation."""
    spec = engine.speculation
    config = spec.config
    spec.config = dataclasses.replace(config, mode="disable", model=None)
    try:
        yield
    finally:
        spec.config = config


def _prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 32, size=n).tolist() for n in PROMPT_LENGTHS]
    prompts[2][:16] = prompts[3][:16]  # two full pages shared with prompt 3 (prefix cache)
    return prompts


def _run(engine: LLMEngine, prompts, params: SamplingParams | list[SamplingParams],
         aborts=None) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(p, params[i] if isinstance(params, list) else params, f"r{i}")
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
    assert len(engine.speculation.proposer) == 0, "draft state of finished requests kept"
    assert engine.runner.recompiles == 0
    assert engine.speculation.proposer.runner.recompiles == 0
    return done


@pytest.mark.parametrize("draft", ["target", "other"])
def test_greedy_with_a_draft_model_equals_greedy(spec_engine, drafts, draft):
    with _proposer(spec_engine, drafts[draft]) as engine:
        _greedy_equals_plain(engine, draft)


def _greedy_equals_plain(engine: LLMEngine, draft: str) -> None:
    assert isinstance(engine.speculation.proposer, DraftProposer)
    prompts = _prompts(seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    start = engine.get_stats().steps_total
    with _plain(engine):
        expected = _run(engine, prompts, params)
    want = {rid: o.outputs[0].token_ids for rid, o in expected.items()}
    before, preempted = engine.get_stats(), engine.scheduler.num_preemptions
    plain_steps = before.steps_total - start
    calls = engine.speculation.proposer.calls
    got = _run(engine, prompts, params)
    assert {rid: o.outputs[0].token_ids for rid, o in got.items()} == want
    for rid, out in got.items():  # the target's logprobs, as without speculation
        for ea, eb in zip(expected[rid].outputs[0].logprobs, out.outputs[0].logprobs,
                          strict=True):
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)
    stats = engine.get_stats()
    proposed = stats.spec_proposed_tokens - before.spec_proposed_tokens
    accepted = stats.spec_accepted_tokens - before.spec_accepted_tokens
    assert proposed > 0 and engine.speculation.proposer.calls > calls
    assert engine.scheduler.num_preemptions > preempted, "no preemption: enlarge the prompts"
    if draft == "target":
        assert accepted == proposed
        assert stats.steps_total - before.steps_total < plain_steps * 0.75
    else:
        assert accepted < proposed / 2


def test_stop_inside_accepted_drafts_and_abort(spec_engine):
    engine = spec_engine
    prompts = _prompts(seed=12)
    params = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    with _plain(engine):
        free = _run(engine, prompts, SamplingParams(**params))
    want = {rid: o.outputs[0].token_ids for rid, o in free.items()}
    stop_at = want["r0"][5]
    out = _run(engine, prompts, SamplingParams(**params, stop_token_ids=[stop_at]),
               aborts={3: "r2"})
    first = want["r0"].index(stop_at)
    assert out["r0"].outputs[0].token_ids == want["r0"][:first + 1]
    assert out["r0"].outputs[0].finish_reason == "stop"
    assert out["r2"].outputs[0].finish_reason == "abort"
    assert want["r2"][:len(out["r2"].outputs[0].token_ids)] == out["r2"].outputs[0].token_ids
    for rid in ("r1", "r3"):
        toks = out[rid].outputs[0].token_ids
        cut = toks.index(stop_at) + 1 if stop_at in toks else len(toks)
        assert toks == want[rid][:cut], rid


def test_requests_that_may_not_speculate_decode_normally(spec_engine, monkeypatch):
    """min_tokens not reached, bad words: no drafts for that request (its constraints change
    within the k + 1 positions), while the others in the same steps speculate."""
    engine = spec_engine
    prompts = _prompts(seed=13)[:3]
    common = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    params = [SamplingParams(**common, min_tokens=6),
              SamplingParams(**common, bad_words_token_ids=[[31, 30]]), SamplingParams(**common)]
    with _plain(engine):
        want = {rid: o.outputs[0].token_ids for rid, o in _run(engine, prompts, params).items()}
    proposer = engine.speculation.proposer
    fill, seen = proposer.fill, []

    def spy(sched):  # (request, output tokens so far) of each speculating row
        seen.extend((s.request.request_id, s.request.num_output_tokens)
                    for s in sched.seqs if s.drafts)
        fill(sched)

    monkeypatch.setattr(proposer, "fill", spy)
    got = {rid: o.outputs[0].token_ids for rid, o in _run(engine, prompts, params).items()}
    assert got == want
    assert {rid for rid, _ in seen} == {"r0", "r2"}
    assert min(n for rid, n in seen if rid == "r0") >= 6


def test_configuration_errors(draft_dirs, tmp_path):
    target = str(draft_dirs["target"])
    with pytest.raises(ValueError, match="no such file"):
        EngineConfig(model=target, speculative_mode="draft",
                     speculative_model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        EngineConfig(model=target, speculative_mode="draft", speculative_model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")  # looks like a model directory, has no weights
    with pytest.raises(ValueError, match="speculative-model"):
        LLMEngine(EngineConfig(model=target, speculative_mode="draft",
                               speculative_model=str(tmp_path), **ENGINE))
    with pytest.raises(ValueError, match="needs"):
        EngineConfig(model=target, speculative_mode="draft")
    (tmp_path / "head.gguf").write_bytes(b"GGUF")  # a draft may be a .gguf, an EAGLE head not
    with pytest.raises(ValueError, match="EAGLE head is a directory"):
        EngineConfig(model=target, speculative_mode="eagle",
                     speculative_model=str(tmp_path / "head.gguf"))
    with pytest.raises(ValueError, match="vocabulary has 8 tokens"):
        LLMEngine(EngineConfig(model=target, speculative_mode="draft",
                               speculative_model=str(draft_dirs["small_vocab"]), **ENGINE))


def test_draft_cache_shares_the_budget_sleeps_and_counts(spec_engine):
    """The KV budget pays for both caches (the draft has as many pages); sleep frees both and
    wake_up restores both; the engine's compile counts include the draft's programs."""
    from jaxllm.cache.kv_cache import bytes_per_page

    engine = spec_engine
    own = bytes_per_page(engine.model_config, engine.page_size, engine.kv_dtype,
                         engine.attention)
    budget = int(engine.config.kv_cache_memory_bytes * engine.config.memory_fraction)
    assert engine._pages_from_budget() == (budget // 2) // own  # the draft is the target
    draft = engine.speculation.draft_runner
    stats = engine.get_stats()
    assert stats.compile_count == engine.runner.compile_count + draft.compile_count
    assert stats.recompile_count == 0
    engine.sleep()
    assert not draft.kv_caches and not engine.runner.kv_caches
    engine.wake_up()
    prompts = _prompts(seed=5)[:2]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with _plain(engine):
        want = {r: o.outputs[0].token_ids for r, o in _run(engine, prompts, params).items()}
    got = _run(engine, prompts, params)
    assert {r: o.outputs[0].token_ids for r, o in got.items()} == want
    assert engine.get_stats().recompile_count == 0
