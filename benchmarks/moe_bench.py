"""Batch-32 greedy decode of a small random mixture-of-experts model: jaxllm `LLM.generate`
against HF transformers `generate`, same checkpoint, same prompts, same run.

    python -m benchmarks.moe_bench [--dir /tmp/jaxllm-moe-bench] [--batch 32]
        [--prompt-len 16] [--output-len 32] [--experts 32] [--top-k 4]

The model is Qwen3-MoE-shaped and scaled to CPU (Qwen3-30B-A3B: hidden 2048, 48 layers, 128
experts, top-8, expert width 768): hidden 768, 6 layers, --experts of width 256, --top-k,
16/4 heads of 64, vocab 16384; random float32 weights written as HF safetensors. EOS is
ignored so every request makes exactly --output-len tokens; both sides compute in float32.
Prints one table: output tokens/s of each, and jaxllm's start-up (load + warm-up).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jaxllm.config import ModelConfig
from tests.conversions.random_hf_dir import write_random_hf_dir


def shape(experts: int, top_k: int) -> ModelConfig:
    return ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=16384, hidden_size=768,
                       intermediate_size=2048, num_layers=6, num_heads=16, num_kv_heads=4,
                       head_dim=64, qk_norm=True, rms_norm_eps=1e-6, num_experts=experts,
                       num_experts_per_tok=top_k, moe_intermediate_size=256,
                       norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1e6)


def run_jaxllm(path: Path, prompts: list[list[int]], output_len: int) -> dict:
    from jaxllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(str(path), dtype="float32", max_num_seqs=len(prompts), max_model_len=256,
              max_num_batched_tokens=max(64, len(prompts) * len(prompts[0])))
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                 use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(tok_s=tokens / seconds, seconds=seconds, startup=startup,
                tokens=[o.outputs[0].token_ids for o in outs])


def run_hf(path: Path, prompts: list[list[int]], output_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  eos_token_id=None, max_new_tokens=output_len, min_new_tokens=output_len)
    with torch.no_grad():
        model.generate(ids[:2], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2,
                                   "attention_mask": torch.ones_like(ids[:2])})
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    return dict(tok_s=new.numel() / seconds, seconds=seconds, tokens=new.tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/jaxllm-moe-bench")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    args = p.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").is_file():
        from jaxllm.default_model import default_model_path
        from jaxllm.tokenizer import load_tokenizer

        write_random_hf_dir(path, shape(args.experts, args.top_k), seed=0, dtype="float32")
        load_tokenizer(default_model_path()).save(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 16000, size=args.prompt_len).tolist() for _ in range(args.batch)]
    ours = run_jaxllm(path, prompts, args.output_len)
    hf = run_hf(path, prompts, args.output_len)
    same = sum(a == b for a, b in zip(ours["tokens"], hf["tokens"], strict=True))
    print(f"| engine | output tok/s | decode seconds | start-up s |\n|---|---|---|---|\n"
          f"| jaxllm | {ours['tok_s']:.1f} | {ours['seconds']:.2f} | {ours['startup']:.1f} |\n"
          f"| transformers | {hf['tok_s']:.1f} | {hf['seconds']:.2f} | - |\n"
          f"greedy continuations identical: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
