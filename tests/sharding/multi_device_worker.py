"""Run the multi-device sharding checks on simulated CPU devices; write one JSON record per case.

Invoked by test_multi_device.py in a subprocess with 8 host devices (the device count is fixed
when jax starts). Each record holds measured errors and facts; the test file asserts on them.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.cache.kv_cache import kv_cache_shape
from jaxllm.kernels import ragged_paged_attention
from jaxllm.models import build_model
from jaxllm.models.dense_attention import DenseMetadata, dense_causal_attention
from jaxllm.parallel import (
    data_slice_meshes,
    kv_cache_sharding,
    make_mesh,
    pad_heads_for_tp,
    shard_attention,
    shard_model,
)
from tests.kernels.ragged_cases import make_case
from tests.oracles.plain_decode import flatten_batch, forward_logits, plain_generate
from tests.sharding.tiny import hf_tiny_config, random_params, smol_shaped_config


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def param_specs(model) -> dict[str, tuple]:
    """Each param's actual placement: (spec as tuple, first shard's shape)."""
    out = {}
    for path, var in nnx.state(model, nnx.Param).flat_state():
        arr = var[...]
        name = ".".join(str(p) for p in path)
        spec = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
        out[name] = (list(spec), list(arr.addressable_shards[0].data.shape))
    return out


@nnx.jit(static_argnums=(4,))
def _forward_with(model, ids, pos, seg, attention_fn):
    md = DenseMetadata(segment_ids=seg, positions=pos)
    hidden, _ = model(ids, pos, None, md, attention_fn)
    return model.compute_logits(hidden)


def tp_case(cfg, tp: int, seed: int, prompts) -> dict:
    params = random_params(cfg, seed)
    ref_model = build_model(cfg, params, "float32")
    ref_logits = forward_logits(ref_model, prompts)
    ref_tokens = plain_generate(ref_model, prompts, max_new_tokens=4)

    mesh = make_mesh(tp, 1, jax.devices()[:tp])
    pcfg, pparams = pad_heads_for_tp(cfg, params, tp)
    model = shard_model(build_model(pcfg, pparams, "float32"), mesh)
    with jax.set_mesh(mesh):
        logits = forward_logits(model, prompts)
        tokens = plain_generate(model, prompts, max_new_tokens=4)
        ids, pos, seg = flatten_batch(prompts)
        sharded_attn = shard_attention(dense_causal_attention, mesh)
        full = np.asarray(_forward_with(model, jnp.asarray(ids), jnp.asarray(pos),
                                        jnp.asarray(seg), sharded_attn))
    off, shard_map_err = 0, 0.0
    for p, r in zip(prompts, ref_logits, strict=True):
        shard_map_err = max(shard_map_err, rel_err(full[off:off + len(p)], r))
        off += len(p)
    cache_shape = kv_cache_shape(pcfg, 6, 4)
    cache = jnp.zeros(cache_shape, jnp.float32, device=kv_cache_sharding(mesh, cache_shape=cache_shape))
    return dict(
        logits_err=max(rel_err(a, b) for a, b in zip(logits, ref_logits, strict=True)),
        shard_map_logits_err=shard_map_err,
        tokens_equal=tokens == ref_tokens, tokens=tokens, ref_tokens=ref_tokens,
        params=param_specs(model), padded_heads=[pcfg.num_heads, pcfg.num_kv_heads],
        vocab=cfg.vocab_size, intermediate=cfg.intermediate_size, head_dim=cfg.head_dim,
        cache_spec=list(cache.sharding.spec), cache_shard=list(cache.addressable_shards[0].data.shape),
        cache_shape=list(cache_shape),
    )


def dp_case(cfg, tp: int, dp: int, seed: int, prompts) -> dict:
    """Each data slice its own sharded copy serving its own prompts: all equal single-device."""
    params = random_params(cfg, seed)
    ref_model = build_model(cfg, params, "float32")
    mesh = make_mesh(tp, dp, jax.devices()[:tp * dp])
    pcfg, pparams = pad_heads_for_tp(cfg, params, tp)
    errs, equal, slice_devices = [], [], []
    for i, sub in enumerate(data_slice_meshes(mesh)):
        mine = prompts[i::dp]
        model = shard_model(build_model(pcfg, pparams, "float32"), sub)
        q = model.layers[0].q_proj.kernel[...]
        slice_devices.append(sorted(d.id for d in q.sharding.device_set))
        with jax.set_mesh(sub):
            got = forward_logits(model, mine)
            toks = plain_generate(model, mine, max_new_tokens=4)
        ref = forward_logits(ref_model, mine)
        errs.append(max(rel_err(a, b) for a, b in zip(got, ref, strict=True)))
        equal.append(toks == plain_generate(ref_model, mine, max_new_tokens=4))
    return dict(logits_err=max(errs), tokens_equal=all(equal), slice_devices=slice_devices)


def paged_attention_case(seed: int, tp: int = 4) -> dict:
    """shard_map'd ragged paged attention (reference kernel) equals the unsharded call."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, [(9, 3), (5, 5), (14, 1)], num_q_heads=8, num_kv_heads=4,
                     head_dim=16, page_size=4, pad_tokens=3, pad_seqs=1)
    q, k, v, cache, kv_lens, pages, cu, ns = case.args(jnp.float32)
    md = (kv_lens, pages, cu, ns)

    def attn(q, k, v, cache, md, **kw):
        return ragged_paged_attention(q, k, v, cache, *md, impl="reference", **kw)

    ref_out, ref_cache = jax.jit(lambda *a: attn(*a, sm_scale=case.sm_scale))(q, k, v, cache, md)
    mesh = make_mesh(tp, 1, jax.devices()[:tp])
    sharded = shard_attention(attn, mesh)
    cache_s = jax.device_put(cache, kv_cache_sharding(mesh, cache_shape=cache.shape))
    out, new_cache = jax.jit(lambda *a: sharded(*a, sm_scale=case.sm_scale))(q, k, v, cache_s, md)
    real = int(cu[case.num_seqs[0]])
    return dict(
        out_err=rel_err(out[:real], ref_out[:real]),
        cache_equal=bool(np.array_equal(np.asarray(new_cache), np.asarray(ref_cache), equal_nan=True)),
        cache_spec=list(new_cache.sharding.spec),
    )


def main(out_path: str, seed: int) -> None:
    assert jax.device_count() == 8, jax.device_count()
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 90, size=n).tolist() for n in (1, 5, 9, 13)]
    smol = smol_shaped_config()
    cases = {
        "smol_tp2": lambda: tp_case(smol, 2, seed, prompts),
        "smol_tp4": lambda: tp_case(smol, 4, seed, prompts),
        "smol_tp8": lambda: tp_case(smol, 8, seed, prompts),
        "llama_tp2": lambda: tp_case(hf_tiny_config("llama"), 2, seed, prompts),
        "qwen2_tp4": lambda: tp_case(hf_tiny_config("qwen2"), 4, seed, prompts),
        "untied_mqa_tp8": lambda: tp_case(hf_tiny_config("llama3_scaled_untied"), 8, seed, prompts),
        "smol_dp2_tp2": lambda: dp_case(smol, 2, 2, seed, prompts),
        "paged_attention_tp4": lambda: paged_attention_case(seed),
    }
    results = {}
    for name, fn in cases.items():
        try:
            results[name] = fn()
        except Exception:  # recorded, asserted on by the test
            results[name] = {"error": traceback.format_exc()}
    results["seed"] = seed
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
