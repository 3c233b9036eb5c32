"""One of two processes serving a tiny model across both with the multi-host engine.

Process 0 leads (create_async_engine -> LeaderAsyncEngine): it generates greedily for the
prompts, writes the outputs to `<out>.tokens.json`, then polls check_health until it fails
(the test kills the follower after seeing the tokens file) and writes `<out>.health.json`.
Process 1 runs run_follower until the leader stops or the process is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from jaxllm.config import EngineConfig
from jaxllm.errors import EngineDeadError
from jaxllm.parallel import initialize_distributed
from tests.sharding.engine_parallel_worker import ENGINE, _serve, prompts_for


async def lead(config: EngineConfig, out: str, prompts: list) -> None:
    from jaxllm.dp_engine import create_async_engine

    engine = await create_async_engine(config)
    tokens = await _serve(engine, prompts)
    await engine.check_health()
    with open(out + ".tokens.json.tmp", "w") as f:
        json.dump({"tokens": tokens, "prompts": prompts}, f)
    os.replace(out + ".tokens.json.tmp", out + ".tokens.json")
    start, error = time.monotonic(), None
    while time.monotonic() - start < 60:
        try:
            await engine.check_health()
        except EngineDeadError as e:
            error = str(e)
            break
        await asyncio.sleep(0.1)
    # Time from the kill (the test writes <out>.killed with its wall clock) to unhealthy.
    killed_at = None
    if os.path.exists(out + ".killed"):
        killed_at = float(open(out + ".killed").read())
    with open(out + ".health.json", "w") as f:
        json.dump({"error": error, "detected_after_s": time.time() - killed_at
                   if killed_at else None}, f)


def main(pid: int, port: int, out: str, seed: int, model: str) -> None:
    config = EngineConfig(model=model, tensor_parallel_size=2, distributed_coordinator=
                          f"127.0.0.1:{port}", num_processes=2, process_id=pid, **ENGINE)
    initialize_distributed(config)
    if pid == 0:
        asyncio.run(lead(config, out, prompts_for(seed)))
    else:
        from jaxllm.multihost import run_follower

        run_follower(config)
    os._exit(0)  # skip jax.distributed's shutdown barrier: the peer is gone by design


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
