"""The reference implementation against the float64 numpy oracle, and cache-write hygiene."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import AttentionMetadata, ragged_paged_attention_from_metadata
from tests.kernels.ragged_cases import fresh_rng, make_case, oracle, rel_err

MIXED = [(37, 1), (20, 20), (50, 13), (100, 1), (3, 3)]  # decode, prefill, chunk, long, tiny


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def _run(q, k, v, cache, kv_lens, page_indices, cu, num_seqs, **opts):
    md = AttentionMetadata(kv_lens, page_indices, cu, num_seqs)
    return ragged_paged_attention_from_metadata(q, k, v, cache, md, impl="reference", **opts)


def _check(case, dtype, tol, **opts):
    out, cache = _run(*case.args(dtype), sm_scale=case.sm_scale, **opts)
    want_out, want_cache = oracle(case, dtype, **opts)
    real = int(case.cu_q_lens[int(case.num_seqs.reshape(-1)[0])])
    assert out.dtype == dtype and out.shape == case.q.shape
    assert rel_err(out[:real], want_out[:real]) <= tol
    assert np.all(np.isfinite(np.asarray(out.astype(jnp.float32))))
    assert np.all(np.asarray(out[real:].astype(jnp.float32)) == 0.0)  # padding tokens
    got_cache = np.asarray(cache.astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(got_cache, want_cache)  # NaN == NaN: only written slots moved


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_mixed_batch_fp32_gqa(num_q_heads, num_kv_heads):
    rng = fresh_rng()
    case = make_case(
        rng, MIXED, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=64,
        page_size=16, pad_tokens=5, pad_seqs=2,
    )  # fmt: skip
    _check(case, jnp.float32, 1e-5)


def test_head_dim_128_large_pages_bf16():
    rng = fresh_rng()
    seqs = [(70, 1), (33, 33), (129, 40)]
    case = make_case(
        rng, seqs, num_q_heads=6, num_kv_heads=2, head_dim=128, page_size=64, pad_tokens=3
    )
    _check(case, jnp.bfloat16, 1e-2)


def test_head_dim_128_fp32_page_32():
    rng = fresh_rng()
    seqs = [(95, 1), (64, 17), (5, 5)]
    case = make_case(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=128, page_size=32)
    _check(case, jnp.float32, 1e-5)


@pytest.mark.parametrize("sliding_window,soft_cap", [(7, None), (None, 5.0), (16, 2.5)])
def test_sliding_window_and_soft_cap(sliding_window, soft_cap):
    rng = np.random.default_rng(int(sliding_window or 0) * 10 + int(soft_cap or 0))
    case = make_case(
        rng, MIXED, num_q_heads=6, num_kv_heads=3, head_dim=64, page_size=16, pad_tokens=2,
        pad_seqs=1,
    )  # fmt: skip
    _check(case, jnp.float32, 1e-5, sliding_window=sliding_window, soft_cap=soft_cap)


def test_many_token_blocks_mix_shared_and_per_token_paths():
    """More tokens than one reference block: long prefill blocks plus blocks of decodes."""
    rng = fresh_rng()
    seqs = [(300, 150)] + [(int(n), 1) for n in rng.integers(1, 90, size=20)] + [(80, 70)]
    case = make_case(
        rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, pad_tokens=9,
        pad_seqs=3,
    )  # fmt: skip
    _check(case, jnp.float32, 1e-5)


def test_tiny_pages_and_scalar_num_seqs():
    rng = fresh_rng()
    case = make_case(
        rng, [(9, 4), (2, 1), (6, 6)], num_q_heads=2, num_kv_heads=1, head_dim=64, page_size=2
    )
    case.num_seqs = case.num_seqs.reshape(())
    _check(case, jnp.float32, 1e-5)


def test_all_padding_batch_writes_nothing():
    rng = fresh_rng()
    case = make_case(rng, [(10, 2)], num_q_heads=2, num_kv_heads=1, head_dim=64, page_size=16,
                     pad_tokens=4, pad_seqs=1)  # fmt: skip
    case.num_seqs = np.array([0], np.int32)
    case.seqs = []
    out, cache = _run(*case.args(jnp.float32), sm_scale=case.sm_scale)
    assert np.all(np.asarray(out) == 0.0)
    np.testing.assert_array_equal(np.asarray(cache), case.kv_cache)


@pytest.mark.parametrize("page_size", [128, 256])
def test_large_pages_fp32(page_size):
    rng = fresh_rng()
    seqs = [(int(rng.integers(page_size + 1, 2 * page_size + 40)), 1),
            (int(rng.integers(20, 90)), int(rng.integers(5, 20))), (7, 7)]
    case = make_case(rng, seqs, num_q_heads=9, num_kv_heads=3, head_dim=64,
                     page_size=page_size, pad_tokens=3, pad_seqs=1)
    _check(case, jnp.float32, 1e-5)
