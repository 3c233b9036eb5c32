"""Engine-thread time to hand one step's streamed outputs to an asyncio server loop.

    python benchmarks/stream_delivery.py [--streams 256] [--steps 200]

`AsyncEngine._deliver` (one `call_soon_threadsafe` per event loop per step) against its former
way, one `call_soon_threadsafe` per output: each call takes the loop's lock and writes its
wake-up pipe, while the loop, woken, competes for the GIL. The engine thread pays this every
step, beside scheduling and output processing. Consumers are plain tasks awaiting their queues,
as the server's streaming handlers do.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from types import SimpleNamespace

from jaxllm.async_engine import AsyncEngine, _Stream


def run(streams: int, steps: int, batched: bool) -> float:
    """Median engine-thread microseconds per step."""
    times: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queues = {f"r{i}": asyncio.Queue() for i in range(streams)}
        fake = SimpleNamespace(_streams={rid: _Stream(loop, q) for rid, q in queues.items()},
                               _abort_now=lambda rid: None)
        outs = [SimpleNamespace(request_id=rid, finished=False) for rid in queues]

        def engine_thread() -> None:
            for _ in range(steps):
                t = time.perf_counter()
                if batched:
                    AsyncEngine._deliver(fake, outs)
                else:
                    for out in outs:
                        fake._streams[out.request_id].put(out)
                times.append(time.perf_counter() - t)
                time.sleep(0.002)  # the rest of a step

        async def consume(q: asyncio.Queue) -> None:
            while True:
                await q.get()

        tasks = [asyncio.create_task(consume(q)) for q in queues.values()]
        thread = threading.Thread(target=engine_thread)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()

    asyncio.run(main())
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    per_output = run(args.streams, args.steps, batched=False)
    batched = run(args.streams, args.steps, batched=True)
    print(f"| streams | per output us/step | batched us/step | ratio |\n|---|---|---|---|\n"
          f"| {args.streams} | {per_output:.0f} | {batched:.0f} | {per_output / batched:.1f}x |")


if __name__ == "__main__":
    main()
