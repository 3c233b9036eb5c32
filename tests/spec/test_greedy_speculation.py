"""Greedy speculative decoding with a real (tiny, random) model emits exactly plain greedy
decoding's tokens, whatever proposes: the n-gram proposer, the model itself (everything
accepted) or random drafts (mostly rejected). The target's logits come from the cache-free
forward (tests/oracles/plain_decode.py), so this checks verification, not the engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.models.params import expected_param_shapes
from jaxllm.models.registry import build_model
from jaxllm.sampling_host import build_sampling_tensors
from jaxllm.sampling_params import SamplingParams
from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.ngram import NgramProposer
from jaxllm.spec.rejection import expand_sampling_tensors, rejection_sample
from tests.oracles.plain_decode import forward_logits, plain_generate

K, VOCAB, NEW_TOKENS = 4, 48, 20  # histories + drafts stay within 32 tokens


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=256)
    rng = np.random.default_rng(91)
    params = {name: (np.ones(shape, np.float32) if name.endswith("norm.scale")
                     else (rng.standard_normal(shape) * 0.3).astype(np.float32))
              for name, shape in expected_param_shapes(cfg).items()}
    return build_model(cfg, params, "float32")


_verify = jax.jit(lambda logits, drafts, n, t: rejection_sample(
    logits, drafts, n, expand_sampling_tensors(t, drafts)))


def _speculative_greedy(model, prompt: list[int], propose) -> tuple[list[int], list[tuple]]:
    """Decode NEW_TOKENS greedily, verifying `propose(history, k)` drafts each step."""
    tensors = build_sampling_tensors([SamplingParams(temperature=0.0)], vocab_size=VOCAB)
    history, steps = list(prompt), []
    while len(history) - len(prompt) < NEW_TOKENS:
        k = min(K, NEW_TOKENS - (len(history) - len(prompt)) - 1)
        drafts = [int(t) for t in propose(history, k)][:k]
        logits = forward_logits(model, [history + drafts])[0][len(history) - 1:]
        padded = np.zeros((1, K + 1, VOCAB), np.float32)
        padded[0, :len(drafts) + 1] = logits
        draft_row = np.zeros((1, K), np.int32)
        draft_row[0, :len(drafts)] = drafts
        out = _verify(jnp.asarray(padded), jnp.asarray(draft_row),
                      jnp.asarray([len(drafts)], jnp.int32), tensors)
        accepted = int(out.num_accepted[0])
        emitted = np.asarray(out.token_ids)[0, :accepted + 1].tolist()
        steps.append((len(drafts), accepted))
        history += emitted
    return history[len(prompt):], steps


def test_greedy_speculation_emits_the_plain_greedy_tokens(model):
    rng = np.random.default_rng(92)
    proposer = NgramProposer(SpeculativeConfig(mode="ngram", ngram_min=1, ngram_max=3))
    ngram_steps = []
    for case in range(2):
        prompt = rng.integers(0, VOCAB, int(rng.integers(5, 9))).tolist()
        want = plain_generate(model, [prompt], NEW_TOKENS)[0]
        rid = f"case{case}"

        def oracle(history, k, prompt=prompt, want=want):
            done = len(history) - len(prompt)
            return want[done:done + k]

        def noise(history, k):
            return rng.integers(0, VOCAB, k)

        by_proposer = {
            "ngram": _speculative_greedy(
                model, prompt, lambda h, k, rid=rid: proposer.propose(rid, h, k)),
            "target": _speculative_greedy(model, prompt, oracle),
            "random": _speculative_greedy(model, prompt, noise),
        }
        for name, (got, _) in by_proposer.items():
            assert got == want, f"{name} proposals changed the greedy output"
        target_steps = by_proposer["target"][1]
        assert all(accepted == proposed for proposed, accepted in target_steps)
        assert len(target_steps) <= -(-NEW_TOKENS // (K + 1)) + 1
        random_steps = by_proposer["random"][1]
        assert sum(a for _, a in random_steps) < sum(p for p, _ in random_steps) / 2
        ngram_steps += by_proposer["ngram"][1]
    assert any(0 < a for _, a in ngram_steps), "no n-gram draft accepted: vacuous"
    assert any(a < p for p, a in ngram_steps), "no n-gram draft rejected: vacuous"
