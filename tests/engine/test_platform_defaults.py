"""Per-platform defaults: unset EngineConfig fields take the platform's values, set ones stay,
the start-up line says which is which, and accelerators compile fewer step programs."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.buckets import BucketSet
from jaxllm.config import EngineConfig
from jaxllm.platform_defaults import (
    canonical_platform,
    current_platform,
    defaults_for,
    describe,
    resolve_engine_config,
)

FIELDS = ("max_num_batched_tokens", "page_size", "memory_fraction", "compile_threads")


def _rng() -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence().entropy)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_unset_fields_take_the_platform_defaults(platform):
    cores = int(_rng().integers(1, 200))
    resolved = resolve_engine_config(EngineConfig(), platform, cpu_count=cores)
    d = defaults_for(platform, cores)
    assert {f: getattr(resolved.config, f) for f in FIELDS} == {f: getattr(d, f) for f in FIELDS}
    assert resolved.defaulted == frozenset(FIELDS)
    if platform == "cpu":
        assert (d.max_num_batched_tokens, d.page_size, d.compile_threads) == (512, 16, 2)
        assert (d.token_bucket_ratio, d.single_token_bucket) == (4, True)
    else:
        assert (d.max_num_batched_tokens, d.page_size) == (4096, 64)
        assert d.compile_threads == min(cores, 16)
        assert not d.single_token_bucket


def test_set_fields_are_kept_and_resolution_is_idempotent():
    rng = _rng()
    chosen = dict(max_num_batched_tokens=int(rng.integers(8, 9000)),
                  memory_fraction=float(rng.uniform(0.05, 1.0)))
    config = EngineConfig(**chosen)
    once = resolve_engine_config(config, "gpu", cpu_count=32)
    assert {k: getattr(once.config, k) for k in chosen} == chosen
    assert once.defaulted == {"page_size", "compile_threads"}
    assert config.page_size is None  # the caller's config is not modified
    twice = resolve_engine_config(once.config, "gpu", cpu_count=32)
    assert twice.config == once.config and twice.defaulted == frozenset()


def test_describe_names_every_value_and_marks_the_set_ones():
    rng = _rng()
    threads = int(rng.integers(1, 64))
    resolved = resolve_engine_config(EngineConfig(compile_threads=threads), "tpu", cpu_count=96)
    line = describe(resolved, attention_impl="tpu")
    assert line.startswith("platform tpu: ")
    assert "max_num_batched_tokens=4096," in line and "page_size=64," in line
    assert f"compile_threads={threads} (set)" in line
    assert "token buckets x4," in line and "1-token" not in line
    assert line.endswith("attention tpu")
    cpu_line = describe(resolve_engine_config(EngineConfig(), "cpu"), attention_impl="cpu")
    assert "+ 1-token" in cpu_line and "(set)" not in cpu_line


def test_describe_reports_the_kernels_default_attention():
    from jaxllm.kernels import default_impl

    line = describe(resolve_engine_config(EngineConfig(), "gpu", cpu_count=8))
    assert line.endswith(f"attention {default_impl('gpu')}")


def test_platform_names():
    assert canonical_platform("cuda") == canonical_platform("ROCM") == "gpu"
    assert canonical_platform("tpu") == "tpu"
    assert current_platform() == "cpu"  # this test machine
    with pytest.raises(ValueError, match="unknown platform"):
        canonical_platform("metal")


def test_accelerator_buckets_are_fewer_than_the_old_ratio_2_ladder():
    """The H200 run's shape (4096 tokens, 256 sequences, 4096 context, page 64): the accelerator
    ladder compiles fewer step programs than the ratio-2 ladder that took 62 s to warm up."""
    d = defaults_for("gpu", 16)
    seqs = int(_rng().choice([64, 128, 256]))
    ours = BucketSet(d.max_num_batched_tokens, seqs, 4096, d.page_size,
                     token_bucket_ratio=d.token_bucket_ratio,
                     single_token_bucket=d.single_token_bucket)
    old = BucketSet(4096, seqs, 4096, 64, token_bucket_ratio=2, single_token_bucket=False)
    assert len(ours.all()) < len(old.all())
    assert ours.token_buckets[-1] == 4096 and seqs in ours.token_buckets


def test_config_validates_set_values_only():
    EngineConfig(max_num_batched_tokens=None, memory_fraction=None, compile_threads=None)
    with pytest.raises(ValueError, match="compile_threads"):
        EngineConfig(compile_threads=0)
    with pytest.raises(ValueError, match="memory_fraction"):
        EngineConfig(memory_fraction=1.5)


def test_cli_leaves_platform_fields_unset_unless_given():
    from jaxllm.server.cli_args import parse_args

    engine, _ = parse_args([])
    assert all(getattr(engine, f) is None for f in FIELDS)
    threads = int(_rng().integers(1, 32))
    engine, _ = parse_args(["--compile-threads", str(threads), "--max-num-batched-tokens", "2048",
                            "--memory-fraction", "0.7"])
    assert (engine.compile_threads, engine.max_num_batched_tokens, engine.memory_fraction) == (
        threads, 2048, 0.7)
