"""The native C++ CPU kernel (impl="cpu_native") against its twin, the reference, and the
float64 oracle, on fresh random ragged batches with NaN in every slot no token may read."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import ragged_paged_attention
from jaxllm.kernels.native_build import (
    NativeBuildConfig,
    NativeBuildError,
    build_native_library,
    library_path,
    native_attention_available,
)
from tests.kernels.ragged_cases import (
    check_against_reference,
    fresh_rng,
    make_case,
)


@pytest.fixture(autouse=True)
def _needs_compiler():
    if not native_attention_available():
        pytest.skip("native kernel unavailable (no C++ compiler or build failed; see log)")


def _check(case, dtype, tol, **opts):
    check_against_reference(case, "cpu_native", dtype, tol, **opts)


def _mixed_seqs(rng, num_decode: int, num_prefill: int) -> list[tuple[int, int]]:
    """(kv_len, q_len) of decode tokens and prefill chunks (some fresh, some continuing), plus
    a sequence with nothing cached and nothing new and one with a cache but no new token."""
    seqs = [(int(rng.integers(1, 70)), 1) for _ in range(num_decode)]
    for _ in range(num_prefill):
        q_len = int(rng.integers(2, 40))
        seqs.append((q_len + int(rng.integers(0, 2)) * int(rng.integers(1, 50)), q_len))
    seqs += [(0, 0), (int(rng.integers(1, 30)), 0)]
    order = rng.permutation(len(seqs))
    return [seqs[i] for i in order]


@pytest.mark.parametrize(
    ("page_size", "num_q_heads", "num_kv_heads", "head_dim"),
    # GQA 3 / 1 / 3 with a ragged head_dim / 7 (the kernel takes query heads in groups of up
    # to 4: 4 + 3) / 2 with head_dim 128 (wide value rows)
    [(16, 9, 3, 64), (8, 4, 4, 32), (8, 6, 2, 20), (16, 14, 2, 40), (32, 4, 2, 128)],
)
def test_mixed_decode_and_prefill_fp32(page_size, num_q_heads, num_kv_heads, head_dim):
    rng = fresh_rng()
    seqs = _mixed_seqs(rng, int(rng.integers(1, 6)), int(rng.integers(1, 3)))
    case = make_case(
        rng, seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        page_size=page_size, pad_tokens=int(rng.integers(0, 5)), pad_seqs=int(rng.integers(0, 3)),
        extra_page_cols=2,
    )  # fmt: skip
    _check(case, jnp.float32, 1e-5)


def test_decode_bucket_fp32():
    """A decode bucket as the engine builds it: T == S, padding tokens and sequences."""
    rng = fresh_rng()
    num, pad = int(rng.integers(1, 12)), int(rng.integers(0, 5))
    seqs = [(int(rng.integers(1, 90)), 1) for _ in range(num)]
    case = make_case(
        rng, seqs, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16, pad_tokens=pad,
        pad_seqs=pad,
    )  # fmt: skip
    _check(case, jnp.float32, 1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_sliding_window_and_soft_cap(dtype, tol):
    rng = fresh_rng()
    seqs = _mixed_seqs(rng, 3, 2)
    case = make_case(
        rng, seqs, num_q_heads=8, num_kv_heads=2, head_dim=32, page_size=8, pad_tokens=2,
        pad_seqs=1,
    )  # fmt: skip
    window = int(rng.integers(1, 20))
    _check(case, dtype, tol, sliding_window=window, soft_cap=float(rng.uniform(3.0, 10.0)))


def test_long_prefill_spans_several_query_blocks():
    """One chunk longer than the kernel's query block, continuing a cached prefix."""
    rng = fresh_rng()
    case = make_case(
        rng, [(100, 70), (9, 1)], num_q_heads=6, num_kv_heads=3, head_dim=16, page_size=16,
        pad_tokens=3,
    )  # fmt: skip
    _check(case, jnp.float32, 1e-5, sliding_window=int(rng.integers(10, 60)))


def test_no_sequences_gives_zeros():
    rng = fresh_rng()
    case = make_case(rng, [(5, 2)], num_q_heads=2, num_kv_heads=1, head_dim=8, page_size=8,
                     pad_tokens=2)  # fmt: skip
    case.num_seqs[:] = 0
    out, _ = ragged_paged_attention(*case.args(jnp.float32), sm_scale=case.sm_scale,
                                    impl="cpu_native")  # fmt: skip
    assert np.all(np.asarray(out) == 0.0)


def test_inside_jit_with_donated_cache():
    """Under jit with the cache donated (as the runner calls it), twice in a row: the second
    step reads what the first wrote."""
    rng = fresh_rng()
    seqs = [(int(rng.integers(2, 60)), 1) for _ in range(4)] + [(20, 12)]
    case = make_case(rng, seqs, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16,
                     pad_tokens=3, pad_seqs=2)  # fmt: skip

    def step(impl):
        @functools.partial(jax.jit, donate_argnums=(3,))
        def run(q, k, v, cache, kv_lens, pages, cu, n):
            return ragged_paged_attention(
                q, k, v, cache, kv_lens, pages, cu, n, sm_scale=case.sm_scale, impl=impl
            )

        return run

    args = case.args(jnp.float32)
    outs = {}
    for impl in ("reference", "cpu_native"):
        run = step(impl)
        out1, cache = run(*args[:3], jnp.array(args[3]), *args[4:])
        # Next step: every sequence one token longer, new random q/k/v.
        kv_lens = args[4] + jnp.where(jnp.arange(args[4].shape[0]) < 5, 1, 0).astype(jnp.int32)
        q2 = jnp.asarray(np.random.default_rng(1).standard_normal(case.q.shape), jnp.float32)
        out2, cache = run(q2, *args[1:3], cache, kv_lens, *args[5:])
        outs[impl] = (np.asarray(out1), np.asarray(out2))
    for got, want in zip(outs["cpu_native"], outs["reference"], strict=True):
        assert np.all(np.isfinite(got))
        assert float(np.max(np.abs(got - want))) <= 1e-5 * float(np.max(np.abs(want)))


def test_build_errors_and_cache(tmp_path):
    """A missing compiler is a clear error / False; a build lands in the given cache dir under
    a keyed name and is reused, not rebuilt."""
    missing = NativeBuildConfig(cache_dir=tmp_path, compiler="no-such-compiler-jaxllm")
    with pytest.raises(NativeBuildError, match="not found"):
        build_native_library(missing)
    assert native_attention_available(missing) is False
    config = NativeBuildConfig(cache_dir=tmp_path / "native")
    path = build_native_library(config)
    assert path == library_path(config) and path.parent == tmp_path / "native"
    stamp = path.stat().st_mtime_ns
    assert build_native_library(config) == path and path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob(".build-*"))  # no temporary left behind
