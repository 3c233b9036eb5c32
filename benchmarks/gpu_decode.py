"""GPU decode benchmark: a Llama-3-8B-shaped model with random bf16 weights, jaxllm vs HF.

    python benchmarks/gpu_decode.py [--batches 1,64] [--ctx 512] [--skip-hf]
    python benchmarks/gpu_decode.py --tiny --skip-hf   # a small shape: smoke test on CPU

Builds the weights in the script (no hub), runs jaxllm's bucketed decode step (ModelRunner,
paged KV cache, sampler) at each batch size and reports decode tok/s and the achieved fraction
of the device's measured copy bandwidth (bytes a decode step must read: all weights plus the
K/V in use). The peer is HF transformers with the same shape and random bf16 weights on the
same GPU (`generate`, greedy, min_new_tokens = max_new_tokens). jaxllm's figure is its
steady-state decode step at the given context; HF's is `generate`'s wall time per token, which
also carries its prefill and per-token Python overhead — compare them as such.
Not yet run on a GPU (none was lent to the task that wrote it); the --tiny CPU run checks it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from step_fixtures import decode_step_inputs

from jaxllm.cache.kv_cache import allocate_kv_caches
from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.models.params import expected_param_shapes
from jaxllm.runner import ModelRunner
from jaxllm.step_inputs import SamplingTensorBuilder

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
            max_position_embeddings=2048)


def random_params(cfg: ModelConfig, dtype, seed: int) -> dict[str, jax.Array]:
    key = jax.random.PRNGKey(seed)
    params = {}
    for i, (name, shape) in enumerate(sorted(expected_param_shapes(cfg).items())):
        k = jax.random.fold_in(key, i)
        if name.endswith("scale"):
            params[name] = jnp.ones(shape, dtype)
        else:
            params[name] = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    return params


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write), the reference for 'fraction of HBM'."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def run_jaxllm(cfg: ModelConfig, batches: list[int], ctx: int, page: int, dtype) -> dict:
    model = build_model(cfg, random_params(cfg, dtype, 0), dtype)
    num_pages = 2 + max(batches) * -(-ctx // page)
    runner = ModelRunner(model, allocate_kv_caches(cfg, num_pages, page, dtype))
    tensors = SamplingTensorBuilder(cfg.vocab_size)
    weight_bytes = sum(np.prod(s) for s in expected_param_shapes(cfg).values()) * jnp.dtype(dtype).itemsize
    out = {}
    for b in batches:
        arrays = decode_step_inputs(b, ctx, page)
        dummy = tensors.dummy(arrays.attention.kv_lens.shape[0])
        jax.block_until_ready(runner.execute(arrays, dummy)[0])  # compile
        times = []
        for _ in range(10):
            t = time.perf_counter()
            jax.block_until_ready(runner.execute(arrays, dummy)[0])
            times.append(time.perf_counter() - t)
        step = statistics.median(times)
        kv_bytes = b * ctx * 2 * cfg.num_kv_heads * cfg.head_dim * cfg.num_layers * jnp.dtype(dtype).itemsize
        out[b] = {"step_ms": 1e3 * step, "tok_s": b / step, "bytes_per_s": (weight_bytes + kv_bytes) / step}
    return out


def run_hf(spec: dict, batches: list[int], ctx: int, new_tokens: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(LlamaConfig(**spec)).to(device=device, dtype=torch.bfloat16).eval()
    out = {}
    for b in batches:
        ids = torch.randint(0, spec["vocab_size"], (b, ctx - new_tokens), device=device)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            out[b] = {"tok_s": b * new_tokens / (time.perf_counter() - t)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--hf-new-tokens", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="small shape (CPU smoke test)")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    spec = TINY if args.tiny else LLAMA3_8B
    cfg = ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], **spec})
    batches = [int(b) for b in args.batches.split(",")]
    dtype = jnp.bfloat16
    bw = copy_bandwidth(1 << 26 if args.tiny else 1 << 31)
    jl = run_jaxllm(cfg, batches, args.ctx, args.page_size, dtype)
    hf = None if args.skip_hf else run_hf(spec, batches, args.ctx, args.hf_new_tokens)
    print(f"\ndevice: {jax.devices()[0].device_kind}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"shape: {'tiny' if args.tiny else 'Llama-3-8B'} bf16, context {args.ctx}")
    print("| batch | jaxllm tok/s | step ms | fraction of copy bandwidth | HF tok/s | jaxllm/HF |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        r = jl[b]
        h = hf[b]["tok_s"] if hf else None
        print(f"| {b} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | {r['bytes_per_s'] / bw:.0%} | "
              f"{h:.1f} | {r['tok_s'] / h:.2f}x |" if h else
              f"| {b} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | {r['bytes_per_s'] / bw:.0%} | - | - |")


if __name__ == "__main__":
    main()
