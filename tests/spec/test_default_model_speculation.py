"""N-gram speculation on the embedded default model: greedy output equals the cache-free plain
decode, token for token, on copy-heavy prompts (most drafts accepted, verification of a lone
sequence from the forward's logits) and a batch of them (verification from hidden states),
with logprobs of the target model; nothing recompiles after warm-up, no page leaks."""

from __future__ import annotations

import pytest

from benchmarks.spec_prompts import COPY_HEAVY
from jaxllm.llm import LLM
from jaxllm.models import build_model
from jaxllm.sampling_params import SamplingParams
from tests.oracles.plain_decode import plain_generate

pytestmark = pytest.mark.slow

NEW_TOKENS = 24


def test_ngram_speculation_equals_plain_decode_on_default_model():
    from jaxllm.conversions import load_checkpoint
    from jaxllm.default_model import default_model_path

    llm = LLM(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512, num_pages=64,
              speculative_mode="ngram", num_speculative_tokens=7,
              speculative_disable_by_batch_size=None)
    tok = llm.get_tokenizer()
    texts = sorted(COPY_HEAVY.values(), key=len)[:2]
    prompts = [tok.apply_chat_template_ids([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=1)
    alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    together = llm.generate(prompts, params, use_tqdm=False)

    cfg, weights = load_checkpoint(default_model_path(), dtype="float32")
    plain = build_model(cfg, weights, "float32")
    expected = plain_generate(plain, prompts, max_new_tokens=NEW_TOKENS,
                              eos_token_ids=set(llm.engine.eos_token_ids))
    assert [o.outputs[0].token_ids for o in alone] == expected
    assert [o.outputs[0].token_ids for o in together] == expected
    for a, b in zip(alone, together, strict=True):  # the target's logprobs either way
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-3 for t in ea)
    stats = llm.engine.get_stats()
    assert stats.spec_accepted_tokens > NEW_TOKENS  # the copies were mostly proposed and kept
    assert llm.engine.runner.recompiles == 0
    llm.engine.scheduler.check_invariants()
    assert llm.engine.scheduler.allocator.num_used_pages == 0
