"""The Pallas GPU kernel compiled on the GPU (not interpret mode) against the reference and the
float64 oracle: every case of tests/kernels/test_pallas_kernels.py, plus random ragged batches
at engine-like sizes (fresh seeds). float32 inputs must be computed without TF32 (1e-5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import ragged_paged_attention
from tests.kernels.ragged_cases import fresh_rng, make_case, oracle, rel_err, rel_norm_err
from tests.kernels.test_pallas_kernels import CASES


def _check(case, dtype, tol: float, **opts) -> None:
    out, cache = ragged_paged_attention(*case.args(dtype), sm_scale=case.sm_scale, impl="gpu",
                                        **opts)
    ref_out, ref_cache = ragged_paged_attention(*case.args(dtype), sm_scale=case.sm_scale,
                                                impl="reference", **opts)
    real = int(case.cu_q_lens[int(case.num_seqs.reshape(-1)[0])])
    assert out.dtype == dtype and out.shape == case.q.shape
    assert np.all(np.isfinite(np.asarray(out.astype(jnp.float32))))
    assert np.all(np.asarray(out[real:].astype(jnp.float32)) == 0.0)  # padding tokens
    # fp32: max-norm; bf16: relative L2 (a lone output rounding flip is ~4e-3 in max-norm).
    err = rel_err if dtype == jnp.float32 else rel_norm_err
    ref = np.asarray(ref_out[:real].astype(jnp.float32), np.float64)
    assert err(out[:real], ref) <= tol, "vs reference"
    want_out, want_cache = oracle(case, dtype, **opts)
    assert err(out[:real], want_out[:real]) <= (1e-5 if dtype == jnp.float32 else 1e-2), "vs oracle"
    np.testing.assert_array_equal(np.asarray(cache.astype(jnp.float32), np.float64), want_cache)
    np.testing.assert_array_equal(np.asarray(cache.astype(jnp.float32)),
                                  np.asarray(ref_cache.astype(jnp.float32)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_kernel_case(name):
    seqs, hq, hkv, dim, page_size, dtype, tol, window, cap = CASES[name]
    case = make_case(fresh_rng(), seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=dim,
                     page_size=page_size, pad_tokens=3, pad_seqs=1)
    _check(case, dtype, tol, sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-3)])
@pytest.mark.parametrize("page_size", [16, 64])
def test_random_mixed_batches(dtype, tol, page_size):
    """Decodes over long contexts mixed with prefill chunks, as a serving step has them."""
    rng = fresh_rng()
    decodes = [(int(rng.integers(1, 700)), 1) for _ in range(int(rng.integers(8, 40)))]
    prefills = [(int(q + rng.integers(0, 300)), int(q))
                for q in rng.integers(2, 200, size=int(rng.integers(1, 4)))]
    seqs = [s for i in rng.permutation(len(decodes) + len(prefills))
            for s in [(decodes + prefills)[i]]]
    case = make_case(rng, seqs, num_q_heads=32, num_kv_heads=8, head_dim=64,
                     page_size=page_size, pad_tokens=int(rng.integers(0, 9)),
                     pad_seqs=int(rng.integers(0, 5)))
    _check(case, dtype, tol)


def test_random_window_and_soft_cap():
    rng = fresh_rng()
    seqs = [(int(rng.integers(1, 400)), int(q)) for q in rng.choice([1, 1, 1, 7, 33], size=12)]
    seqs = [(max(kv, q), q) for kv, q in seqs]
    case = make_case(rng, seqs, num_q_heads=12, num_kv_heads=4, head_dim=128, page_size=16,
                     pad_tokens=2, pad_seqs=1)
    _check(case, jnp.float32, 1e-5, sliding_window=int(rng.integers(4, 128)),
           soft_cap=float(rng.uniform(5, 50)))
