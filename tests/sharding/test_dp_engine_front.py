"""DataParallelEngine's routing on fake replicas (no model): balance, abort, stats, health."""

from __future__ import annotations

import asyncio
import random

import pytest

from jaxllm.dp_engine import DataParallelEngine
from jaxllm.engine import EngineStats
from jaxllm.errors import EngineDeadError


class FakeReplica:
    """Streams `steps` outputs per request; records what it was asked."""

    def __init__(self, steps: int, stats: EngineStats) -> None:
        self.engine_config = self.model_config = self.tokenizer = None
        self.model_name, self.max_model_len = "fake", 64
        self.steps, self.stats = steps, stats
        self.seen: list[str] = []
        self.aborted: list[str] = []
        self.dead = False
        self.release = asyncio.Event()

    async def generate(self, prompt, params, request_id, **kw):
        self.seen.append(request_id)
        for i in range(self.steps):
            await self.release.wait()
            yield (request_id, i)

    async def abort(self, request_id):
        self.aborted.append(request_id)
        return True

    async def check_health(self):
        if self.dead:
            raise EngineDeadError("replica loop crashed")

    @property
    def is_healthy(self):
        return not self.dead

    def get_stats(self):
        return self.stats


def _stats(rng) -> EngineStats:
    return EngineStats(num_running=rng.randint(0, 9), num_waiting=rng.randint(0, 9),
                       generation_tokens_total=rng.randint(0, 999), page_usage=rng.random(),
                       steps_total=rng.randint(0, 99))


def test_routes_by_load_aborts_on_owner_and_aggregates():
    rng = random.Random()
    replicas = [FakeReplica(rng.randint(1, 4), _stats(rng)) for _ in range(3)]
    front = DataParallelEngine(replicas)

    async def run():
        async def consume(rid):
            return [x async for x in front.generate([1], None, rid)]

        tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(6)]
        await asyncio.sleep(0.01)
        # Six live requests over three idle replicas: two each, and each knows its owner.
        assert sorted(len(r.seen) for r in replicas) == [2, 2, 2]
        owner = front.replica_of("r4")
        assert "r4" in replicas[owner].seen
        assert await front.abort("r4") and replicas[owner].aborted == ["r4"]
        assert all(not r.aborted for i, r in enumerate(replicas) if i != owner)
        assert not await front.abort("unknown")
        with pytest.raises(ValueError, match="already in use"):
            await anext(front.generate([1], None, "r0"))
        for r in replicas:
            r.release.set()
        outs = await asyncio.gather(*tasks)
        assert all(len(o) >= 1 for o in outs)
        assert front.replica_of("r4") is None  # finished requests are forgotten

    asyncio.run(run())
    total = front.get_stats()
    for name in ("num_running", "num_waiting", "generation_tokens_total", "steps_total"):
        assert getattr(total, name) == sum(getattr(r.stats, name) for r in replicas)
    assert total.page_usage == pytest.approx(sum(r.stats.page_usage for r in replicas) / 3)


def test_one_dead_replica_makes_the_front_unhealthy():
    replicas = [FakeReplica(1, EngineStats()) for _ in range(2)]
    front = DataParallelEngine(replicas)
    asyncio.run(front.check_health())
    replicas[1].dead = True
    assert not front.is_healthy
    with pytest.raises(EngineDeadError, match="replica 1"):
        asyncio.run(front.check_health())
