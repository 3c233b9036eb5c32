"""The attention-backend registry: names, platform defaults, cache layouts, prepared metadata,
and the shared wrapper steps (fit to a padded layout, write first, zero padding tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm.kernels.jax_tpu as jax_tpu
import jaxllm.kernels.metadata as metadata
from jaxllm.kernels import (
    IMPLEMENTATIONS,
    AttentionMetadata,
    get_backend,
    ragged_paged_attention,
)
from jaxllm.kernels.backends import JaxTpuBackend
from jaxllm.kernels.kv_layout import tpu_tileable_kv_heads
from jaxllm.kernels.ragged_layout import token_layout
from jaxllm.kernels.reference import attend as reference_attend
from tests.kernels.ragged_cases import (
    args_in_layout,
    fresh_rng,
    make_case,
    oracle,
    real_part,
    rel_err,
)

MIXED = [(37, 1), (20, 9), (50, 13), (3, 3), (1, 1)]  # decode, chunk, chunk, prefill, tiny


def test_registry_names_and_platform_defaults(monkeypatch):
    assert set(IMPLEMENTATIONS) == {"reference", "cpu", "cpu_native", "tpu", "tpu_own", "gpu",
                                    "gpu_paged"}
    for impl in IMPLEMENTATIONS:
        backend = get_backend(impl, "cpu")
        assert backend.name == impl and backend.platform == "cpu"
        assert impl in backend.describe() and "block sizes" in backend.describe()
    assert get_backend(None, "tpu").name == "tpu"
    assert get_backend(None, "gpu").name == get_backend(None, "cuda").name == "gpu"
    assert get_backend("tpu", "tpu").native and not get_backend("tpu", "cpu").native
    assert "tuned" in get_backend("tpu", "tpu").describe()
    assert "interpret" in get_backend("gpu", "cpu").describe()
    with pytest.raises(ValueError, match="impl must be one of"):
        get_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="runs on"):
        get_backend("cpu_native", "tpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert get_backend().name == "tpu" and get_backend().platform == "tpu"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_layouts(dtype):
    rng = fresh_rng()
    heads, dim = int(rng.integers(1, 13)), int(rng.choice([32, 64, 80, 128, 256]))
    plain = get_backend("reference", "cpu").kv_cache_shape(7, 16, heads, dim, dtype)
    assert plain == (7, 16, 2 * heads, dim)
    _, _, tiled_heads, tiled_dim = JaxTpuBackend("tpu").kv_cache_shape(7, 16, heads, dim, dtype)
    assert tiled_dim % 128 == 0 and dim <= tiled_dim < dim + 128
    assert tiled_heads >= 2 * heads and jax_tpu.jax_kernel_accepts(tiled_heads // 2, tiled_dim,
                                                                   dtype)
    # The fewest heads the kernel takes: one fewer is refused (or below the model's).
    assert tiled_heads == 2 * heads or not jax_tpu.jax_kernel_accepts(tiled_heads // 2 - 1,
                                                                      tiled_dim, dtype)
    assert tpu_tileable_kv_heads(3, dtype) == 4 and tpu_tileable_kv_heads(8, dtype) == 8
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        get_backend("cpu", "cpu").kv_cache_shape(7, 16, heads, dim, jnp.float16)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_any_backend_runs_on_a_padded_layout(impl):
    """A cache in the TPU layout (kv heads 3 -> 4, head_dim 64 -> 128) gives the same outputs
    and the same real cache as the plain layout."""
    rng = fresh_rng()
    case = make_case(rng, MIXED, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=8,
                     pad_tokens=3, pad_seqs=2)
    shape = JaxTpuBackend("tpu").kv_cache_shape(*case.kv_cache.shape[:2], 3, 64, jnp.float32)
    assert shape[2:] == (8, 128)
    opts = dict(sm_scale=case.sm_scale, sliding_window=11, soft_cap=6.0, impl=impl)
    out, cache = ragged_paged_attention(*args_in_layout(case, jnp.float32, shape), **opts)
    want, want_cache = oracle(case, jnp.float32, sliding_window=11, soft_cap=6.0)
    real = int(case.cu_q_lens[len(MIXED)])
    assert rel_err(out[:real], want[:real]) <= 1e-5
    assert np.all(np.asarray(out[real:]) == 0.0)
    np.testing.assert_array_equal(real_part(cache, case), want_cache)
    pad = np.asarray(cache)[:, :, 6:]  # padded heads: zero where tokens live, NaN elsewhere
    assert np.all((pad == 0.0) | np.isnan(pad))


def test_prepared_metadata_skips_the_per_layer_layout(monkeypatch):
    """prepare_metadata computes the token layout once; a layer given prepared metadata does
    not compute it again, and its result equals the unprepared call's."""
    rng = fresh_rng()
    case = make_case(rng, MIXED, num_q_heads=4, num_kv_heads=2, head_dim=32, page_size=8,
                     pad_tokens=2, pad_seqs=1)
    q, k, v, cache, kv_lens, pages, cu, n = case.args(jnp.float32)
    backend = get_backend("cpu", "cpu")
    md = AttentionMetadata(kv_lens, pages, cu, n)
    prepared = jax.jit(backend.prepare_metadata, static_argnums=1)(md, q.shape[0])
    assert prepared.layout is not None and len(jax.tree_util.tree_leaves(prepared)) == 7
    want_out, want_cache = backend.attention_fn(q, k, v, cache, md, sm_scale=case.sm_scale)

    def refuse(*_args, **_kw):
        raise AssertionError("token_layout recomputed for prepared metadata")

    monkeypatch.setattr(metadata, "token_layout", refuse)
    out, new_cache = backend.attention_fn(q, k, v, cache, prepared, sm_scale=case.sm_scale)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    np.testing.assert_array_equal(np.asarray(new_cache), np.asarray(want_cache))
    with pytest.raises(ValueError, match="prepared for"):
        backend.prepare_metadata(prepared, q.shape[0] + 1)


@pytest.mark.parametrize("dtype,window,cap", [(jnp.float32, None, None),
                                              (jnp.bfloat16, 13, 5.0)])
def test_dispatch_on_a_faked_tpu_runs_jax_kernel_with_tuned_sizes(monkeypatch, dtype, window,
                                                                  cap):
    """With the platform faked as TPU, impl=None goes through the JAX-kernel backend: JAX's
    kernel is called (here a twin of its contract that leaves padding rows NaN, as the kernel
    leaves them unwritten) with block sizes left to its tuned table, on the new K/V written
    first into the padded layout; the wrapper zeroes padding rows and cuts the padding off."""
    calls = []

    def twin(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
             sliding_window, soft_cap, num_kv_pages_per_block, num_queries_per_block):
        calls.append((q.dtype, kv_pages.shape, num_kv_pages_per_block, num_queries_per_block))
        layout = token_layout(q.shape[0], kv_lens, cu_q_lens, num_seqs)
        out = reference_attend(q, kv_pages, page_indices, layout, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)
        return jnp.where(layout.valid[:, None, None], out, jnp.nan)

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax_tpu, "ragged_paged_attention", twin)
    rng = fresh_rng()
    case = make_case(rng, MIXED, num_q_heads=6, num_kv_heads=3, head_dim=64, page_size=16,
                     pad_tokens=4, pad_seqs=2)
    backend = get_backend()
    shape = backend.kv_cache_shape(*case.kv_cache.shape[:2], 3, 64, dtype)
    args = args_in_layout(case, dtype, shape)
    out, cache = ragged_paged_attention(*args, sm_scale=case.sm_scale, sliding_window=window,
                                        soft_cap=cap)
    assert calls == [(jnp.dtype(dtype), shape, None, None)]
    want, want_cache = oracle(case, dtype, sliding_window=window, soft_cap=cap)
    real = int(case.cu_q_lens[len(MIXED)])
    assert out.shape == case.q.shape and out.dtype == dtype
    assert rel_err(out[:real], want[:real]) <= (1e-5 if dtype == jnp.float32 else 2e-2)
    assert np.all(np.asarray(out[real:].astype(jnp.float32)) == 0.0)
    np.testing.assert_array_equal(real_part(cache, case), want_cache)


def test_head_padding_per_tensor_parallel_shard():
    """Split over 2 head shards, 6 kv heads pad to 4 per shard (not 8 overall), so each
    shard's slice of the cache holds its own 3 heads first: attention run per shard on its
    slice (as shard_map runs it) equals the unsharded result."""
    rng = fresh_rng()
    case = make_case(rng, MIXED, num_q_heads=12, num_kv_heads=6, head_dim=64, page_size=8,
                     pad_tokens=2, pad_seqs=1)
    dtype = jnp.bfloat16
    shape = JaxTpuBackend("tpu").kv_cache_shape(*case.kv_cache.shape[:2], 6, 64, dtype,
                                                head_shards=2)
    assert shape[2:] == (16, 128)
    q, k, v, cache, *tables = case.args(dtype)
    want, want_cache = ragged_paged_attention(q, k, v, cache, *tables, sm_scale=case.sm_scale,
                                              impl="reference")
    poisoned = np.isnan(case.kv_cache).any(axis=(2, 3), keepdims=True)
    outs = []
    for shard in range(2):  # shard s's slice of the cache: its 3 heads (6 rows), then zeros
        local = np.where(poisoned, np.nan, 0.0) * np.ones(shape[:2] + (8, 128), np.float32)
        local[:, :, :6, :64] = case.kv_cache[:, :, 6 * shard:6 * shard + 6]
        out, local_cache = ragged_paged_attention(
            q[:, 6 * shard:6 * shard + 6], k[:, 3 * shard:3 * shard + 3],
            v[:, 3 * shard:3 * shard + 3], jnp.asarray(local, dtype), *tables,
            sm_scale=case.sm_scale, impl="reference")
        outs.append(out)
        np.testing.assert_array_equal(
            np.asarray(local_cache[:, :, :6, :64].astype(jnp.float32)),
            np.asarray(want_cache[:, :, 6 * shard:6 * shard + 6].astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(outs, axis=1).astype(jnp.float32)),
                                  np.asarray(want.astype(jnp.float32)))
