"""`ServerConfig.freeze_gc`: the app that builds its engine freezes the objects alive after the
engine's warm-up (a full garbage collection then skips them), and only then. Run in a
subprocess: freezing this test process would keep its later garbage forever."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer
    from tests.models.hf_tiny import make_tiny_hf_model

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_hf_model("llama", seed=7, vocab_size=512).save_pretrained(path)
    load_tokenizer(default_model_path()).save(path)
    return path


def _frozen_after_startup(model_dir, freeze: bool) -> int:
    code = textwrap.dedent(f"""
        import gc
        from fastapi.testclient import TestClient
        from jaxllm.config import EngineConfig
        from jaxllm.server.app import build_app
        from jaxllm.server.server_config import ServerConfig
        config = EngineConfig(model={str(model_dir)!r}, max_num_seqs=2, max_model_len=64,
                              max_num_batched_tokens=32)
        before = gc.get_freeze_count()
        with TestClient(build_app(config, server_config=ServerConfig(freeze_gc={freeze}))) as c:
            assert c.get("/v1/models").status_code == 200
            print(before, gc.get_freeze_count())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert before == 0
    return after


def test_server_freezes_the_heap_after_warm_up_only_when_asked(tiny_model_dir):
    assert _frozen_after_startup(tiny_model_dir, True) > 100_000  # libraries, model, engine
    assert _frozen_after_startup(tiny_model_dir, False) == 0
