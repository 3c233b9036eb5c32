"""TPU attention without a TPU: JAX's kernel ("tpu") and ours ("tpu_own") lowered for a TPU
through an abstract TPU device, and JAX's kernel run in TPU interpret mode against the
reference on mixed ragged batches (where the installed JAX's interpreter can run it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa_kernel
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes

from jaxllm.kernels import AttentionMetadata, get_backend, ragged_paged_attention
from tests.kernels.ragged_cases import (
    args_in_layout,
    make_case,
    oracle,
    real_part,
    rel_err,
    rel_norm_err,
)

TPU_V6 = jax.sharding.AbstractMesh(
    (1,), ("x",),
    abstract_device=jax.sharding.AbstractDevice(device_kind="TPU v6 lite", num_cores=1,
                                                platform="tpu"),
)  # fmt: skip
MODEL_SHAPES = {  # (Hq, Hkv, D)
    "smollm2": (9, 3, 64),  # needs the padded layout: 3 -> 4 kv heads, 64 -> 128 lanes
    "llama3_8b": (32, 8, 128),
}


@pytest.mark.parametrize("impl", ["tpu", "tpu_own"])
@pytest.mark.parametrize("model", sorted(MODEL_SHAPES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_tpu(monkeypatch, impl, model, dtype):
    """The whole backend call (fit to the layout, cache write, kernel) lowers to a Mosaic TPU
    custom call for a TPU v6e; "tpu" looks its block sizes up in JAX's tuned table."""
    looked_up = []
    real_lookup = jax_rpa_kernel.get_tuned_block_sizes

    def lookup(*args):
        looked_up.append(args)
        return real_lookup(*args)

    # The table reads the generation from jax.devices(): say what the abstract device is.
    monkeypatch.setattr(tuned_block_sizes, "get_tpu_version", lambda: 6)
    monkeypatch.setattr(tuned_block_sizes, "get_device_name", lambda num_devices=None: "TPU v6")
    monkeypatch.setattr(jax_rpa_kernel, "get_tuned_block_sizes", lookup)
    hq, hkv, dim = MODEL_SHAPES[model]
    tokens, seqs, pages_per_seq, page_size = 64, 8, 16, 64
    backend = get_backend(impl, "tpu")
    cache_shape = get_backend("tpu", "tpu").kv_cache_shape(200, page_size, hkv, dim, dtype)
    sds = jax.ShapeDtypeStruct
    md = AttentionMetadata(sds((seqs,), jnp.int32), sds((seqs, pages_per_seq), jnp.int32),
                           sds((seqs + 1,), jnp.int32), sds((1,), jnp.int32))

    def step(q, k, v, cache, md):
        return backend.attention_fn(q, k, v, cache, md, sm_scale=dim**-0.5, soft_cap=30.0)

    with jax.sharding.use_abstract_mesh(TPU_V6):
        exported = jax.export.export(jax.jit(step), platforms=["tpu"])(
            sds((tokens, hq, dim), dtype), sds((tokens, hkv, dim), dtype),
            sds((tokens, hkv, dim), dtype), sds(cache_shape, dtype), md)
    module = exported.mlir_module()
    assert module.count("tpu_custom_call") == 1
    assert [a.shape for a in exported.out_avals] == [(tokens, hq, dim), cache_shape]
    assert len(looked_up) == (1 if impl == "tpu" else 0)


@pytest.fixture(scope="module")
def interpreter_gap() -> str | None:
    """None if the installed JAX's TPU interpreter (what "tpu" runs in off a TPU) runs JAX's ragged paged attention, else why
    not. jax 0.10.2's cannot: the kernel reads its K/V buffer through a reshaped ref, which
    the interpreter's loads do not support (AttributeError: 'ReshapeTransform' object has no
    attribute 'indices'); its HLO interpreter rejects the strided K/V loads."""
    rng = np.random.default_rng(0)
    case = make_case(rng, [(5, 2)], num_q_heads=2, num_kv_heads=1, head_dim=128, page_size=4)
    try:
        out, _ = ragged_paged_attention(*case.args(jnp.float32), sm_scale=0.1, impl="tpu")
        out.block_until_ready()
    except Exception as err:  # the interpreter reports through a callback error
        if "ReshapeTransform" not in str(err) and "Unimplemented stride" not in str(err):
            raise
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call

        interpret_pallas_call.reset_tpu_interpret_mode_state()
        return f"jax {jax.__version__}'s TPU interpreter cannot run JAX's kernel"
    return None


CASES = {
    # name: (seqs, Hq, Hkv, D, page_size, dtype, sliding_window, soft_cap)
    "mixed_gqa_fp32": ([(37, 1), (20, 9), (50, 13), (3, 3)], 6, 2, 64, 16, jnp.float32,
                       None, None),
    "mixed_mha_bf16": ([(40, 1), (17, 17), (70, 5)], 2, 2, 128, 16, jnp.bfloat16, None, None),
    "window_cap_bf16": ([(45, 6), (9, 1), (150, 1)], 9, 3, 64, 8, jnp.bfloat16, 6, 4.0),
    "window_cap_fp32": ([(45, 6), (9, 1), (33, 33)], 8, 1, 128, 8, jnp.float32, 19, 9.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_jax_kernel_in_interpret_mode_matches_reference(name, interpreter_gap):
    if interpreter_gap:
        pytest.skip(interpreter_gap)
    seqs, hq, hkv, dim, page_size, dtype, window, cap = CASES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    case = make_case(rng, seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=dim,
                     page_size=page_size, pad_tokens=3, pad_seqs=1)
    shape = get_backend("tpu").kv_cache_shape(*case.kv_cache.shape[:2], hkv, dim, dtype)
    opts = dict(sm_scale=case.sm_scale, sliding_window=window, soft_cap=cap)
    out, cache = ragged_paged_attention(*args_in_layout(case, dtype, shape), impl="tpu", **opts)
    ref_out, _ = ragged_paged_attention(*case.args(dtype), impl="reference", **opts)
    want, want_cache = oracle(case, dtype, sliding_window=window, soft_cap=cap)
    real = int(case.cu_q_lens[len(seqs)])
    err = rel_err if dtype == jnp.float32 else rel_norm_err
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert err(out[:real], np.asarray(ref_out[:real].astype(jnp.float32), np.float64)) <= tol
    assert err(out[:real], want[:real]) <= tol
    assert np.all(np.asarray(out[real:].astype(jnp.float32)) == 0.0)
    np.testing.assert_array_equal(real_part(cache, case), want_cache)


def test_jax_backend_on_a_plain_layout_runs_our_kernel(caplog):
    """A cache not padded to JAX's kernel's rules (head_dim 64) runs on "tpu_own", said once
    in the log, and still matches the oracle."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    case = make_case(rng, [(30, 1), (12, 5)], num_q_heads=4, num_kv_heads=2, head_dim=64,
                     page_size=8, pad_tokens=2)
    with caplog.at_level("WARNING", logger="jaxllm.kernels.backends"):
        out, cache = ragged_paged_attention(*case.args(jnp.float32), sm_scale=case.sm_scale,
                                            impl="tpu")
    assert "running tpu_own" in caplog.text
    want, want_cache = oracle(case, jnp.float32)
    assert rel_err(out[:6], want[:6]) <= 1e-5 and np.all(np.asarray(out[6:]) == 0.0)
    np.testing.assert_array_equal(real_part(cache, case), want_cache)
