"""The GPU tier: every test under tests/gpu is marked `gpu` and runs only where JAX sees an
NVIDIA GPU; elsewhere it is collected and skipped. Run it with `pytest tests/gpu` (or
`make device-check`, which also runs the GPU benchmarks)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@cache
def gpu_available() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend in this jaxlib, or no device
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if not ours:
        return
    skip = None if gpu_available() else pytest.mark.skip(reason="needs an NVIDIA GPU (JAX sees none)")
    for item in ours:
        item.add_marker(pytest.mark.gpu)
        if skip is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random float32 Llama with a tokenizer (the default model's when installed)."""
    from benchmarks.random_model import SHAPES, make_random_model

    return make_random_model(tmp_path_factory.mktemp("random-llama"), SHAPES["tiny"],
                             dtype="float32", seed=1234)
