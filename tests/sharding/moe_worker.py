"""Mixture-of-experts models sharded on 8 simulated CPU devices; one JSON record per case.

Invoked by test_moe_parallel.py in a subprocess (the device count is fixed when jax
starts). Expert parallel (whole experts per device), tensor parallel inside experts, an
expert count the mesh does not divide, and Qwen2-MoE's shared expert: logits and greedy
tokens against the same model on one device, and where each expert weight landed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import traceback

import jax
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.parallel import (
    DEFAULT_LOGICAL_RULES,
    ShardingRules,
    make_mesh,
    pad_heads_for_tp,
    shard_model,
)
from tests.oracles.plain_decode import forward_logits, plain_generate
from tests.sharding.tiny import random_params

# Whole experts kept on one device; each expert's hidden width split over `model` instead.
IN_EXPERT_TP = ShardingRules({**DEFAULT_LOGICAL_RULES, "expert": None})


def moe_config(architecture: str, experts: int, top_k: int, shared: int = 0) -> ModelConfig:
    return ModelConfig(architecture=architecture, vocab_size=96, hidden_size=32,
                       intermediate_size=24 if architecture == "MixtralForCausalLM" else 64,
                       num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, num_experts=experts, num_experts_per_tok=top_k,
                       moe_intermediate_size=24, norm_topk_prob=architecture != "Qwen3MoeForCausalLM",
                       shared_expert_intermediate_size=shared, qk_norm="Qwen3" in architecture,
                       qkv_bias="Qwen2" in architecture, max_position_embeddings=128)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def case(cfg: ModelConfig, tp: int, seed: int, prompts, rules: ShardingRules | None = None) -> dict:
    params = random_params(cfg, seed)
    for name in params:  # decisive routing: no near-ties for rounding to flip
        if name.endswith("router.kernel"):
            params[name] = params[name] * 8
    ref = build_model(cfg, params, "float32")
    ref_logits = forward_logits(ref, prompts)
    ref_tokens = plain_generate(ref, prompts, max_new_tokens=4)
    mesh = make_mesh(tp, 1, jax.devices()[:tp])
    pcfg, pparams = pad_heads_for_tp(cfg, params, tp)
    model = build_model(pcfg, pparams, "float32")
    model = shard_model(model, mesh) if rules is None else shard_model(model, mesh, rules)
    with jax.set_mesh(mesh):
        logits = forward_logits(model, prompts)
        tokens = plain_generate(model, prompts, max_new_tokens=4)
    specs = {}
    for path, var in nnx.state(model, nnx.Param).flat_state():
        name = ".".join(str(p) for p in path)
        if "layers.0.moe" in name:
            arr = var[...]
            spec = list(arr.sharding.spec) + [None] * (arr.ndim - len(arr.sharding.spec))
            specs[name.split(".")[-1]] = [spec, list(arr.addressable_shards[0].data.shape)]
    return dict(logits_err=max(rel_err(a, b) for a, b in zip(logits, ref_logits, strict=True)),
                tokens_equal=tokens == ref_tokens, tokens=tokens, ref_tokens=ref_tokens,
                specs=specs)


def placed_case(cfg: ModelConfig, tp: int, seed: int, directory: str) -> dict:
    """An HF checkpoint read straight into its shards equals the host load, and lands where
    the rules say (jaxllm.conversions.sharded_hf)."""
    from jaxllm.conversions import load_checkpoint
    from jaxllm.conversions.sharded_hf import load_hf_dir_into
    from jaxllm.parallel import flat_param_shardings
    from tests.conversions.random_hf_dir import write_random_hf_dir

    path = write_random_hf_dir(f"{directory}/placed", cfg, seed, "bfloat16", max_shard_bytes=40_000)
    mesh = make_mesh(tp, 1, jax.devices()[:tp])
    placed = load_hf_dir_into(
        path, lambda name, shape: flat_param_shardings({name: shape}, mesh)[name], "float32").params
    host = load_checkpoint(path, "float32").params
    want = flat_param_shardings({k: v.shape for k, v in host.items()}, mesh)
    return dict(
        mismatched=sorted(k for k in host if not np.array_equal(np.asarray(placed[k]), host[k])),
        misplaced=sorted(k for k in host if not placed[k].sharding.is_equivalent_to(
            want[k], host[k].ndim)),
        gate_spec=list(want["layers.0.experts.gate_kernel"].spec))


def engine_case(cfg: ModelConfig, tp: int, seed: int, directory: str, prompts) -> dict:
    """The engine (paged attention, chunked prefill, expert parallel over `tp` devices, weights
    read straight into shards) against the plain decode of the unsharded model."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.conversions import load_checkpoint
    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer
    from tests.conversions.random_hf_dir import write_random_hf_dir

    path = write_random_hf_dir(f"{directory}/engine", cfg, seed)
    load_tokenizer(default_model_path()).save(path)
    c, params = load_checkpoint(path, "float32")
    expected = plain_generate(build_model(c, params, "float32"), prompts, max_new_tokens=5)
    llm = LLM(str(path), tensor_parallel_size=tp, max_num_seqs=4, max_num_batched_tokens=16,
              max_model_len=64, page_size=8, prefill_chunk_size=8, dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)
    gate = llm.engine.runner.state["layers"][0]["moe"]["gate_w"][...]
    return dict(tokens=[o.outputs[0].token_ids for o in outs], ref_tokens=expected,
                gate_spec=list(gate.sharding.spec))


def main(out_path: str, seed: int) -> None:
    assert jax.device_count() == 8, jax.device_count()
    directory = tempfile.mkdtemp(prefix="moe_worker_")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 96, size=n).tolist() for n in (1, 6, 11)]
    mixtral = moe_config("MixtralForCausalLM", 8, 2)
    qwen3 = moe_config("Qwen3MoeForCausalLM", 8, 3)
    cases = {
        "mixtral_ep8": lambda: case(mixtral, 8, seed, prompts),
        "qwen3_ep4": lambda: case(qwen3, 4, seed, prompts),
        "qwen3_in_expert_tp4": lambda: case(qwen3, 4, seed, prompts, IN_EXPERT_TP),
        "mixtral_6_experts_tp4": lambda: case(moe_config("MixtralForCausalLM", 6, 2), 4, seed, prompts),
        "qwen2_shared_ep2": lambda: case(moe_config("Qwen2MoeForCausalLM", 4, 2, shared=16), 2,
                                         seed, prompts),
        "placed_qwen3_ep4": lambda: placed_case(qwen3, 4, seed, directory),
        "placed_mixtral_6_experts_tp4": lambda: placed_case(
            moe_config("MixtralForCausalLM", 6, 2), 4, seed, directory),
        # 4 KV heads split over 4 devices as they are: read straight into shards.
        "engine_qwen3_ep4": lambda: engine_case(dataclasses.replace(qwen3, num_kv_heads=4), 4,
                                                seed, directory, prompts),
    }
    results = {}
    for name, fn in cases.items():
        try:
            results[name] = fn()
        except Exception:  # recorded, asserted on by the test
            results[name] = {"error": traceback.format_exc()}
    results["seed"] = seed
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
