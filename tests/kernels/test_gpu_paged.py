"""The paged GPU kernels (kernels/gpu_paged.py: decode + prefill) in interpret mode on CPU,
against the float64 oracle and kernels/reference.py.

Interpret mode costs ~10 s per compile and almost nothing per call, so each test compiles
once (fixed static shapes) and runs several ragged batches through it: decode-only,
prefill-only and mixed, with padding tokens and sequences, NaN-poisoned unused pages and
junk page-table columns (tests/kernels/ragged_cases.py). Seeds are fresh each run (printed).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.block_sizes import gpu_decode_splits
from jaxllm.kernels.gpu_paged import paged_attention_gpu
from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.ragged_layout import token_layout, write_new_kv
from jaxllm.kernels.reference import attend
from tests.kernels.ragged_cases import fresh_rng, make_case, oracle, rel_err, rel_norm_err

HEAD_DIM = 32


def fixed_shape_case(rng, seqs, *, hq, hkv, page_size, tokens, max_seqs, width, num_pages):
    """make_case padded to fixed static shapes, so batches of one test share one compile."""
    pages_needed = [-(-kv // page_size) for kv, _ in seqs]
    return make_case(
        rng, seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=HEAD_DIM, page_size=page_size,
        pad_tokens=tokens - sum(q for _, q in seqs), pad_seqs=max_seqs - len(seqs),
        extra_page_cols=width - max(pages_needed), spare_pages=num_pages - sum(pages_needed),
    )  # fmt: skip


def dot_precisions(jaxpr) -> list:
    """Precision of every dot_general in a jaxpr, its sub-jaxprs and Pallas kernel bodies."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found += dot_precisions(inner)
    return found


@jax.jit
def written_cache(cache, k, v, kv_lens, pages, cu, n):
    """(the cache holding the step's new K/V, the token layout): the backend wrapper's part."""
    layout = token_layout(k.shape[0], kv_lens, cu, n)
    return write_new_kv(cache, k, v, pages, layout), layout


reference = jax.jit(attend, static_argnames=("sm_scale", "sliding_window", "soft_cap"))


def check(case, dtype, *, cache_dtype=None, sliding_window=None, soft_cap=None,
          pages_per_block=None, split_probs=True, interpret=True) -> None:
    """Kernel output == oracle and reference on the real tokens; 0 on padding; finite.
    cache_dtype: store K/V in it (rounded in the case first, so the oracle sees them too).
    split_probs=False: bf16 P.V in one MMA (looser bound vs the reference).
    interpret=False: compiled for the GPU (tests/gpu)."""
    if cache_dtype is not None:
        for name in ("k_new", "v_new", "kv_cache"):
            rounded = jnp.asarray(getattr(case, name), cache_dtype).astype(jnp.float32)
            setattr(case, name, np.asarray(rounded))
    q, k, v, cache, kv_lens, pages, cu, n = case.args(dtype)
    cache = cache.astype(cache_dtype or dtype)
    k, v = k.astype(cache.dtype), v.astype(cache.dtype)
    cache, layout = written_cache(cache, k, v, kv_lens, pages, cu, n)
    opts = dict(sm_scale=case.sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    out = paged_attention_gpu(q, cache, AttentionMetadata(kv_lens, pages, cu, n), **opts,
                              interpret=interpret, pages_per_block=pages_per_block,
                              split_probs=split_probs)
    ref = reference(q, cache, pages, layout, **opts)
    want, _ = oracle(case, dtype, sliding_window=sliding_window,
                     soft_cap=soft_cap)
    real = int(case.cu_q_lens[len(case.seqs)])
    assert out.dtype == q.dtype and out.shape == q.shape
    assert np.all(np.isfinite(np.asarray(out.astype(jnp.float32))))
    assert np.all(np.asarray(out[real:].astype(jnp.float32)) == 0.0)  # padding tokens
    ref = np.asarray(ref[:real].astype(jnp.float32), np.float64)
    if jnp.float32 in (jnp.dtype(dtype), jnp.dtype(cache_dtype or dtype)):
        assert rel_err(out[:real], want[:real]) <= 1e-5, "vs oracle"
        assert rel_err(out[:real], ref) <= 1e-5, "vs reference"
    else:  # relative L2: both outputs are rounded to bfloat16 (~1.6e-3 from the oracle alone);
        # P.V as a bf16 hi + lo pair keeps the kernel within rounding flips of the reference
        assert rel_norm_err(out[:real], want[:real]) <= 4e-3, "vs oracle"
        assert rel_norm_err(out[:real], ref) <= (1e-3 if split_probs else 4e-3), "vs reference"


def test_mha_decode_prefill_and_mixed_float32():
    """G = 1; the three kinds of step through one compile."""
    rng = fresh_rng()
    shape = dict(hq=2, hkv=2, page_size=16, tokens=30, max_seqs=5, width=6, num_pages=24)
    batches = [
        [(37, 1), (5, 1), (64, 1), (17, 1)],  # decode only (64: exactly 4 full pages)
        [(20, 9), (50, 13), (3, 3)],  # prefill only: chunk continuing a prefix, fresh prompts
        [(37, 1), (20, 9), (50, 13), (3, 3)],  # mixed
    ]
    for seqs in batches:
        check(fixed_shape_case(rng, seqs, **shape), jnp.float32)


def test_gqa4_bfloat16_long_contexts_split_with_soft_cap():
    """G = 4, several kv splits (2-page blocks over ~20-page contexts), soft cap; decode-only
    and mixed."""
    rng = fresh_rng()
    shape = dict(hq=8, hkv=2, page_size=8, tokens=20, max_seqs=4, width=24, num_pages=48)
    assert gpu_decode_splits(shape["max_seqs"], shape["hkv"], shape["width"] // 2) >= 4
    batches = [
        [(150, 1), (97, 1), (5, 1)],
        [(int(rng.integers(120, 180)), 1), (40, 12), (3, 3)],
    ]
    for seqs in batches:
        check(fixed_shape_case(rng, seqs, **shape), jnp.bfloat16, soft_cap=5.0, pages_per_block=2)


def test_gqa7_sliding_window_and_soft_cap_prefill_and_mixed():
    """G = 7 (padded to 8 heads in prefill rows, 16 in decode rows), window + soft cap."""
    rng = fresh_rng()
    shape = dict(hq=7, hkv=1, page_size=8, tokens=32, max_seqs=4, width=8, num_pages=20)
    batches = [
        [(45, 6), (20, 20)],  # prefill only; window 6 skips whole pages
        [(45, 6), (9, 1), (13, 13), (30, 1)],  # mixed
    ]
    for seqs in batches:
        check(fixed_shape_case(rng, seqs, **shape), jnp.float32, sliding_window=6, soft_cap=4.0,
              pages_per_block=2)


def test_gqa8_float32_queries_over_bfloat16_cache_window_splits():
    """G = 8, float32 queries over a bfloat16 cache (computed in float32), one-page blocks
    with several splits, sliding window longer than a page; decode-only and mixed."""
    rng = fresh_rng()
    shape = dict(hq=16, hkv=2, page_size=8, tokens=24, max_seqs=3, width=16, num_pages=40)
    assert gpu_decode_splits(shape["max_seqs"], shape["hkv"], shape["width"]) >= 4
    batches = [
        [(int(rng.integers(90, 128)), 1), (33, 1), (1, 1)],
        [(100, 1), (int(rng.integers(20, 60)), 19)],
    ]
    for seqs in batches:
        check(fixed_shape_case(rng, seqs, **shape), jnp.float32, cache_dtype=jnp.bfloat16,
              sliding_window=21, pages_per_block=1)


def test_single_bf16_probs_variant():
    """split_probs=False (flash attention's single bf16 P) on a mixed bf16 batch, G = 2."""
    rng = fresh_rng()
    seqs = [(int(rng.integers(30, 90)), 1), (50, 21), (7, 7)]
    case = make_case(rng, seqs, num_q_heads=4, num_kv_heads=2, head_dim=HEAD_DIM,
                     page_size=16, pad_tokens=2, pad_seqs=1)
    check(case, jnp.bfloat16, split_probs=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dots_at_full_precision_for_float32(dtype):
    """Float32: every dot of both kernels asks for HIGHEST (IEEE on Triton, no TF32);
    bfloat16: the tensor-core default."""
    case = make_case(np.random.default_rng(3), [(20, 3), (9, 1)], num_q_heads=4,
                     num_kv_heads=2, head_dim=HEAD_DIM, page_size=8, pad_tokens=1)
    q, _, _, cache, kv_lens, pages, cu, n = case.args(dtype)
    md = AttentionMetadata(kv_lens, pages, cu, n)
    jaxpr = jax.make_jaxpr(lambda q, c, md: paged_attention_gpu(
        q, c, md, sm_scale=case.sm_scale, interpret=True))(q, cache, md)
    precisions = dot_precisions(jaxpr.jaxpr)
    assert len(precisions) >= 4  # q.k and p.v in each kernel
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(p == (highest if dtype == jnp.float32 else None) for p in precisions)
