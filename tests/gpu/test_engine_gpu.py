"""The engine on the GPU with a random float32 checkpoint (tests/gpu/conftest.py): greedy
output equals the plain decode (tests/oracles/plain_decode.py), for the backend's default
attention (the Pallas GPU kernel once it is the default) and the reference."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.conversions import load_checkpoint
from jaxllm.llm import LLM
from jaxllm.models import build_model
from jaxllm.precision import matmul_precision_for
from jaxllm.sampling_params import SamplingParams
from tests.oracles.plain_decode import plain_generate

# Few buckets (each a compile): 4 token buckets x 1 page width.
SMALL = dict(max_num_seqs=16, max_num_batched_tokens=128, max_model_len=256, page_size=16)


@pytest.fixture(scope="module")
def plain_model(random_model_dir):
    cfg, params = load_checkpoint(random_model_dir, dtype="float32")
    return build_model(cfg, params, "float32")


@pytest.mark.parametrize("attention_impl", [None, "reference"])
def test_greedy_equals_plain_decode(random_model_dir, plain_model, attention_impl):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    vocab = plain_model.config.vocab_size
    prompts = [rng.integers(3, vocab, size=int(n)).tolist()
               for n in rng.integers(1, 120, size=12)]
    prompts.append(prompts[0][:9] + [5, 6, 7])  # shares a prefix with prompt 0
    with matmul_precision_for("float32"):
        expected = plain_generate(plain_model, prompts, max_new_tokens=16)
    llm = LLM(str(random_model_dir), attention_impl=attention_impl, **SMALL)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected, f"seed={seed}"
    assert llm.engine.runner.recompiles == 0
    llm.engine.scheduler.check_invariants()
    assert llm.engine.scheduler.allocator.num_used_pages == 0
