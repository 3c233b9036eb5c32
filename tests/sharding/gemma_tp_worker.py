"""Gemma 2 / Gemma 3 under tensor parallelism on 2 simulated CPU devices: the engine's greedy
tokens equal the single-device plain decode. Run by test_gemma_tp.py in a subprocess (the
device count is fixed when jax starts); prints one JSON line with the results."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(seed: int) -> None:
    import jax

    from jaxllm.conversions import load_checkpoint
    from jaxllm.default_model import default_model_path
    from jaxllm.llm import LLM
    from jaxllm.models import build_model
    from jaxllm.sampling_params import SamplingParams
    from jaxllm.tokenizer import load_tokenizer
    from tests.models.gemma_tiny import GEMMA_CONFIGS, make_tiny_gemma_model
    from tests.oracles.plain_decode import plain_generate

    assert len(jax.devices()) == 2, jax.devices()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for kind in sorted(GEMMA_CONFIGS):
            path = Path(d) / kind
            make_tiny_gemma_model(kind, seed, vocab_size=512).save_pretrained(path)
            load_tokenizer(default_model_path()).save(path)
            cfg, params = load_checkpoint(path, "float32")
            rng = np.random.default_rng(seed)
            prompts = [rng.integers(3, 512, size=n).tolist() for n in (5, 17, 30, 9)]
            expected = plain_generate(build_model(cfg, params, "float32"), prompts,
                                      max_new_tokens=6)
            llm = LLM(str(path), tensor_parallel_size=2, max_num_seqs=8,
                      max_num_batched_tokens=64, max_model_len=256, page_size=8,
                      prefill_chunk_size=8, dtype="float32")
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6,
                                                        ignore_eos=True), use_tqdm=False)
            results[kind] = {"got": [o.outputs[0].token_ids for o in outs],
                             "expected": expected,
                             "recompiles": llm.engine.runner.recompiles}
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]))
