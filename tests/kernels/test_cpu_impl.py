"""The CPU implementation against its twin, the reference, and the float64 oracle.

Steps with no more tokens than sequence slots (T <= S) take the CPU's own loop-free path,
whatever their mix of decode and prefill tokens; steps with more tokens than sequences take
the reference's blocked path. Both are checked.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.ragged_cases import (
    check_against_reference,
    fresh_rng,
    make_case,
)


def _check(case, dtype, tol, **opts):
    check_against_reference(case, "cpu", dtype, tol, **opts)


def _decode_case(rng, num_seqs, pad_seqs, **kw):
    """num_seqs decodes at random contexts, padded with padding sequences (and tokens) so that
    the token axis is as long as the sequence axis, as in the engine's decode buckets."""
    seqs = [(int(rng.integers(1, 90)), 1) for _ in range(num_seqs)]
    return make_case(rng, seqs, pad_tokens=pad_seqs, pad_seqs=pad_seqs, **kw)


@pytest.mark.parametrize("repeat", range(3))
def test_decode_path_matches_reference_fp32(repeat):
    rng = fresh_rng()
    num_seqs, pad = int(rng.integers(1, 12)), int(rng.integers(0, 5))
    case = _decode_case(
        rng, num_seqs, pad, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16
    )
    assert case.q.shape[0] == case.kv_lens.shape[0]  # the loop-free path
    _check(case, jnp.float32, 1e-5)


def test_decode_path_bf16_sliding_window_soft_cap():
    rng = fresh_rng()
    case = _decode_case(rng, 6, 2, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=8)
    _check(case, jnp.bfloat16, 2e-2, sliding_window=19, soft_cap=7.5)


def test_decode_path_sliding_window_fp32():
    rng = fresh_rng()
    case = _decode_case(rng, 5, 0, num_q_heads=4, num_kv_heads=4, head_dim=16, page_size=4)
    _check(case, jnp.float32, 1e-5, sliding_window=9)


@pytest.mark.parametrize("seed", range(2))
def test_prefill_in_decode_shaped_bucket(seed):
    """T <= S but one sequence has several tokens: the loop-free path must handle it too."""
    rng = np.random.default_rng(seed + 4400)
    seqs = [(int(rng.integers(5, 60)), 1), (40, 4), (int(rng.integers(1, 30)), 1), (5, 5)]
    case = make_case(
        rng, seqs, num_q_heads=6, num_kv_heads=2, head_dim=32, page_size=8, pad_seqs=8
    )
    assert case.q.shape[0] <= case.kv_lens.shape[0]
    _check(case, jnp.float32, 1e-5)


def test_mixed_batch_more_tokens_than_seqs():
    """T > S: the blocked path (shared with the reference), still checked against the oracle."""
    rng = fresh_rng()
    seqs = [(37, 1), (20, 20), (50, 13), (3, 3)]
    case = make_case(
        rng, seqs, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16, pad_tokens=4,
        pad_seqs=1,
    )  # fmt: skip
    _check(case, jnp.float32, 1e-5)


def test_single_token_bucket_and_all_padding_tokens():
    """T == 1 skips the token loop; a bucket whose real tokens are few runs mostly padding
    steps, which must stay zero whatever (NaN) their pages hold."""
    rng = fresh_rng()
    single = make_case(
        rng, [(int(rng.integers(2, 70)), 1)], num_q_heads=9, num_kv_heads=3, head_dim=64,
        page_size=16,
    )  # fmt: skip
    assert single.q.shape[0] == 1
    _check(single, jnp.float32, 1e-5)
    sparse = _decode_case(rng, 1, 7, num_q_heads=6, num_kv_heads=3, head_dim=32, page_size=8)
    _check(sparse, jnp.float32, 1e-5)
