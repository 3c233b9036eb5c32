"""Pallas TPU and GPU kernels (interpret mode on CPU) against the reference and the oracle.

Interpret mode is slow (~1 s per call), so the cases are few and tiny but each one mixes
decode, prefill, chunked prefill, multi-page sequences, padding and NaN-poisoned pages.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import ragged_paged_attention
from tests.kernels.ragged_cases import make_case, oracle, rel_err, rel_norm_err

CASES = {
    # name: (seqs, Hq, Hkv, D, page_size, dtype, tol, sliding_window, soft_cap)
    "gqa3_fp32": (
        [(37, 1), (20, 9), (50, 13), (3, 3)],
        6,
        2,
        64,
        16,
        jnp.float32,
        1e-5,
        None,
        None,
    ),
    "mha_bf16_d128": ([(40, 1), (17, 17)], 2, 2, 128, 16, jnp.bfloat16, 2e-3, None, None),
    "gqa8_window_cap": ([(45, 6), (9, 1)], 8, 1, 64, 8, jnp.float32, 1e-5, 6, 4.0),
    # 20 page columns -> the GPU kernel splits the kv range (gpu_kv_splits).
    "long_decode_split_bf16": (
        [(150, 1), (70, 1), (9, 2)],
        4,
        2,
        64,
        8,
        jnp.bfloat16,
        2e-3,
        None,
        9.0,
    ),
}
PAIRS = [
    ("tpu", "gqa3_fp32"), ("tpu", "mha_bf16_d128"), ("tpu", "gqa8_window_cap"),
    ("gpu", "gqa3_fp32"), ("gpu", "long_decode_split_bf16"), ("gpu", "gqa8_window_cap"),
]  # fmt: skip


@pytest.mark.parametrize("impl,name", PAIRS)
def test_kernel_matches_reference_and_oracle(impl, name):
    seqs, hq, hkv, dim, page_size, dtype, tol, window, cap = CASES[name]
    rng = np.random.default_rng(abs(hash((impl, name))) % 2**32)
    case = make_case(
        rng, seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=dim, page_size=page_size,
        pad_tokens=3, pad_seqs=1,
    )  # fmt: skip
    opts = dict(sm_scale=case.sm_scale, sliding_window=window, soft_cap=cap)
    out, cache = ragged_paged_attention(*case.args(dtype), impl=impl, **opts)
    ref_out, ref_cache = ragged_paged_attention(*case.args(dtype), impl="reference", **opts)
    real = int(case.cu_q_lens[len(seqs)])
    assert out.dtype == dtype and out.shape == case.q.shape
    assert np.all(np.isfinite(np.asarray(out.astype(jnp.float32))))
    assert np.all(np.asarray(out[real:].astype(jnp.float32)) == 0.0)
    ref = np.asarray(ref_out[:real].astype(jnp.float32), np.float64)
    # fp32: max-norm; bf16: relative L2 (a lone output rounding flip is ~4e-3 in max-norm).
    err = rel_err if dtype == jnp.float32 else rel_norm_err
    assert err(out[:real], ref) <= tol
    want_out, want_cache = oracle(case, dtype, sliding_window=window, soft_cap=cap)
    assert rel_err(out[:real], want_out[:real]) <= (1e-5 if dtype == jnp.float32 else 1e-2)
    np.testing.assert_array_equal(np.asarray(cache.astype(jnp.float32), np.float64), want_cache)
    np.testing.assert_array_equal(
        np.asarray(cache.astype(jnp.float32)), np.asarray(ref_cache.astype(jnp.float32))
    )
