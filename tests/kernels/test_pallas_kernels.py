"""Pallas TPU and GPU kernels (interpret mode on CPU) against the reference and the oracle.

Interpret mode is slow (~1 s per call), so the cases are few and tiny but each one mixes
decode, prefill, chunked prefill, multi-page sequences, padding and NaN-poisoned pages.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import AttentionMetadata, get_backend, ragged_paged_attention
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
    ("tpu_own", "gqa3_fp32"), ("tpu_own", "mha_bf16_d128"), ("tpu_own", "gqa8_window_cap"),
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


def _dot_precisions(jaxpr) -> list:
    """Precision of every dot_general in a jaxpr, its sub-jaxprs and Pallas kernel bodies."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found += _dot_precisions(inner)
    return found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_dots_at_full_precision_for_float32(dtype):
    """Float32 inputs: every dot of the GPU kernel asks for HIGHEST (Triton: IEEE, no TF32);
    bfloat16 keeps the default. (Interpret mode on CPU is exact either way; the float32 case
    above matches the oracle at 1e-5.)"""
    from jaxllm.kernels.gpu import ragged_paged_attention_gpu

    case = make_case(np.random.default_rng(7), [(20, 3), (9, 1)], num_q_heads=4, num_kv_heads=2,
                     head_dim=32, page_size=8, pad_tokens=1)
    q, _, _, cache, kv_lens, pages, cu, n = case.args(dtype)
    md = get_backend("gpu", "cpu").prepare_metadata(AttentionMetadata(kv_lens, pages, cu, n),
                                                    q.shape[0])
    jaxpr = jax.make_jaxpr(lambda q, c, md: ragged_paged_attention_gpu(
        q, c, md, sm_scale=case.sm_scale, interpret=True))(q, cache, md)
    precisions = _dot_precisions(jaxpr.jaxpr)
    assert len(precisions) >= 2  # q.k and p.v
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    if dtype == jnp.float32:
        assert all(p == highest for p in precisions)
    else:
        assert all(p is None for p in precisions)
