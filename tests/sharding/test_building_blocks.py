"""Rules, mesh errors, the data-parallel balancer and the multi-host helpers, on one device."""

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import EngineConfig
from jaxllm.parallel import (
    CollectiveWatchdog,
    FollowerLostError,
    HeartbeatMonitor,
    LoadBalancer,
    ShardingRules,
    StepBroadcaster,
    initialize_distributed,
    make_mesh,
    shard_attention,
)


def test_default_rules_column_row_vocab_parallel():
    rules = ShardingRules()
    assert rules.partition_spec(("embed", "q_heads")) == P(None, "model")
    assert rules.partition_spec(("q_heads", "embed")) == P("model", None)
    assert rules.partition_spec(("mlp", "embed")) == P("model", None)
    assert rules.partition_spec(("vocab", "embed")) == P("model", None)
    assert rules.partition_spec(("embed",)) == P(None)
    assert rules.partition_spec(("pages", "page_slot", "kv_heads", "head_dim")) == P(None, None, "model", None)


def test_uneven_dimension_is_replicated_and_axis_used_once():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    rules = ShardingRules({"vocab": "model", "embed": "model"})
    assert rules.partition_spec(("vocab", "embed"), (8, 4), mesh) == P("model", None)
    fake = type("M", (), {"shape": {"data": 1, "model": 3}})()
    assert rules.partition_spec(("vocab", "embed"), (97, 6), fake) == P(None, "model")


def test_rules_naming_missing_mesh_axis_is_an_error():
    mesh = make_mesh(1, 1)
    with pytest.raises(ValueError, match="'expert'"):
        ShardingRules({"mlp": "expert"}).partition_spec(("mlp",), (4,), mesh)


def test_make_mesh_checks_device_count():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"needs {2 * n} devices, but {n} are available"):
        make_mesh(2, n)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        make_mesh(0, 1)
    mesh = make_mesh(1, n)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": n, "model": 1}


def test_shard_attention_rejects_heads_that_do_not_split():
    fake_mesh = type("M", (), {"shape": {"model": 2}})()
    wrapped = shard_attention(lambda *a, **k: a[:2], fake_mesh)
    q = np.zeros((3, 3, 4), np.float32)
    with pytest.raises(ValueError, match="pad_heads_for_tp"):
        wrapped(q, q, q, None, None)


class FakeEngine:
    def __init__(self, load):
        self.load = load


def test_balancer_picks_least_loaded_and_rotates_ties():
    engines = [FakeEngine(3), FakeEngine(1), FakeEngine(1), FakeEngine(5)]
    lb = LoadBalancer(engines, lambda e: e.load)
    picks = []
    for _ in range(6):
        e = lb.pick()
        picks.append(engines.index(e))
        e.load += 1  # the request lands there
    # 1 and 2 tie at 1, then at 2; engine 0 joins at 3.
    assert picks[:4] == [1, 2, 1, 2]
    assert sorted(picks[4:]) == [0, 1] or sorted(picks[4:]) == [0, 2]
    assert max(e.load for e in engines[:3]) - min(e.load for e in engines[:3]) <= 1


def test_balancer_spreads_random_loads_evenly():
    rng = np.random.default_rng()
    engines = [FakeEngine(int(x)) for x in rng.integers(0, 5, size=5)]
    lb = LoadBalancer(engines, lambda e: e.load)
    for _ in range(40):
        lb.pick().load += 1
    loads = [e.load for e in engines]
    assert max(loads) - min(loads) <= 1
    with pytest.raises(ValueError):
        LoadBalancer([], lambda e: 0)


def test_initialize_distributed_single_process_is_noop_and_validates():
    assert initialize_distributed(EngineConfig()) is False
    with pytest.raises(ValueError, match="HOST:PORT"):
        initialize_distributed(EngineConfig(num_processes=2))
    with pytest.raises(ValueError, match="process_id"):
        initialize_distributed(EngineConfig(num_processes=2, process_id=2,
                                            distributed_coordinator="127.0.0.1:1"))


SCHEMA = {"ids": (np.int32, 1), "pages": (np.int32, 2), "temps": (np.float32, 1)}


def test_step_broadcaster_roundtrip_through_a_fake_wire():
    """Leader and follower threads exchange through a fake two-party broadcast."""
    barrier = threading.Barrier(2)
    slot = {}

    def broadcast(tree, is_source):
        if is_source:
            slot["v"] = jax.tree.map(np.copy, tree)
        barrier.wait(timeout=10)
        out = slot["v"]
        assert jax.tree.map(np.shape, out) == jax.tree.map(np.shape, tree)  # followers pre-sized
        barrier.wait(timeout=10)
        return out

    rng = np.random.default_rng()
    steps = [{"ids": rng.integers(0, 99, n).astype(np.int32),
              "pages": rng.integers(0, 9, (n, 3)).astype(np.int32),
              "temps": rng.random(n).astype(np.float32)} for n in (4, 16, 8)]
    got = []

    def follower():
        fb = StepBroadcaster(SCHEMA, leader=False, broadcast=broadcast)
        while (step := fb.receive()) is not None:
            got.append(step)

    t = threading.Thread(target=follower)
    t.start()
    lb = StepBroadcaster(SCHEMA, leader=True, broadcast=broadcast)
    for s in steps:
        lb.send(s)
    lb.send_stop()
    t.join(10)
    assert len(got) == len(steps)
    for a, b in zip(got, steps, strict=True):
        for k in SCHEMA:
            np.testing.assert_array_equal(a[k], b[k])


def test_step_broadcaster_validates_inputs():
    with pytest.raises(ValueError, match="64-bit"):
        StepBroadcaster({"x": (np.int64, 1)}, leader=True)
    lb = StepBroadcaster(SCHEMA, leader=True)
    with pytest.raises(ValueError, match="missing"):
        lb.send({"ids": np.zeros(3, np.int32)})
    with pytest.raises(ValueError, match="rank"):
        lb.send({"ids": np.zeros((3, 1), np.int32), "pages": np.zeros((3, 2), np.int32),
                 "temps": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="followers"):
        lb.receive()


def test_watchdog_turns_a_hang_into_a_clear_error_and_stays_unhealthy():
    dog = CollectiveWatchdog(timeout_s=0.2)
    assert dog.run(lambda x: x + 1, 1) == 2
    release = threading.Event()
    with pytest.raises(FollowerLostError, match="follower process is dead or stuck"):
        dog.run(release.wait, 30, what="broadcast step inputs")
    assert not dog.healthy
    with pytest.raises(FollowerLostError):
        dog.run(lambda: 1)
    release.set()


class FakeKV:
    def __init__(self):
        self.d = {}

    def key_value_increment(self, key, inc):
        self.d[key] = self.d.get(key, 0) + inc
        return self.d[key]

    def key_value_try_get(self, key):
        if key not in self.d:
            raise KeyError(key)
        return str(self.d[key])


def test_heartbeat_monitor_names_silent_followers():
    now = [0.0]
    kv = FakeKV()
    mon = HeartbeatMonitor(3, client=kv, clock=lambda: now[0])
    follower = HeartbeatMonitor(3, client=kv)
    follower.beat(1)
    follower.beat(2)
    assert mon.silent_followers(5.0) == []
    now[0] = 4.0
    follower.beat(1)
    assert mon.silent_followers(5.0) == []
    now[0] = 7.0
    follower.beat(1)
    assert mon.silent_followers(5.0) == [2]
    with pytest.raises(FollowerLostError, match=r"\[2\]"):
        mon.check(5.0)


def test_heartbeat_thread_beats():
    kv = FakeKV()
    stop = HeartbeatMonitor(2, client=kv).start_beating(1, 0.01)
    time.sleep(0.1)
    stop.set()
    assert kv.d["jaxllm/heartbeat/1"] >= 2


def test_flat_param_shardings_for_loaders():
    from jaxllm.parallel import flat_param_shardings

    mesh = make_mesh(1, jax.device_count())
    sh = flat_param_shardings({"layers.0.q_proj.kernel": (8, 12), "final_norm.scale": (8,),
                               "layers.3.down_proj.kernel": (6, 8)}, mesh)
    assert sh["layers.0.q_proj.kernel"].spec == P(None, "model")
    assert sh["final_norm.scale"].spec == P(None)
    assert sh["layers.3.down_proj.kernel"].spec == P("model", None)
