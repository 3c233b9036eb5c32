"""The verification that reads the forward's logits (`layout.in_logits`: the step's LM head ran
on the verified positions, `logits_indices_for`) against its twin that runs the LM head on
the hidden states itself: the same tokens, acceptances and logprobs on random hidden states,
ragged drafts and seeded temperature-1 and greedy rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxllm.cache.kv_cache import allocate_kv_caches
from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.models.params import expected_param_shapes
from jaxllm.runner import ForwardOutput, ModelRunner
from jaxllm.sampling_host import build_sampling_tensors
from jaxllm.sampling_params import SamplingParams
from jaxllm.spec.verify_layout import build_verify_layout, fits_in_logits, logits_indices_for

VOCAB, HIDDEN = 64, 32


def _runner(seed: int) -> ModelRunner:
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                      intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in expected_param_shapes(cfg).items()}
    model = build_model(cfg, params, "float32")
    return ModelRunner(model, allocate_kv_caches(cfg, 4, 4, "float32"),
                       attention_impl="reference", max_rows=8)


def test_verification_from_logits_equals_verification_from_hidden():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    runner = _runner(seed)
    model = runner._model(runner.state_leaves)
    k, logits_rows, tokens = 3, 16, 24
    for _ in range(3):
        # ragged rows: some speculate (1..k drafts), some decode plainly (0 drafts)
        n = int(rng.integers(1, 5))
        drafts = [rng.integers(0, VOCAB, int(rng.integers(0, k + 1))).tolist() for _ in range(n)]
        lengths = [len(d) + 1 for d in drafts]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
        layout = build_verify_layout([int(s) for s in starts], drafts, range(n), k, rows=4)
        assert fits_in_logits(4, k, logits_rows)
        hidden = jnp.asarray(rng.standard_normal((tokens, HIDDEN)).astype(np.float32))
        logits = model.compute_logits(hidden[logits_indices_for(layout, logits_rows)])
        params = [SamplingParams(temperature=float(rng.choice([0.0, 1.0, 0.7])),
                                 seed=int(rng.integers(1 << 30)), logprobs=3)
                  for _ in range(n)]
        tensors = build_sampling_tensors(params, vocab_size=VOCAB, num_rows=4)
        forward = ForwardOutput(logits, hidden)
        from_hidden = runner.fetch(runner.verify(forward, layout, tensors))
        layout.in_logits = True
        from_logits = runner.fetch(runner.verify(forward, layout, tensors))
        np.testing.assert_array_equal(from_logits.token_ids, from_hidden.token_ids,
                                      err_msg=f"seed={seed}")
        np.testing.assert_array_equal(from_logits.top_ids, from_hidden.top_ids)
        np.testing.assert_allclose(from_logits.logprobs, from_hidden.logprobs, atol=1e-5)
        assert (from_hidden.token_ids[:n] >= 0).any(axis=1).all()  # every row emitted a token
