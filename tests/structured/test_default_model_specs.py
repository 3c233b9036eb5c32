"""The structured-output test set on the default model: every output of 22 JSON schemas and
10 regexes parses and validates, greedy and at temperature 1 with two seeds, in one batched
`LLM.generate` call; and each output is a complete match by llguidance's own check.
Slow: loads the 135M model."""

from __future__ import annotations

import pytest

from jaxllm.sampling_params import SamplingParams
from jaxllm.structured.compiler import grammar_accepts
from tests.structured.cases import REGEXES, SCHEMAS, all_specs, prompt_for, satisfies

pytestmark = pytest.mark.slow


def test_every_output_of_the_spec_set_validates(default_llm):
    assert len(SCHEMAS) >= 20 and len(REGEXES) >= 10
    llm = default_llm
    tok = llm.get_tokenizer()
    prompts, params, specs = [], [], []
    for spec in all_specs():
        ids = tok.apply_chat_template_ids([{"role": "user", "content": prompt_for(spec)}])
        for sampling in (dict(temperature=0.0), dict(temperature=1.0, seed=1),
                         dict(temperature=1.0, seed=2)):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=200, structured_outputs=spec, **sampling))
            specs.append((spec, sampling))
    outs = llm.generate(prompts, params, use_tqdm=False)
    bad = []
    for out, (spec, sampling) in zip(outs, specs, strict=True):
        c = out.outputs[0]
        if c.finish_reason != "stop" or not satisfies(spec, c.text) or not grammar_accepts(
                llm.engine.grammars, spec, c.token_ids):
            bad.append((spec.cache_key, sampling, c.finish_reason, c.text))
    assert not bad, bad
    assert llm.engine.scheduler.allocator.num_used_pages == 0
