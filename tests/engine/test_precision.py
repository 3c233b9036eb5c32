"""Float32 models trace every dot at HIGHEST precision; bfloat16 models keep the default.

Checked on the lowered StableHLO (the text every backend compiles from), so it holds on CPU
what GPU and TPU would run: no TF32 / bf16-pass dot can hide in a float32 step.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.buckets import Bucket
from jaxllm.cache.kv_cache import allocate_kv_caches
from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.models.dense_attention import DenseMetadata, dense_causal_attention
from jaxllm.models.params import expected_param_shapes
from jaxllm.precision import matmul_precision_for, matmul_precision_name, with_matmul_precision
from jaxllm.runner import ModelRunner

DOT = re.compile(r"stablehlo\.(?:dot_general|dot|convolution)\b[^\n]*")


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def _tiny_model(dtype: str, seed: int):
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=32,
                      intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=128)
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in expected_param_shapes(cfg).items()}
    return cfg, build_model(cfg, params, dtype)


def _dots(hlo: str) -> list[str]:
    dots = DOT.findall(hlo)
    assert dots, "the lowered program has no dot at all"
    return dots


def _lowered_step(dtype: str, seed: int, bucket: Bucket, scoped: bool = True) -> str:
    """The runner's step program for `bucket`, lowered inside `matmul_precision_for(dtype)`
    (scoped) or as the runner alone lowers it."""
    cfg, model = _tiny_model(dtype, seed)
    kv = allocate_kv_caches(cfg, 8, 4, dtype)
    runner = ModelRunner(model, kv, attention_impl="reference", max_rows=bucket.num_seqs)
    if not scoped:
        return runner.lower_step(bucket).as_text()
    with matmul_precision_for(dtype):
        return runner.lower_step(bucket).as_text()


@pytest.mark.parametrize("bucket", [Bucket(8, 4, 2), Bucket(16, 8, 2)])
def test_float32_step_has_only_highest_precision_dots(bucket):
    dots = _dots(_lowered_step("float32", _fresh_seed(), bucket))
    loose = [d for d in dots if "precision = [HIGHEST, HIGHEST]" not in d]
    assert not loose, f"{len(loose)} of {len(dots)} dots below HIGHEST, e.g. {loose[0]}"


def test_runner_scopes_float32_precision_itself():
    dots = _dots(_lowered_step("float32", _fresh_seed(), Bucket(8, 4, 2), scoped=False))
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in dots)


def test_bfloat16_step_keeps_the_default_precision():
    dots = _dots(_lowered_step("bfloat16", _fresh_seed(), Bucket(8, 4, 2)))
    assert not [d for d in dots if "HIGHEST" in d]


def test_scope_ends_with_the_block_and_jit_retraces_outside():
    """The setting never leaks: outside the block the same jitted function lowers at the
    default precision again; `with_matmul_precision` keeps calls and lowerings inside it."""
    seed = _fresh_seed()
    _, model = _tiny_model("float32", seed)
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, 96, 7), jnp.int32)
    pos = jnp.arange(7, dtype=jnp.int32)
    md = DenseMetadata(segment_ids=jnp.zeros(7, jnp.int32), positions=pos)

    def forward(ids):
        hidden, _ = model(ids, pos, None, md, dense_causal_attention)
        return model.compute_logits(hidden)

    jitted = jax.jit(forward)
    with matmul_precision_for("float32"):
        inside = jitted.lower(ids).as_text()
    outside = jitted.lower(ids).as_text()
    assert all("HIGHEST" in d for d in _dots(inside))
    assert not any("HIGHEST" in d for d in _dots(outside))
    wrapped = with_matmul_precision(jitted, jnp.float32)
    assert all("HIGHEST" in d for d in _dots(wrapped.lower(ids).as_text()))
    np.testing.assert_allclose(np.asarray(wrapped(ids)), np.asarray(jitted(ids)),
                               rtol=1e-5, atol=1e-5)  # CPU: highest is what it ran anyway
    assert with_matmul_precision(jitted, jnp.bfloat16) is jitted
    assert jax.config.jax_default_matmul_precision is None


def test_precision_name_by_dtype():
    assert matmul_precision_name("float32") == "highest"
    assert matmul_precision_name(jnp.bfloat16) is None
    assert matmul_precision_name(np.float16) is None
