"""Hub ids (`org/name[@revision]`) resolve through huggingface_hub's cache: a cache laid out
here as huggingface_hub lays it out, read with HF_HUB_OFFLINE=1 (no network), serves
resolve_model_path and LLM("org/name"); a model missing offline is a clear ValueError."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from jaxllm.conversions import load_checkpoint
from jaxllm.hub import HubModelId, parse_hub_id
from jaxllm.loading import resolve_model_path
from tests.conversions.random_hf_dir import write_random_hf_dir
from tests.sharding.tiny import fresh_seed, hf_tiny_config


def _offline_hub(monkeypatch, home: Path) -> Path:
    """HF_HOME=home, offline. huggingface_hub reads both when imported, so its constants are
    set too (as a process started with these variables would see them)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def _cache_snapshot(cache: Path, repo_id: str, ref: str, cfg, seed: int) -> Path:
    """A snapshot of `repo_id` in the cache, with branch/tag `ref` pointing at it."""
    sha = f"{np.random.default_rng(seed).integers(2**63):040x}"[:40]
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = write_random_hf_dir(repo / "snapshots" / sha, cfg, seed)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return snapshot


def test_parse_hub_id():
    assert parse_hub_id("org/name") == HubModelId("org/name", None)
    assert parse_hub_id("google/gemma-2-2b-it@v1.0") == HubModelId("google/gemma-2-2b-it", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == HubModelId("org/name", "refs/pr/3")
    assert str(parse_hub_id("org/name@main")) == "org/name@main"
    for not_an_id in ("/abs/dir", "a/b/c", "model.gguf", "name", "./org/x", "~/m", "org/x.gguf"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    cache = _offline_hub(monkeypatch, tmp_path / "hf")
    seed = fresh_seed()
    cfg = hf_tiny_config("llama")
    main = _cache_snapshot(cache, "org/tiny", "main", cfg, seed)
    other_cfg = dataclasses.replace(cfg, num_layers=cfg.num_layers + 1)
    tagged = _cache_snapshot(cache, "org/tiny", "v2", other_cfg, seed + 1)
    assert resolve_model_path("org/tiny") == main
    assert resolve_model_path("org/tiny@v2") == tagged
    assert resolve_model_path(f"org/tiny@{tagged.name}") == tagged  # a commit hash
    assert load_checkpoint(resolve_model_path("org/tiny")).config == cfg
    assert load_checkpoint(resolve_model_path("org/tiny@v2")).config == other_cfg


def test_missing_model_offline_names_id_and_cache(tmp_path, monkeypatch):
    cache = _offline_hub(monkeypatch, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"org/absent@v3.*not in the hub cache") as err:
        resolve_model_path("org/absent@v3")
    assert str(cache) in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope" / "deeper"))


def test_llm_serves_a_cached_hub_model(tmp_path, monkeypatch):
    from jaxllm.default_model import default_model_path
    from jaxllm.llm import LLM
    from jaxllm.models import build_model
    from jaxllm.sampling_params import SamplingParams
    from jaxllm.tokenizer import load_tokenizer
    from tests.oracles.plain_decode import plain_generate

    cache = _offline_hub(monkeypatch, tmp_path / "hf")
    seed = fresh_seed()
    cfg = dataclasses.replace(hf_tiny_config("llama"), vocab_size=512)
    snapshot = _cache_snapshot(cache, "org/chat", "main", cfg, seed)
    load_tokenizer(default_model_path()).save(snapshot)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 512, size=n).tolist() for n in (4, 11)]
    ckpt = load_checkpoint(snapshot, "float32")
    expected = plain_generate(build_model(ckpt.config, ckpt.params, "float32"), prompts,
                              max_new_tokens=4)
    llm = LLM("org/chat", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64,
              page_size=8, dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected, f"seed={seed}"
