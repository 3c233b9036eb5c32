"""Mixtral, Qwen3-MoE and Qwen2-MoE, tiny and random, saved with save_pretrained and loaded
through the HF loader: fp32 logits equal PyTorch's, greedy tokens equal HF generate, and the
engine (paged, chunked prefill, mixed batches) equals the plain decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxllm.conversions import load_checkpoint
from jaxllm.llm import LLM
from jaxllm.models import build_model
from jaxllm.models.moe_model import MoeModel
from jaxllm.sampling_params import SamplingParams
from tests.models.moe_tiny import MOE_CONFIGS, make_tiny_moe_model
from tests.oracles.plain_decode import forward_logits, plain_generate


def _seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _saved(tmp_path, kind: str, seed: int, **overrides):
    hf = make_tiny_moe_model(kind, seed, **overrides)
    hf.save_pretrained(tmp_path / kind)
    return hf, tmp_path / kind


@pytest.mark.parametrize("kind", sorted(MOE_CONFIGS))
def test_logits_and_greedy_match_transformers(tmp_path, kind):
    seed = _seed()
    hf, path = _saved(tmp_path, kind, seed)
    cfg, params = load_checkpoint(path, "float32")
    assert cfg.num_experts == MOE_CONFIGS[kind].get("num_experts",
                                                    MOE_CONFIGS[kind].get("num_local_experts"))
    model = build_model(cfg, params, "float32")
    assert isinstance(model, MoeModel)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 9, 23)]
    for p, got in zip(prompts, forward_logits(model, prompts), strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].numpy()
        assert _rel_err(got, ref) < 1e-4, f"seed={seed} len={len(p)} err={_rel_err(got, ref)}"
    ours = plain_generate(model, prompts[1:3], max_new_tokens=6)
    for p, got in zip(prompts[1:3], ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(p):]
        assert got == ref.tolist(), f"seed={seed}"


@pytest.mark.parametrize("kind", ["mixtral"])  # Qwen3-MoE: expert parallel, tests/sharding
def test_engine_greedy_equals_plain_decode(tmp_path, kind):
    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer

    seed = _seed()
    _, path = _saved(tmp_path, kind, seed, vocab_size=512, num_hidden_layers=1)
    load_tokenizer(default_model_path()).save(path)
    cfg, params = load_checkpoint(path, "float32")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 512, size=n).tolist() for n in (5, 17, 1, 30, 9)]
    expected = plain_generate(build_model(cfg, params, "float32"), prompts, max_new_tokens=6)
    llm = LLM(str(path), max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
              page_size=8, prefill_chunk_size=8, dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected, f"seed={seed}"


def test_moe_gguf_is_refused_clearly():
    from jaxllm.models.registry import family_for_gguf

    family = family_for_gguf("qwen3moe")

    class Meta:
        path = "model.gguf"

    with pytest.raises(ValueError, match="mixture-of-experts GGUF"):
        family.config_from_gguf(Meta())


def test_dense_layers_in_moe_config_are_refused():
    from jaxllm.config import ModelConfig

    hf = make_tiny_moe_model("qwen3_moe", 1, num_hidden_layers=1)
    d = {**hf.config.to_dict(), "mlp_only_layers": [0]}
    with pytest.raises(ValueError, match="every layer must be MoE"):
        ModelConfig.from_hf_dict(d)
