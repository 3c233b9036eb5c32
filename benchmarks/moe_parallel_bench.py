"""Expert parallel vs tensor parallel inside experts on 8 simulated CPU devices: one 32-token
MoE forward (the batch-32 decode step's MLP work), same model, same inputs.

    python -m benchmarks.moe_parallel_bench [--experts 32] [--top-k 4] [--tp 8]

(sets its own 8 simulated devices by re-running itself with XLA_FLAGS). The two rules: "expert"
on `model` (each device holds E / tp whole experts) and "expert" replicated with "expert_mlp"
on `model` (each device holds every expert's 1/tp slice). Both reduce with one psum per layer.
Simulated devices share the host's cores: the ratio says which layout XLA CPU runs better,
not how real chips scale.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def measure(experts: int, top_k: int, tp: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.moe_bench import shape
    from jaxllm.models import build_model
    from jaxllm.parallel import DEFAULT_LOGICAL_RULES, ShardingRules, make_mesh, shard_model
    from tests.oracles.plain_decode import _forward_all
    from tests.sharding.tiny import random_params

    cfg = shape(experts, top_k)
    params = random_params(cfg, 0)
    mesh = make_mesh(tp, 1, jax.devices()[:tp])
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, 32), jnp.int32)
    pos = jnp.arange(32, dtype=jnp.int32)
    seg = jnp.arange(32, dtype=jnp.int32)  # 32 one-token sequences: a decode-sized batch
    rules = {"expert parallel": ShardingRules(),
             "TP inside experts": ShardingRules({**DEFAULT_LOGICAL_RULES, "expert": None})}
    print(f"| layout ({experts} experts, top-{top_k}, tp={tp}) | ms per forward |\n|---|---|")
    for name, r in rules.items():
        model = shard_model(build_model(cfg, params, "float32"), mesh, r)
        with jax.set_mesh(mesh):
            _forward_all(model, ids, pos, seg).block_until_ready()
            times = []
            for _ in range(10):
                start = time.perf_counter()
                _forward_all(model, ids, pos, seg).block_until_ready()
                times.append(time.perf_counter() - start)
        print(f"| {name} | {1e3 * sorted(times)[len(times) // 2]:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        measure(args.experts, args.top_k, args.tp)
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.tp}")
    subprocess.run([sys.executable, "-m", "benchmarks.moe_parallel_bench", "--inner",
                    "--experts", str(args.experts), "--top-k", str(args.top_k),
                    "--tp", str(args.tp)], env=env, check=True)


if __name__ == "__main__":
    main()
