"""Bad shapes, dtypes and options raise ValueError before any tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import (
    AttentionMetadata,
    default_impl,
    ragged_paged_attention,
    ragged_paged_attention_from_metadata,
)


def _good():
    t, hq, hkv, d, pages, ps, s, p = 5, 4, 2, 64, 6, 16, 2, 3
    f = jnp.float32
    return dict(
        q=jnp.ones((t, hq, d), f),
        k_new=jnp.ones((t, hkv, d), f),
        v_new=jnp.ones((t, hkv, d), f),
        kv_cache=jnp.zeros((pages, ps, 2 * hkv, d), f),
        kv_lens=jnp.array([3, 2], jnp.int32),
        page_indices=jnp.zeros((s, p), jnp.int32),
        cu_q_lens=jnp.array([0, 3, 5], jnp.int32),
        num_seqs=jnp.array([2], jnp.int32),
    )


def _call(overrides=None, **opts):
    args = _good()
    args.update(overrides or {})
    opts.setdefault("sm_scale", 0.125)
    return ragged_paged_attention(**args, **opts)


BAD = {
    "q rank": ({"q": jnp.ones((5, 64))}, "q must have rank 3"),
    "heads not multiple": ({"q": jnp.ones((5, 3, 64))}, "multiple of kv heads"),
    "token mismatch": ({"k_new": jnp.ones((4, 2, 64)), "v_new": jnp.ones((4, 2, 64))}, "tokens"),
    "k/v shapes": ({"v_new": jnp.ones((5, 2, 32))}, "same shape"),
    "head_dim": ({"k_new": jnp.ones((5, 2, 32)), "v_new": jnp.ones((5, 2, 32))}, "head_dim"),
    "cache heads": ({"kv_cache": jnp.zeros((6, 16, 2, 64))}, "2\\*Hkv"),
    "cache rank": ({"kv_cache": jnp.zeros((6, 16, 256))}, "rank 4"),
    "page too small": ({"kv_cache": jnp.zeros((6, 1, 4, 64))}, "page_size"),
    "page too big": ({"kv_cache": jnp.zeros((2, 512, 4, 64))}, "page_size"),
    "fp16": ({"q": jnp.ones((5, 4, 64), jnp.float16)}, "float32 or bfloat16"),
    "cache dtype": ({"kv_cache": jnp.zeros((6, 16, 4, 64), jnp.bfloat16)}, "must equal kv_cache"),
    "lens dtype": (
        {"kv_lens": jnp.array([3, 2], jnp.int64 if jax.config.x64_enabled else jnp.float32)},
        "int32",
    ),
    "table rows": ({"page_indices": jnp.zeros((3, 3), jnp.int32)}, "page_indices"),
    "cu length": ({"cu_q_lens": jnp.array([0, 5], jnp.int32)}, "cu_q_lens"),
    "num_seqs shape": ({"num_seqs": jnp.array([2, 2], jnp.int32)}, "num_seqs"),
    "not an array": ({"kv_lens": [3, 2]}, "must be an array"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_raise(name):
    overrides, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        _call(overrides)


@pytest.mark.parametrize(
    "opts,message",
    [
        ({"sm_scale": 0.0}, "sm_scale"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"soft_cap": -1.0}, "soft_cap"),
        ({"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_bad_options_raise(opts, message):
    with pytest.raises(ValueError, match=message):
        _call(**opts)


def test_metadata_is_a_pytree_and_default_impl():
    args = _good()
    md = AttentionMetadata(
        args["kv_lens"], args["page_indices"], args["cu_q_lens"], args["num_seqs"]
    )
    assert len(jax.tree_util.tree_leaves(md)) == 4
    out, _ = jax.jit(
        lambda md: ragged_paged_attention_from_metadata(
            args["q"], args["k_new"], args["v_new"], args["kv_cache"], md, sm_scale=0.125
        )
    )(md)
    assert out.shape == (5, 4, 64) and np.all(np.isfinite(np.asarray(out)))
    from jaxllm.kernels.native_build import native_attention_available

    assert default_impl("cpu") == ("cpu_native" if native_attention_available() else "cpu")
    assert default_impl("gpu") == default_impl("cuda") == "gpu"  # the recorded H200 run
    assert default_impl("tpu") == "tpu"  # JAX's own kernel
