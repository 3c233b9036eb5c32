"""kernels/gpu_paged.py compiled for the GPU (not interpret mode) against the float64 oracle
and the reference: the interpret-mode batches of tests/kernels/test_gpu_paged.py, then random
ragged batches at engine-like sizes (fresh seeds) for GQA groups 1/4/7/8, page sizes 16/64,
float32 (1e-5: no TF32) and bfloat16."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from tests.kernels import test_gpu_paged as interpreted
from tests.kernels.ragged_cases import fresh_rng, make_case
from tests.kernels.test_gpu_paged import check


@pytest.mark.parametrize("name", [
    "test_mha_decode_prefill_and_mixed_float32",
    "test_gqa4_bfloat16_long_contexts_split_with_soft_cap",
    "test_gqa7_sliding_window_and_soft_cap_prefill_and_mixed",
    "test_gqa8_float32_queries_over_bfloat16_cache_window_splits",
])
def test_interpret_mode_batches_compiled(name, monkeypatch):
    monkeypatch.setattr(interpreted, "check",
                        lambda *args, **kwargs: check(*args, **kwargs, interpret=False))
    getattr(interpreted, name)()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("hq,hkv,head_dim", [(8, 8, 128), (32, 8, 64), (28, 4, 128),
                                             (64, 8, 128)])
def test_random_mixed_batches(dtype, page_size, hq, hkv, head_dim):
    """Decodes over long contexts mixed with prefill chunks, as a serving step has them."""
    rng = fresh_rng()
    decodes = [(int(rng.integers(1, 2000)), 1) for _ in range(int(rng.integers(8, 40)))]
    prefills = [(int(q + rng.integers(0, 300)), int(q))
                for q in rng.integers(2, 200, size=int(rng.integers(0, 4)))]
    seqs = [(decodes + prefills)[i] for i in rng.permutation(len(decodes) + len(prefills))]
    case = make_case(rng, seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                     page_size=page_size, pad_tokens=int(rng.integers(0, 9)),
                     pad_seqs=int(rng.integers(0, 5)))
    window = int(rng.integers(16, 600)) if rng.random() < 0.3 else None
    cap = float(rng.uniform(5, 50)) if rng.random() < 0.3 else None
    check(case, dtype, sliding_window=window, soft_cap=cap, interpret=False)
