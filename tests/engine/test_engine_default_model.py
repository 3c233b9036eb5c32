"""The engine on the embedded default model equals the plain decode, token for token."""

from __future__ import annotations

import pytest

from jaxllm.llm import LLM
from jaxllm.models import build_model
from jaxllm.plain_decode import plain_generate
from jaxllm.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a color.",
             "Write one sentence about the moon.", "What is 12 times 12?", "Say hello in Spanish."]


@pytest.mark.parametrize("activations", ["float32", "bfloat16"])
def test_engine_greedy_equals_plain_decode_on_default_model(activations):
    """float32: the plain decode runs dequantized dense weights (the kept blocks are exact).
    bfloat16 activations: the plain decode runs the same blocks with the same rounding."""
    from jaxllm.kernels.native_build import quantized_matmul_available

    if activations == "bfloat16" and not quantized_matmul_available():
        pytest.skip("weights stay dense without the native kernel: nothing to round")
    llm = LLM(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512, num_pages=64,
              prefill_chunk_size=32, quantized_activations=activations)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)

    from jaxllm.conversions import load_checkpoint
    from jaxllm.models.quantized_layers import QuantizedMatmulOptions

    rounded = activations == "bfloat16"
    cfg, params = load_checkpoint(llm.engine.config.model or _default(), dtype="float32",
                                  keep_blocks=rounded)
    plain = build_model(cfg, params, "float32", QuantizedMatmulOptions(precision=activations))
    expected = plain_generate(plain, prompts, max_new_tokens=24,
                              eos_token_ids=set(llm.engine.eos_token_ids))
    assert [o.outputs[0].token_ids for o in outs] == expected
    for o, e in zip(outs, expected, strict=True):
        assert o.outputs[0].text == tok.decode(e, skip_special_tokens=True)
    assert llm.engine.runner.recompiles == 0
    llm.engine.scheduler.check_invariants()
    assert llm.engine.scheduler.allocator.num_used_pages == 0


def _default():
    from jaxllm.default_model import default_model_path

    return default_model_path()
