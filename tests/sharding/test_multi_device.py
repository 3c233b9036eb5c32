"""TP=2/4/8 and DP=2xTP=2 on 8 simulated CPU devices: same logits and greedy tokens as one device.

All cases run in one subprocess (the device count is fixed when jax starts), see
multi_device_worker.py; each test here asserts on one case's record.
"""


import pytest

from tests.sharding.tiny import fresh_seed, run_worker, worker_case

TP_CASES = ["smol_tp2", "smol_tp4", "smol_tp8", "llama_tp2", "qwen2_tp4", "untied_mqa_tp8"]
TP_OF = {"smol_tp2": 2, "smol_tp4": 4, "smol_tp8": 8, "llama_tp2": 2, "qwen2_tp4": 4,
         "untied_mqa_tp8": 8}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "results.json"
    return run_worker("tests.sharding.multi_device_worker", out, [str(fresh_seed())])


@pytest.mark.parametrize("name", TP_CASES)
def test_tensor_parallel_matches_single_device(results, name):
    r = worker_case(results, name)
    assert r["logits_err"] < 1e-5, (results["seed"], r["logits_err"])
    assert r["shard_map_logits_err"] < 1e-5, (results["seed"], r["shard_map_logits_err"])
    assert r["tokens_equal"], (results["seed"], r["tokens"], r["ref_tokens"])


def _expected_spec(suffix: str, tp: int, r) -> list:
    """What the rules promise, written out by hand per parameter kind."""
    m = "model"
    vocab = m if r["vocab"] % tp == 0 else None
    mlp = m if r["intermediate"] % tp == 0 else None
    return {
        "q_proj.kernel": [None, m], "k_proj.kernel": [None, m], "v_proj.kernel": [None, m],
        "q_proj.bias": [m], "k_proj.bias": [m], "v_proj.bias": [m],
        "o_proj.kernel": [m, None],
        "gate_proj.kernel": [None, mlp], "up_proj.kernel": [None, mlp],
        "down_proj.kernel": [mlp, None],
        "embed_tokens.embedding": [vocab, None], "lm_head.kernel": [None, vocab],
    }.get(suffix, [None])


@pytest.mark.parametrize("name", TP_CASES)
def test_param_and_cache_shardings_follow_rules(results, name):
    r, tp = worker_case(results, name), TP_OF[name]
    for pname, (spec, _shard) in r["params"].items():
        suffix = ".".join(pname.split(".")[-2:])
        assert spec == _expected_spec(suffix, tp, r), (pname, spec)
    hq, hkv = r["padded_heads"]
    assert hkv % tp == 0
    q_spec, q_shard = r["params"]["layers.0.q_proj.kernel"]
    assert q_shard[1] == hq * r["head_dim"] // tp
    # KV cache: heads split over `model`, each device holding whole K/V pairs.
    assert r["cache_spec"] == [None, None, "model", None]
    assert r["cache_shard"][2] == r["cache_shape"][2] // tp and r["cache_shard"][2] % 2 == 0


def test_data_parallel_slices_match_single_device(results):
    r = worker_case(results, "smol_dp2_tp2")
    assert r["logits_err"] < 1e-5 and r["tokens_equal"], (results["seed"], r)
    assert r["slice_devices"] == [[0, 1], [2, 3]]


def test_shard_mapped_paged_attention_matches_unsharded(results):
    r = worker_case(results, "paged_attention_tp4")
    assert r["out_err"] < 1e-6 and r["cache_equal"], (results["seed"], r)
