"""The experts' grouped MLP (jaxllm.models.moe) against a per-token loop twin: both impls,
ragged routings, one device's share of the experts, and the router's normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.moe import GROUPED_IMPLS, block_rows, expert_mlp, route
from tests.sharding.tiny import fresh_seed


def _twin(x, weights, ids, gate, up, down) -> np.ndarray:
    """Sum over each token's routes of weight x silu(x @ gate) * (x @ up) @ down, float64."""
    out = np.zeros((x.shape[0], down.shape[-1]))
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t], strict=True):
            g, u = x[t] @ gate[e], x[t] @ up[e]
            out[t] += w * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return out


@pytest.mark.parametrize("impl", GROUPED_IMPLS)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 2), (13, 6, 2), (70, 16, 4)])
def test_expert_mlp_matches_loop_twin(impl, tokens, experts, top_k):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    h, i = 24, 40
    x = rng.standard_normal((tokens, h))
    gate, up = rng.standard_normal((2, experts, h, i)) / np.sqrt(h)
    down = rng.standard_normal((experts, i, h)) / np.sqrt(i)
    logits = rng.standard_normal((tokens, experts)) * 3
    weights, ids = route(jnp.asarray(logits, jnp.float32), top_k, normalize=bool(rng.integers(2)))
    w64, ids_np = np.asarray(weights, np.float64), np.asarray(ids)
    ref = _twin(x, w64, ids_np, gate, up, down)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, gate, up, down)]
    got = np.asarray(jax.jit(lambda x, w, d, g, u, dn: expert_mlp(x, w, d, g, u, dn, jax.nn.silu, impl))(
        f32[0], weights, ids, *f32[1:]))
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-5 * scale, f"seed={seed}"
    # One device's share: experts [first, first + share) only; the shares add up to the whole.
    share = experts // 2
    parts = [np.asarray(expert_mlp(f32[0], weights, ids, f32[1][s:s + share], f32[2][s:s + share],
                                   f32[3][s:s + share], jax.nn.silu, impl, s, experts))
             for s in (0, share)]
    assert np.abs(parts[0] + parts[1] - ref).max() < 1e-5 * scale, f"seed={seed}"


def test_routing_normalisations():
    rng = np.random.default_rng(fresh_seed())
    logits = rng.standard_normal((9, 7)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :3]
    w, ids = route(jnp.asarray(logits), 3, normalize=False)
    np.testing.assert_array_equal(np.asarray(ids), top)
    np.testing.assert_allclose(np.asarray(w), np.take_along_axis(probs, top, -1), rtol=1e-5)
    w, _ = route(jnp.asarray(logits), 3, normalize=True)  # Mixtral: softmax over the top-k logits
    sel = np.take_along_axis(logits, top, -1)
    np.testing.assert_allclose(np.asarray(w), np.exp(sel) / np.exp(sel).sum(-1, keepdims=True),
                               rtol=1e-5)


def test_block_rows():
    assert block_rows(1, 128) == 8 and block_rows(512, 16) == 32 and block_rows(10_000, 2) == 64
