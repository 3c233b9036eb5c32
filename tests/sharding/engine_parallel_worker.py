"""Engine-level tensor / data parallel runs on 8 simulated CPU devices; writes one JSON record.

Invoked by test_engine_parallel.py in a subprocess (the device count is fixed when jax
starts). Records greedy outputs and the placements actually found on the engine's arrays; the
test file asserts on them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback

import jax
from flax import nnx

from jaxllm import LLM, SamplingParams
from jaxllm.config import EngineConfig
from jaxllm.dp_engine import DataParallelEngine, create_async_engine

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, num_pages=32)


def prompts_for(seed: int) -> list:
    """Mixed token-id prompts (the tiny vocabulary is smaller than the tokenizer's): one
    token, short, medium, and one longer than a prefill chunk (16 tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = [1, int(rng.integers(2, 6)), int(rng.integers(6, 16)), int(rng.integers(17, 30))]
    return [rng.integers(3, 500, size=n).tolist() for n in lengths]


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def spec_of(arr) -> list:
    spec = list(getattr(arr.sharding, "spec", ()))  # one device: SingleDeviceSharding
    return spec + [None] * (arr.ndim - len(spec))


def placements(runner) -> dict:
    params = {}
    for path, var in nnx.state(runner.state, nnx.Param).flat_state():
        arr = var[...]
        params[".".join(str(p) for p in path)] = spec_of(arr)
    cache = runner.kv_caches[0]
    return dict(params=params, cache_spec=spec_of(cache), cache_shape=list(cache.shape),
                cache_shard=list(cache.addressable_shards[0].data.shape),
                devices=sorted(d.id for d in cache.sharding.device_set))


def tp_case(model: str, tp: int, prompts: list) -> dict:
    llm = LLM(model, tensor_parallel_size=tp, **ENGINE)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    eng = llm.engine
    return dict(tokens=[o.outputs[0].token_ids for o in outs],
                heads=[eng.model_config.num_heads, eng.model_config.num_kv_heads],
                recompiles=eng.get_stats().recompile_count, **placements(eng.runner))


async def _serve(engine, prompts: list) -> list:
    async def one(i, p):
        last = None
        async for out in engine.generate(p, greedy(), f"r{i}"):
            last = out
        return last.outputs[0].token_ids
    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def dp_case(model: str, prompts: list) -> dict:
    config = EngineConfig(model=model, tensor_parallel_size=2, data_parallel_size=2, **ENGINE)

    async def run() -> dict:
        engine = await create_async_engine(config)
        assert isinstance(engine, DataParallelEngine)
        try:
            tokens = await _serve(engine, prompts * 2)
            await engine.check_health()
            per_replica = [s.generation_tokens_total for s in engine.replica_stats()]
            total = engine.get_stats().generation_tokens_total
            devices = [placements(r.engine.runner)["devices"] for r in engine.replicas]
            return dict(tokens=tokens, per_replica=per_replica, total=total, devices=devices)
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def llm_rejects_dp(model: str) -> dict:
    try:
        LLM(model, data_parallel_size=2, **ENGINE)
    except ValueError as e:
        return dict(error_message=str(e))
    return dict(error_message=None)


def main(out_path: str, seed: int, llama: str, mqa: str) -> None:
    assert jax.device_count() == 8, jax.device_count()
    prompts = prompts_for(seed)
    cases = {
        "llama_tp1": lambda: tp_case(llama, 1, prompts),
        "llama_tp2": lambda: tp_case(llama, 2, prompts),
        "llama_tp4": lambda: tp_case(llama, 4, prompts),  # 2 KV heads over 4 devices
        "mqa_tp1": lambda: tp_case(mqa, 1, prompts),
        "mqa_tp2": lambda: tp_case(mqa, 2, prompts),  # 1 KV head, untied LM head
        "llama_dp2_tp2": lambda: dp_case(llama, prompts),
        "llm_dp": lambda: llm_rejects_dp(llama),
    }
    results: dict = {"seed": seed, "prompts": prompts}
    for name, fn in cases.items():
        try:
            results[name] = fn()
        except Exception:  # recorded, asserted on by the test
            results[name] = {"error": traceback.format_exc()}
    with open(out_path, "w") as f:
        json.dump(results, f)


def smollm2_main(out_path: str) -> None:
    """The embedded default model (9 q / 3 KV heads) at TP=1 and TP=2, chat prompts, greedy."""
    tokens = {}
    for tp in (1, 2):
        llm = LLM(None, tensor_parallel_size=tp, **ENGINE)
        outs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}],
                         [{"role": "user", "content": "Name three colors."}]],
                        greedy(8), use_tqdm=False)
        tokens[tp] = [o.outputs[0].token_ids for o in outs]
        del llm
    with open(out_path, "w") as f:
        json.dump({"tp1": tokens[1], "tp2": tokens[2]}, f)


if __name__ == "__main__":
    if sys.argv[1] == "smollm2":
        smollm2_main(sys.argv[2])
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
