"""Multi-host building blocks: start jax.distributed, broadcast step inputs, notice lost followers.

The engine runs multi-controller SPMD: process 0 (the leader) owns HTTP, tokenizer and
scheduler; every process runs the same jitted step on its own devices. Each step the leader
broadcasts the step's host inputs (token ids, positions, page tables ...) and the followers
feed them to the same step. A broadcast is two collectives: a small fixed-size header (a
control word and every field's shape, so followers can allocate) and then the arrays.

A dead follower makes collectives block, so the leader runs them under a CollectiveWatchdog:
a deadline turns a hang into FollowerLostError and the leader reports itself unhealthy from
then on. Followers can also publish heartbeats in the coordination service's key-value store
(HeartbeatMonitor), which the leader checks before a step to fail fast.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from jaxllm.config import EngineConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

_CONTROL_STEP = 1
_CONTROL_STOP = 0


def initialize_distributed(config: EngineConfig, *, cpu_collectives: str = "gloo",
                           initialization_timeout_s: int = 300,
                           heartbeat_timeout_s: int = 100) -> bool:
    """Join the process group described by `config`; False (no-op) for a single process.

    Must run before anything touches a JAX backend. On CPU, cross-process collectives need an
    implementation (gloo ships with jaxlib).
    """
    if config.num_processes == 1 and config.distributed_coordinator is None:
        return False
    if config.num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {config.num_processes}")
    if not 0 <= config.process_id < config.num_processes:
        raise ValueError(f"process_id must be in [0, {config.num_processes}), "
                         f"got {config.process_id}")
    coordinator = config.distributed_coordinator
    if not coordinator or ":" not in coordinator:
        raise ValueError("distributed_coordinator must be HOST:PORT when num_processes > 1, "
                         f"got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    logger.info("joining %d processes at %s as process %d", config.num_processes,
                coordinator, config.process_id)
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=config.num_processes,
        process_id=config.process_id, initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True


def is_leader() -> bool:
    return jax.process_index() == 0


class FollowerLostError(RuntimeError):
    """A follower stopped answering: the leader cannot run steps any more."""


class CollectiveWatchdog:
    """Runs blocking cross-process calls with a deadline; one miss makes it unhealthy for good.

    A timed-out call keeps running in its daemon thread (a collective cannot be cancelled);
    the process is expected to be restarted once unhealthy.
    """

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.error is None

    def run(self, fn: Callable[..., T], *args: Any, what: str = "collective") -> T:
        if self.error is not None:
            raise FollowerLostError(self.error)
        result: list[Any] = []
        failure: list[BaseException] = []

        def target() -> None:
            try:
                result.append(fn(*args))
            except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
                failure.append(e)

        worker = threading.Thread(target=target, name=f"jaxllm-{what}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            self.error = (f"{what} did not complete within {self.timeout_s:g}s: a follower "
                          "process is dead or stuck; restart the process group")
            logger.error(self.error)
            raise FollowerLostError(self.error)
        if failure:
            self.error = f"{what} failed: {failure[0]!r}"
            raise FollowerLostError(self.error) from failure[0]
        return result[0]


def _default_broadcast(tree: Any, is_source: bool) -> Any:
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree, is_source=is_source)


class StepBroadcaster:
    """Leader -> followers transfer of one step's host inputs (a dict of numpy arrays).

    `schema` names every field with its dtype and rank; shapes may change step to step
    (bucketed). The leader calls send(inputs) / send_stop(); followers call receive(), which
    returns the same dict, or None once the leader stopped.
    """

    def __init__(self, schema: Mapping[str, tuple[Any, int]], *, leader: bool,
                 watchdog: CollectiveWatchdog | None = None,
                 broadcast: Callable[[Any, bool], Any] = _default_broadcast) -> None:
        if not schema:
            raise ValueError("schema must name at least one field")
        self.schema = {k: (np.dtype(dt), int(nd)) for k, (dt, nd) in schema.items()}
        for name, (dt, _) in self.schema.items():
            if dt.kind not in "iuf" or dt.itemsize > 4:
                raise ValueError(f"field {name!r}: dtype {dt} cannot be broadcast; use 32-bit "
                                 "int or float (64-bit values are truncated without jax_enable_x64)")
        self.leader = leader
        self.watchdog = watchdog
        self._broadcast = broadcast
        self._header_len = 1 + sum(nd for _, nd in self.schema.values())

    def _run(self, tree: Any, what: str) -> Any:
        if self.watchdog is None:
            return self._broadcast(tree, self.leader)
        return self.watchdog.run(self._broadcast, tree, self.leader, what=what)

    def _header(self, control: int, inputs: Mapping[str, np.ndarray] | None) -> np.ndarray:
        header = np.zeros(self._header_len, np.int32)
        header[0] = control
        if inputs is not None:
            shapes = [s for name in self.schema for s in np.shape(inputs[name])]
            header[1:] = shapes
        return header

    def send(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.leader:
            raise ValueError("send() is for the leader; followers call receive()")
        missing = sorted(set(self.schema) - set(inputs))
        extra = sorted(set(inputs) - set(self.schema))
        if missing or extra:
            raise ValueError(f"step inputs do not match the schema: missing {missing}, "
                             f"unexpected {extra}")
        arrays = {}
        for name, (dt, nd) in self.schema.items():
            a = np.asarray(inputs[name])
            if a.ndim != nd:
                raise ValueError(f"field {name!r} has rank {a.ndim}, schema says {nd}")
            arrays[name] = a.astype(dt, copy=False)
        self._run(self._header(_CONTROL_STEP, arrays), "broadcast step header")
        return self._run(arrays, "broadcast step inputs")

    def send_stop(self) -> None:
        if not self.leader:
            raise ValueError("send_stop() is for the leader")
        self._run(self._header(_CONTROL_STOP, None), "broadcast stop")

    def receive(self) -> dict[str, np.ndarray] | None:
        if self.leader:
            raise ValueError("receive() is for followers; the leader calls send()")
        header = np.asarray(self._run(self._header(_CONTROL_STOP, None), "receive header"))
        if int(header[0]) == _CONTROL_STOP:
            return None
        shapes, off = {}, 1
        for name, (_, nd) in self.schema.items():
            shapes[name] = tuple(int(s) for s in header[off:off + nd])
            off += nd
        blank = {name: np.zeros(shapes[name], dt) for name, (dt, _) in self.schema.items()}
        return dict(self._run(blank, "receive step inputs"))


def _coordination_client() -> Any:
    """The jax.distributed key-value client (jax private API, isolated here)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized (call initialize_distributed)")
    return client


class HeartbeatMonitor:
    """Followers bump a counter in the coordination service; the leader watches it move.

    Counters, not timestamps, so host clocks need not agree: the leader notes, on its own
    monotonic clock, when it last saw each follower's counter change.
    """

    def __init__(self, num_processes: int, *, prefix: str = "jaxllm/heartbeat",
                 client: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.num_processes = num_processes
        self.prefix = prefix
        self._client = client
        self._clock = clock
        self._seen: dict[int, tuple[int, float]] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _coordination_client()
        return self._client

    def beat(self, process_id: int) -> None:
        """Called by a follower, periodically (e.g. every step and from a timer)."""
        self.client.key_value_increment(f"{self.prefix}/{process_id}", 1)

    def start_beating(self, process_id: int, interval_s: float) -> threading.Event:
        """Beat from a daemon thread every interval_s; set the returned event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.beat(process_id)
                stop.wait(interval_s)

        threading.Thread(target=loop, name="jaxllm-heartbeat", daemon=True).start()
        return stop

    def _count(self, pid: int) -> int:
        try:
            return int(self.client.key_value_try_get(f"{self.prefix}/{pid}"))
        except Exception:  # noqa: BLE001 -- not yet written: treated as count 0
            return 0

    def silent_followers(self, max_silence_s: float) -> list[int]:
        """Followers whose counter has not moved for more than max_silence_s (leader side)."""
        now = self._clock()
        silent = []
        for pid in range(1, self.num_processes):
            count = self._count(pid)
            last = self._seen.get(pid)
            if last is None or count != last[0]:
                self._seen[pid] = (count, now)
            elif now - last[1] > max_silence_s:
                silent.append(pid)
        return silent

    def check(self, max_silence_s: float) -> None:
        """Raise FollowerLostError naming silent followers."""
        silent = self.silent_followers(max_silence_s)
        if silent:
            raise FollowerLostError(
                f"follower process(es) {silent} sent no heartbeat for more than "
                f"{max_silence_s:g}s; the leader is unhealthy")
