"""Programs saved by one start and loaded by the next: same outputs, no tracing, safe keys."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest

from jaxllm.conversions import load_checkpoint
from jaxllm.executable_store import ExecutableStore, describe_inputs, source_fingerprint
from jaxllm.llm import LLM
from jaxllm.models import build_model
from jaxllm.sampling_params import SamplingParams
from tests.oracles.plain_decode import plain_generate

SMALL = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, page_size=8)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir):
    cfg, params = load_checkpoint(tiny_model_dir, dtype="float32")
    return build_model(cfg, params, "float32")


def _prompts() -> list[list[int]]:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, size=n).tolist() for n in (3, 11, 20)]


def _generate(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_second_start_loads_every_program_and_decodes_the_same(tiny_model_dir, plain_model,
                                                              tmp_path):
    prompts = _prompts()
    expected = plain_generate(plain_model, prompts, max_new_tokens=6)
    first = LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path), **SMALL)
    assert first.engine.runner.loaded_programs == 0
    assert _generate(first, prompts) == expected
    saved = list((tmp_path / "programs").glob("*.pkl"))
    assert len(saved) == first.engine.runner.warm_compiles

    second = LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path), **SMALL)
    runner = second.engine.runner
    assert runner.loaded_programs == runner.warm_compiles == len(saved)
    cache_before = runner.kv_caches[0]
    assert _generate(second, prompts) == expected
    assert cache_before.is_deleted(), "loaded step programs must still donate the KV cache"
    assert runner.recompiles == 0
    second.engine.scheduler.check_invariants()
    assert second.engine.scheduler.allocator.num_used_pages == 0


def test_changed_inputs_do_not_load_another_configurations_programs(tiny_model_dir, tmp_path):
    LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path), **SMALL)
    other = LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path),
                kv_cache_dtype="bfloat16", **SMALL)
    assert other.engine.runner.loaded_programs == 0


def test_unreadable_program_files_are_compiled_instead(tiny_model_dir, plain_model, tmp_path,
                                                       caplog):
    prompts = _prompts()
    LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path), **SMALL)
    steps = sorted((tmp_path / "programs").glob("step-*.pkl"))
    for path in steps:
        path.write_bytes(path.read_bytes()[:100])  # truncated, as by a crash mid-write
    with caplog.at_level(logging.WARNING, logger="jaxllm.executable_store"):
        llm = LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path), **SMALL)
    runner = llm.engine.runner
    assert runner.loaded_programs == runner.warm_compiles - len(steps)
    assert sum("ignoring saved program" in r.message for r in caplog.records) == len(steps)
    assert _generate(llm, prompts) == plain_generate(plain_model, prompts, max_new_tokens=6)


def test_store_keys_cover_fingerprint_name_and_inputs(tmp_path):
    import jax
    import jax.numpy as jnp

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    compiled = jax.jit(lambda a: a * 2).trace(x).lower().compile()
    store = ExecutableStore(tmp_path, "fingerprint-a")
    store.save("double", describe_inputs((x,)), compiled)
    loaded = store.load("double", describe_inputs((x,)))
    np.testing.assert_array_equal(np.asarray(loaded(x)), x * 2)
    assert ExecutableStore(tmp_path, "fingerprint-b").load("double", describe_inputs((x,))) is None
    assert store.load("triple", describe_inputs((x,))) is None
    assert store.load("double", describe_inputs((x.astype(jnp.bfloat16),))) is None
    assert store.load("double", describe_inputs((x[:2],))) is None


def test_source_fingerprint_follows_every_source_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "sub" / "kernel.cc").write_text("int f() { return 1; }")
    package = types.SimpleNamespace(__file__=str(tmp_path / "__init__.py"))
    before = source_fingerprint([package])
    (tmp_path / "README.md").write_text("not source")
    assert source_fingerprint([package]) == before
    (tmp_path / "sub" / "kernel.cc").write_text("int f() { return 2; }")
    assert source_fingerprint([package]) != before


def test_programs_served_by_jax_cache_are_run_but_not_saved(tiny_model_dir, plain_model,
                                                            tmp_path):
    """An XLA CPU executable from JAX's persistent cache, serialized again, fails to run when
    a later process loads it ("Function ... not found"): such programs must not be saved."""
    prompts = _prompts()
    expected = plain_generate(plain_model, prompts, max_new_tokens=6)
    LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path), **SMALL)
    for path in (tmp_path / "programs").glob("*.pkl"):
        path.unlink()  # JAX's own cache (the same directory) still holds every program
    again = LLM(str(tiny_model_dir), compilation_cache_dir=str(tmp_path), **SMALL)
    assert again.engine.runner.loaded_programs == 0
    assert not list((tmp_path / "programs").glob("*.pkl"))
    assert _generate(again, prompts) == expected
