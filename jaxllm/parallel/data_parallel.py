"""Data parallelism: one engine per `data` slice, and a front that balances requests by load.

Decision: each `data` index of the mesh runs its own engine (own KV pages, own scheduler and
prefix cache, own jitted step on a [1, tp] sub-mesh), and a front sends every new request to
the least-loaded engine. The alternative, one SPMD program whose batch and pages are split
over `data`, was rejected because:

* the slices would run in lockstep: every step has the same bucketed shape on every slice, so
  a slice with two decodes pays for its neighbour's 512-token prefill chunk, and one slice's
  stall (preemption, long prompt) stalls all;
* pages and the prefix cache are per-slice state anyway (a page lives on one slice's
  devices), so a shared scheduler would have to partition them by hand and still balance;
* independent engines need no cross-slice collective per step, fail independently, and reuse
  the single-engine code unchanged (a DP=1 engine is the same object).

What it costs: requests cannot move between slices after admission (a prefix cached on one
slice does not help another; the balancer could prefer the slice holding a prefix later), and
parameters are replicated per slice, as they would be under SPMD data parallelism too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

E = TypeVar("E")


class LoadBalancer(Generic[E]):
    """Picks the engine with the least load; ties rotate so equal engines share the work.

    `load_of(engine)` is any number where smaller means less busy, e.g. waiting + running
    requests, or tokens still to compute. Thread-safe: the server may admit concurrently.
    """

    def __init__(self, engines: Sequence[E], load_of: Callable[[E], float]) -> None:
        if not engines:
            raise ValueError("LoadBalancer needs at least one engine")
        self.engines = list(engines)
        self._load_of = load_of
        self._next = 0
        self._lock = threading.Lock()

    def pick_index(self) -> int:
        """Index of the engine the next request should go to."""
        with self._lock:
            n = len(self.engines)
            loads = [float(self._load_of(e)) for e in self.engines]
            best = min(loads)
            # First least-loaded engine at or after the rotating start position.
            order = [(self._next + i) % n for i in range(n)]
            chosen = next(i for i in order if loads[i] == best)
            self._next = (chosen + 1) % n
            return chosen

    def pick(self) -> E:
        return self.engines[self.pick_index()]
