"""One of two processes running a tiny model across both (jax.distributed on 127.0.0.1, gloo).

Process 0 leads: it broadcasts each step's inputs, both run the same jitted forward over the
2-device mesh (one CPU device per process), and the leader picks greedy tokens and writes
logits and tokens to a JSON file. mode "die": the follower exits right after joining, and
the leader must report FollowerLostError instead of hanging.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import EngineConfig
from jaxllm.models import build_model
from jaxllm.models.dense_attention import DenseMetadata, dense_causal_attention
from jaxllm.parallel import (
    CollectiveWatchdog,
    FollowerLostError,
    StepBroadcaster,
    initialize_distributed,
    make_mesh,
    pad_heads_for_tp,
    place_array,
    shard_model,
)
from tests.oracles.plain_decode import flatten_batch
from tests.sharding.tiny import random_params, smol_shaped_config

SCHEMA = {"ids": (np.int32, 1), "pos": (np.int32, 1), "seg": (np.int32, 1)}


def main(pid: int, port: int, out_path: str, seed: int, mode: str) -> None:
    initialize_distributed(EngineConfig(distributed_coordinator=f"127.0.0.1:{port}",
                                        num_processes=2, process_id=pid))
    leader = pid == 0
    watchdog = CollectiveWatchdog(timeout_s=20 if mode == "run" else 5)
    caster = StepBroadcaster(SCHEMA, leader=leader, watchdog=watchdog)
    if mode == "die" and not leader:
        os._exit(0)
    if mode == "die":
        try:
            caster.send({k: np.zeros(4, np.int32) for k in SCHEMA})
            result = {"lost": None}
        except FollowerLostError as e:
            result = {"lost": str(e)}
        with open(out_path, "w") as f:
            json.dump(result, f)
        os._exit(0)

    cfg = smol_shaped_config()
    cfg, params = pad_heads_for_tp(cfg, random_params(cfg, seed), 2)
    mesh = make_mesh(2, 1)
    model = shard_model(build_model(cfg, params, "float32"), mesh)
    replicated = NamedSharding(mesh, P())

    @nnx.jit
    def forward(model, ids, pos, seg):
        hidden, _ = model(ids, pos, None, DenseMetadata(segment_ids=seg, positions=pos),
                          dense_causal_attention)
        return jax.lax.with_sharding_constraint(model.compute_logits(hidden), replicated)

    def step(inputs):
        args = [place_array(inputs[k], replicated) for k in ("ids", "pos", "seg")]
        return np.asarray(forward(model, *args).addressable_data(0))

    if not leader:
        while (inputs := caster.receive()) is not None:
            step(inputs)
        os._exit(0)

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 90, size=n).tolist() for n in (3, 8)]
    seqs = [list(p) for p in prompts]
    first_logits = None
    for _ in range(4):
        ids, pos, seg = flatten_batch(seqs)
        logits = step(caster.send({"ids": ids, "pos": pos, "seg": seg}))
        ends = np.cumsum([len(s) for s in seqs]) - 1
        if first_logits is None:
            first_logits = [logits[e + 1 - len(s):e + 1].tolist() for s, e in zip(seqs, ends, strict=True)]
        for s, e in zip(seqs, ends, strict=True):
            s.append(int(logits[e].argmax()))
    caster.send_stop()
    with open(out_path, "w") as f:
        json.dump({"prompts": prompts, "logits": first_logits,
                   "tokens": [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]}, f)
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
