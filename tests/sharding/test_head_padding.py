"""pad_heads_for_tp: every shard gets whole KV groups, and the padded model computes the same logits."""

import dataclasses

import numpy as np
import pytest

from jaxllm.models import build_model
from jaxllm.parallel import pad_heads_for_tp, plan_head_layout
from tests.oracles.plain_decode import forward_logits
from tests.sharding.tiny import fresh_seed, hf_tiny_config, random_params, smol_shaped_config

# (num_heads, num_kv_heads, tp): SmolLM2's 9/3 over 2, 4, 8; MQA; more KV heads than shards.
LAYOUT_CASES = [(9, 3, 1), (9, 3, 2), (9, 3, 3), (9, 3, 4), (9, 3, 8), (4, 1, 8), (4, 2, 4),
                (8, 2, 8), (12, 6, 4), (4, 4, 3), (15, 5, 2)]


@pytest.mark.parametrize("hq,hkv,tp", LAYOUT_CASES)
def test_layout_gives_each_shard_whole_groups(hq, hkv, tp):
    layout = plan_head_layout(hq, hkv, tp)
    new_hq, new_hkv = layout.num_heads, layout.num_kv_heads
    assert new_hkv % tp == 0 and new_hq % new_hkv == 0
    group, new_group = hq // hkv, new_hq // new_hkv
    # Every original query head appears exactly once, next to a copy of its own KV head.
    real = [(j, s) for j, s in enumerate(layout.q_source) if s >= 0]
    assert sorted(s for _, s in real) == list(range(hq))
    for j, s in real:
        assert layout.kv_source[j // new_group] == s // group
    # Every original KV head survives; a zero KV head serves only zero query heads.
    assert set(range(hkv)) <= set(layout.kv_source)
    for k, src in enumerate(layout.kv_source):
        if src < 0:
            assert all(q < 0 for q in layout.q_source[k * new_group:(k + 1) * new_group])
    if hkv % tp == 0:
        assert layout.is_identity


def test_layout_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        plan_head_layout(9, 2, 2)
    with pytest.raises(ValueError, match=">= 1"):
        plan_head_layout(9, 3, 0)


def _tiny_cases():
    smol = smol_shaped_config()
    qwen2 = hf_tiny_config("qwen2")  # q/k/v biases
    qwen3 = hf_tiny_config("qwen3")  # q/k norms, head_dim 16
    untied = hf_tiny_config("llama3_scaled_untied")  # MQA, untied LM head
    return [(smol, 2), (smol, 4), (smol, 8), (qwen2, 4), (qwen3, 8), (untied, 2)]


@pytest.mark.parametrize("cfg,tp", _tiny_cases(),
                         ids=lambda x: str(x) if isinstance(x, int) else f"{x.architecture}-{x.num_heads}x{x.num_kv_heads}")
def test_padded_model_logits_equal_original(cfg, tp):
    seed = fresh_seed()
    params = random_params(cfg, seed)
    new_cfg, new_params = pad_heads_for_tp(cfg, params, tp)
    assert new_cfg.num_kv_heads % tp == 0
    assert dataclasses.replace(new_cfg, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads) == cfg
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 6, 11)]
    ref = forward_logits(build_model(cfg, params, "float32"), prompts)
    got = forward_logits(build_model(new_cfg, new_params, "float32"), prompts)
    for a, b in zip(got, ref, strict=True):
        err = float(np.abs(a - b).max() / np.abs(b).max())
        assert err < 1e-5, f"seed={seed} tp={tp} err={err}"


def test_no_padding_needed_returns_same_arrays():
    cfg = hf_tiny_config("llama")  # 4 q / 2 KV heads
    params = random_params(cfg, 0)
    new_cfg, new_params = pad_heads_for_tp(cfg, params, 2)
    assert new_cfg == cfg and all(new_params[k] is params[k] for k in params)
