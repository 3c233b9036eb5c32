"""Load one HF checkpoint onto a mesh of CPU devices by one path; report memory as JSON on stdout.

Run by test_sharded_loading.py in a fresh process with 8 simulated CPU devices:
`python -m tests.conversions.load_memory_worker PATH placed|host DTYPE TP`. "placed" is
jaxllm.conversions.sharded_hf (each device's slices read straight from the file), "host" the
whole checkpoint read to host with load_checkpoint and then split onto the devices (the path
GGUF still takes).

Memory is the process's anonymous resident memory (/proc/self/status RssAnon), sampled every
millisecond by a thread: the file's memory-mapped pages are page cache, not allocations, and
on CPU the device buffers are host memory too, so they are reported (`placed_bytes`) to be
allowed for.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

import jax
import numpy as np


def anon_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """Highest RssAnon seen while running (sampled every `interval` seconds)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.peak, self._stop = anon_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, anon_rss())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())


def main(path: str, mode: str, dtype: str, tp: str) -> None:
    from jaxllm.conversions import load_checkpoint
    from jaxllm.conversions.sharded_hf import load_hf_dir_into
    from jaxllm.models.params import expected_param_shapes
    from jaxllm.parallel import flat_param_shardings, make_mesh

    mesh = make_mesh(int(tp), 1, jax.devices()[:int(tp)])
    jax.device_put(np.ones(1024, np.float32)).block_until_ready()  # runtime warmed up
    before = anon_rss()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if mode == "placed":
            params = load_hf_dir_into(
                path, lambda name, shape: flat_param_shardings({name: shape}, mesh)[name],
                dtype).params
        else:
            from jaxllm.config import ModelConfig

            shapes = expected_param_shapes(ModelConfig.from_file(path))
            shardings = flat_param_shardings(shapes, mesh)
            params = {name: jax.device_put(a, shardings[name])
                      for name, a in load_checkpoint(path, dtype).params.items()}
        jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(
        anon_growth=sampler.peak - before, seconds=seconds,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        placed_bytes=sum(s.data.nbytes for a in params.values() for s in a.addressable_shards),
        checkpoint_bytes=sum(a.nbytes for a in params.values()),
        largest=max(a.nbytes for a in params.values()),
        dtypes=sorted({str(a.dtype) for a in params.values()}))))


if __name__ == "__main__":
    main(*sys.argv[1:5])
