"""The engine on the embedded default model equals the plain decode, token for token."""

from __future__ import annotations

import pytest

from jaxllm.llm import LLM
from jaxllm.models import build_model
from jaxllm.sampling_params import SamplingParams
from tests.oracles.plain_decode import plain_generate

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a color.",
             "Write one sentence about the moon.", "What is 12 times 12?", "Say hello in Spanish."]


@pytest.mark.parametrize("activations", ["float32", "bfloat16", "int8"])
def test_engine_greedy_equals_plain_decode_on_default_model(activations):
    """float32: the plain decode runs dequantized dense weights (the kept blocks are exact).
    bfloat16 / int8 activations: the plain decode runs the same blocks with the same rounding."""
    from jaxllm.kernels.native_build import quantized_matmul_available

    if activations != "float32" and not quantized_matmul_available():
        pytest.skip("weights stay dense without the native kernel: nothing to round")
    llm = LLM(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512, num_pages=64,
              prefill_chunk_size=32, quantized_activations=activations)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, logprobs=0),
                        use_tqdm=False)

    from jaxllm.conversions import load_checkpoint
    from jaxllm.models.quantized_layers import QuantizedMatmulOptions

    rounded = activations != "float32"
    cfg, params = load_checkpoint(llm.engine.config.model or _default(), dtype="float32",
                                  keep_blocks=rounded)
    plain = build_model(cfg, params, "float32", QuantizedMatmulOptions(precision=activations))
    expected = plain_generate(plain, prompts, max_new_tokens=24,
                              eos_token_ids=set(llm.engine.eos_token_ids))
    got = [o.outputs[0].token_ids for o in outs]
    if activations == "int8":
        _assert_near_plain_decode(plain, prompts, outs)
    else:
        assert got == expected
    for o in outs:
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)
    assert llm.engine.runner.recompiles == 0
    llm.engine.scheduler.check_invariants()
    assert llm.engine.scheduler.allocator.num_used_pages == 0


def _assert_near_plain_decode(plain, prompts, outs) -> None:
    """int8 activations: quantizing x is discontinuous, so the last-bit differences between the
    engine's attention and the plain decode's (summation order) can move an x across a rounding
    boundary and flip a near-tie; token-for-token equality is not a property. Teacher-forced
    instead: on the engine's own output, each chosen token is the plain decode's best or within
    a near-tie of it, and its log-probability agrees with the plain decode's (measured: worst
    gap 0.19 nats, worst difference 0.20 over 5 x 24 tokens; a wrong cache or position would
    be off by nats)."""
    import numpy as np

    from tests.oracles.plain_decode import forward_logits

    worst_gap = worst_diff = 0.0
    for p, o in zip(prompts, outs, strict=True):
        ids = o.outputs[0].token_ids
        logits = forward_logits(plain, [p + ids])[0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for j, (tok, entry) in enumerate(zip(ids, o.outputs[0].logprobs, strict=True)):
            row = logp[len(p) - 1 + j]
            worst_gap = max(worst_gap, float(row.max() - row[tok]))
            worst_diff = max(worst_diff, abs(entry[tok].logprob - float(row[tok])))
    print(f"int8: worst gap to the plain best {worst_gap:.3f}, logprob diff {worst_diff:.3f}")
    assert worst_gap < 0.6 and worst_diff < 0.6, (worst_gap, worst_diff)


def _default():
    from jaxllm.default_model import default_model_path

    return default_model_path()
