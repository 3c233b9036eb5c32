"""StepInputsBuilder against its reference twin build_step_inputs: random schedules from the
real Scheduler (admissions, finishes, aborts, preemption under a tiny page budget, chunked
prefill, prefix-cache hits, reused request ids, look-ahead steps), every field equal at every
step, and no array handed out earlier changed by a later step. Each row's page list must also
be its request's pages at that step (the decode pass reuses the list it handed out before)."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from jaxllm.buckets import Bucket
from jaxllm.model_inputs import build_step_inputs
from jaxllm.step_layout import StepInputsBuilder
from tests.engine.scheduler_harness import Overlap, make, overlapped_step, prompts, req, run_step


class Twin:
    """Lays every step out both ways and compares; keeps earlier steps' arrays to check
    that later steps never write into them."""

    def __init__(self) -> None:
        self.builder = StepInputsBuilder()
        self.kept: list[tuple[dict, dict]] = []
        self.steps = 0

    def check(self, out, bucket=None) -> None:
        for q in out.seqs:  # each row's pages are its request's now (a reused list included)
            assert q.page_ids == q.request.page_ids[:len(q.page_ids)], (self.steps, q)
            assert len(q.page_ids) == -(-q.kv_len // out.page_size), (self.steps, q)
        want = build_step_inputs(out, bucket).to_flat()
        got = self.builder(out, bucket).to_flat()
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k].dtype == v.dtype, k
            np.testing.assert_array_equal(got[k], v, err_msg=f"{k} at step {self.steps}")
        for arrays, copies in self.kept:
            for k, v in copies.items():
                np.testing.assert_array_equal(arrays[k], v, err_msg=f"{k} changed later")
        self.kept = self.kept[-3:] + [(got, {k: v.copy() for k, v in got.items()})]
        self.steps += 1


def _drive_random(seed: int, overlap: bool) -> Twin:
    rng = np.random.default_rng(seed)
    page_size = int(rng.choice([2, 4]))
    s = make(num_pages=int(rng.integers(26, 60)), page_size=page_size, max_num_seqs=8,
             max_num_batched_tokens=32, max_model_len=64,
             chunk=[None, 3, 8][int(rng.integers(3))],
             prefix_caching=bool(rng.integers(2)), align=bool(rng.integers(2)))
    twin = Twin()
    device_step = s.device.step

    def step(out, prev_sampled=None):
        twin.check(out)
        return device_step(out, prev_sampled)

    s.device.step = step
    shared = prompts(rng, [12])[0]  # a common prefix: prefix-cache hits
    state, count = Overlap(), 0
    for i in range(300):
        if i < 200 and rng.random() < 0.3:
            n = int(rng.integers(1, 3))
            for _ in range(n):
                count += 1
                rid = f"r{int(rng.integers(count))}"  # ids come back after a finish
                if s.sched.get_request(rid) is not None:
                    rid = f"n{count}"
                head = shared[:int(rng.integers(0, 13))] if rng.random() < 0.5 else []
                prompt = head + prompts(rng, [int(rng.integers(1, 20))])[0]
                s.sched.add_request(req(rid, prompt, max_tokens=int(rng.integers(1, 16)),
                                        ignore_eos=bool(rng.integers(2))))
        if not overlap and rng.random() < 0.05 and s.sched.running:
            victim = s.sched.running[int(rng.integers(len(s.sched.running)))]
            s.sched.abort(victim.request_id)
        if not s.sched.has_work() and state.in_flight is None:
            if i >= 200:
                break
            continue
        if overlap:
            overlapped_step(s, state)
        else:
            run_step(s)
    return twin


@pytest.mark.parametrize("overlap", [False, True])
def test_builder_equals_reference_on_random_schedules(overlap):
    for _ in range(12):
        seed = secrets.randbits(32)
        try:
            twin = _drive_random(seed, overlap)
        except AssertionError as e:
            raise AssertionError(f"seed {seed} (overlap={overlap}): {e}") from e
        assert twin.steps > 10, f"seed {seed}: only {twin.steps} steps"


def test_preemption_and_lookahead_are_exercised():
    """The random driver reaches what the twin must survive (a fixed seed, so this is
    a check of the driver, not luck)."""
    preempted = lookahead = 0
    for seed in range(8):
        twin = _drive_random(seed, overlap=seed % 2 == 1)
        assert twin.steps > 10
    s = make(num_pages=16, page_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    twin = Twin()
    for i, p in enumerate(prompts(np.random.default_rng(0), [6, 7, 5, 8])):
        s.sched.add_request(req(f"p{i}", p, max_tokens=12, ignore_eos=True))
    state = Overlap()
    for _ in range(80):
        if not s.sched.has_work() and state.in_flight is None:
            break
        out, _ = overlapped_step(s, state)
        if out is not None:
            twin.check(out)
            preempted += len(out.preempted)
            lookahead += sum(q.prev_row is not None for q in out.seqs)
    assert preempted and lookahead


def test_errors_and_explicit_bucket_match_reference():
    s = make()
    for i, p in enumerate(prompts(np.random.default_rng(3), [9, 5])):
        s.sched.add_request(req(f"e{i}", p, max_tokens=3))
    out, _ = run_step(s)
    twin = Twin()
    twin.check(out, Bucket(16, 4, 4))
    for bucket in (Bucket(8, 4, 4), Bucket(16, 1, 4), Bucket(16, 4, 2)):
        with pytest.raises(ValueError):
            build_step_inputs(out, bucket)
        with pytest.raises(ValueError):
            twin.builder(out, bucket)
    twin.check(out)  # still exact after a refused step
