"""AsyncEngine's delivery: a step's outputs reach their streams (one wake-up per event loop),
every one of them, in order, and a stream whose event loop closed is aborted, not leaked."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest

from jaxllm.async_engine import AsyncEngine, _Stream
from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=8)


@pytest.fixture(scope="module")
def async_engine(tiny_model_dir):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_model_dir), **SMALL)))
    yield engine
    asyncio.run(engine.shutdown())


def _record_steps(engine: AsyncEngine) -> list:
    """Wrap the engine's step: the list of what each step returned, in order."""
    steps: list = []
    step = engine.engine.step

    def recorded():
        outs = step()
        steps.append(outs)
        return outs

    engine.engine.step = recorded
    return steps


def _assert_no_leaks(engine: LLMEngine) -> None:
    engine.scheduler.check_invariants()
    assert not engine.scheduler.requests
    assert engine.scheduler.allocator.num_used_pages == 0


def test_every_stream_receives_exactly_its_step_outputs_in_order(async_engine):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    steps = _record_steps(async_engine)
    n = int(rng.integers(12, 20))  # more than max_num_seqs: some wait, arrivals stagger
    prompts = [rng.integers(3, 500, int(rng.integers(1, 40))).tolist() for _ in range(n)]
    lengths = [int(rng.integers(1, 24)) for _ in range(n)]

    async def one(i: int) -> list:
        await asyncio.sleep(float(rng.uniform(0, 0.05)))
        params = SamplingParams(temperature=0.0, max_tokens=lengths[i], ignore_eos=True)
        return [out async for out in async_engine.generate(prompts[i], params, f"s{seed}-{i}")]

    async def main() -> list[list]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    try:
        received = asyncio.run(main())
    finally:
        del async_engine.engine.step  # (the instance attribute; the method again)
    for i, outs in enumerate(received):
        rid = f"s{seed}-{i}"
        sent = [o for step in steps for o in step if o.request_id == rid]
        assert len(outs) == len(sent) and all(map(lambda a, b: a is b, outs, sent)), (seed, i)
        assert outs[-1].finished and not any(o.finished for o in outs[:-1]), (seed, i)
        assert len(outs[-1].outputs[0].token_ids) == lengths[i], (seed, i)
        ids = [o.outputs[0].token_ids for o in outs]
        assert all(b[:len(a)] == a for a, b in pairwise(ids)), (seed, i)  # cumulative
    _assert_no_leaks(async_engine.engine)


def test_a_stream_whose_event_loop_closed_is_aborted(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    orphan_loop = asyncio.new_event_loop()
    agen = async_engine.generate([5, 6, 7], params, "orphan")
    first = orphan_loop.run_until_complete(agen.__anext__())
    assert not first.finished
    orphan_loop.close()  # its consumer is gone without closing the stream

    async def survivor() -> list:
        short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        return [o async for o in async_engine.generate([9, 10, 11], short, "survivor")]

    outs = asyncio.run(asyncio.wait_for(survivor(), 60))  # the engine serves the others
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 8
    deadline = time.monotonic() + 30
    while "orphan" in async_engine.engine.scheduler.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "orphan" not in async_engine.engine.scheduler.requests  # aborted, pages freed
    asyncio.run(async_engine.wait_for_requests_to_drain(30))
    assert async_engine.is_healthy
    _assert_no_leaks(async_engine.engine)
    asyncio.new_event_loop().run_until_complete(agen.aclose())  # (its abort finds nothing)


class _StubLoop:
    """Records call_soon_threadsafe calls (or raises like a closed loop)."""

    def __init__(self, closed: bool = False) -> None:
        self.calls: list = []
        self.closed = closed

    def call_soon_threadsafe(self, fn, *args):
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.calls.append((fn, args))


def test_a_steps_outputs_wake_each_event_loop_once():
    loops = [_StubLoop(), _StubLoop(), _StubLoop(closed=True)]
    queues = {f"r{i}": asyncio.Queue() for i in range(7)}
    streams = {rid: _Stream(loops[i % 3], q) for i, (rid, q) in enumerate(queues.items())}
    aborted: list[str] = []
    fake = SimpleNamespace(_streams=dict(streams), _abort_now=aborted.append)
    outs = [SimpleNamespace(request_id=rid, finished=rid in ("r0", "r5"))
            for rid in ("r3", "r0", "r1", "r6", "r2", "r5", "gone")]
    AsyncEngine._deliver(fake, outs)
    for loop in loops[:2]:
        assert len(loop.calls) == 1  # one wake-up per loop per step
        fn, (items,) = loop.calls[0]
        expected = [o for o in outs if o.request_id in streams
                    and streams[o.request_id].loop is loop]
        assert [item for _, item in items] == expected  # in the step's order
        assert all(q is queues[o.request_id] for q, o in items)
        fn(items)
        for o in expected:
            assert queues[o.request_id].get_nowait() is o
    assert sorted(aborted) == ["r2"]  # the closed loop's unfinished stream; r5 had finished
    assert set(fake._streams) == set(streams) - {"r0", "r5"}  # finished streams forgotten
