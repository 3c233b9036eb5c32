"""The overlapped engine loop produces what the serial loop produces, token for token.

One tiny random model, one mixed workload (staggered arrivals, greedy and seeded sampling,
n > 1, stop strings, stop token ids, penalties, min_tokens, logit bias, bad words, logprobs and
prompt logprobs, aborts mid-flight),
run serially and overlapped; and again under a page budget so small that requests are
preempted. Page invariants are checked after every step; nothing is output after an abort.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=8)


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def _workload(seed: int, stop_text: str | None) -> tuple[dict[int, list], dict[int, str]]:
    """Arrivals by step: (request id, prompt ids, params); aborts by step."""
    rng = np.random.default_rng(seed)

    def prompt(n: int) -> list[int]:
        return rng.integers(3, 512, size=n).tolist()

    greedy = dict(temperature=0.0, max_tokens=14, ignore_eos=True)
    arrivals = {
        0: [("g0", prompt(5), SamplingParams(**greedy)),
            ("s0", prompt(17), SamplingParams(temperature=0.9, top_p=0.9, seed=seed,
                                               max_tokens=12, ignore_eos=True, logprobs=2)),
            ("n2", prompt(9), SamplingParams(n=2, temperature=1.0, seed=seed + 1,
                                             max_tokens=10, ignore_eos=True))],
        1: [("pl", prompt(11), SamplingParams(**greedy, prompt_logprobs=2)),
            ("ab", prompt(13), SamplingParams(**greedy))],
        3: [("pen", prompt(7), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                              repetition_penalty=1.3, presence_penalty=0.5)),
            ("st", prompt(6), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                             stop=[stop_text] if stop_text else None)),
            ("one", prompt(4), SamplingParams(temperature=0.0, max_tokens=1))],
        4: [("con", prompt(10), SamplingParams(
                temperature=0.8, seed=seed + 3, max_tokens=10, min_tokens=6,
                stop_token_ids=[int(rng.integers(3, 512))], logit_bias={7: 5.0, 9: -100.0},
                bad_words_token_ids=[[11], rng.integers(3, 512, size=2).tolist()]))],
        6: [("late", prompt(30), SamplingParams(temperature=0.7, seed=seed + 2, max_tokens=9,
                                                ignore_eos=True)),
            ("tok", prompt(8), SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                              stop_token_ids=[int(rng.integers(3, 512))]))],
    }
    return arrivals, {5: "ab"}


def _drive(engine: LLMEngine, arrivals: dict[int, list], aborts: dict[int, str],
           overlap: bool) -> dict:
    engine.config = dataclasses.replace(engine.config, overlap_scheduling=overlap)
    arrivals = {k: list(v) for k, v in arrivals.items()}
    done, aborted = {}, set()
    for step in range(500):
        for rid, ids, params in arrivals.pop(step, []):
            engine.add_request(ids, params, rid)
        if step in aborts:
            rid = aborts[step]
            done[rid] = engine.abort_request(rid, return_output=True)
            aborted.add(rid)
        if not arrivals and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert out.request_id not in aborted, f"output for {out.request_id} after abort"
            done[out.request_id] = out
        engine.scheduler.check_invariants()
    else:
        raise AssertionError("engine did not drain")
    engine.step()  # completes a look-ahead step still in flight, if any
    assert not engine.scheduler.requests and engine.scheduler.allocator.num_used_pages == 0
    assert engine.runner.recompiles == 0
    return done


def _assert_same(serial: dict, overlapped: dict, where: str) -> None:
    assert serial.keys() == overlapped.keys()
    for rid, a in serial.items():
        b = overlapped[rid]
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            if rid == "ab":  # aborted mid-flight: each run got as far as it got
                short, long = sorted((ca.token_ids, cb.token_ids), key=len)
                assert long[:len(short)] == short, f"{where} {rid}"
                continue
            assert (ca.token_ids, ca.finish_reason, ca.stop_reason, ca.text) == \
                (cb.token_ids, cb.finish_reason, cb.stop_reason, cb.text), f"{where} {rid}"
            if ca.logprobs is not None:
                for ea, eb in zip(ca.logprobs, cb.logprobs, strict=True):
                    assert ea.keys() == eb.keys()
                    assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)
        if a.prompt_logprobs is not None:
            assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
            for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
                assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)


@pytest.mark.parametrize("num_pages", [None, 14])  # 14: preemption under a tiny budget
def test_overlapped_loop_equals_serial_loop(tiny_model_dir, num_pages):
    seed = _fresh_seed()
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_pages=num_pages, **SMALL))
    # A stop string the greedy request "st" really produces: found by a first serial run.
    arrivals, aborts = _workload(seed, None)
    probe = _drive(engine, arrivals, aborts, overlap=False)["st"].outputs[0].text
    stop_text = probe[len(probe) // 2:len(probe) // 2 + 3] or None
    arrivals, aborts = _workload(seed, stop_text)
    serial = _drive(engine, arrivals, aborts, overlap=False)
    preempted = engine.scheduler.num_preemptions
    overlapped = _drive(engine, arrivals, aborts, overlap=True)
    _assert_same(serial, overlapped, f"seed={seed} num_pages={num_pages}")
    if stop_text:
        assert serial["st"].outputs[0].finish_reason == "stop", f"seed={seed}"
    assert serial["one"].outputs[0].finish_reason == "length"
    if num_pages:
        assert engine.scheduler.num_preemptions > preempted > 0, f"seed={seed}"


def test_look_ahead_rows_run_and_are_discarded_when_the_pending_token_ends(tiny_model_dir):
    """Decodes run ahead of their pending token; when that token ends the request (a stop
    token id), the look-ahead row's token is discarded and nothing past the stop is output."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), **SMALL))
    ids = np.random.default_rng(_fresh_seed()).integers(3, 512, size=6).tolist()
    greedy = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request(ids, SamplingParams(**greedy), "probe")
    probe, look_ahead_steps = [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            probe = out.outputs[0].token_ids
        flight = engine._in_flight
        look_ahead_steps += bool(flight and any(s.prev_row is not None
                                                for s in flight.sched.seqs))
    assert look_ahead_steps > 0 and len(probe) == 8
    stop_at = probe[3]
    engine.add_request(ids, SamplingParams(**greedy, stop_token_ids=[stop_at]), "r")
    out = _run_until_done(engine, ["r"])["r"].outputs[0]
    first = probe.index(stop_at)
    assert out.token_ids == probe[:first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == stop_at
    engine.step()
    assert engine.scheduler.allocator.num_used_pages == 0


def _run_until_done(engine: LLMEngine, ids: list[str]) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done
