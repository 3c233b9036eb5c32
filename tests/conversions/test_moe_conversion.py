"""The conversion CLI on mixture-of-experts checkpoints: HF -> jaxllm (orbax) -> load is
bit-identical, stacked experts included."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.conversions import load_checkpoint, main
from tests.conversions.random_hf_dir import write_random_hf_dir
from tests.sharding.moe_worker import moe_config
from tests.sharding.tiny import fresh_seed

CONFIGS = {
    "mixtral": lambda: moe_config("MixtralForCausalLM", 6, 2),
    "qwen3_moe": lambda: moe_config("Qwen3MoeForCausalLM", 8, 3),
    "qwen2_moe_shared": lambda: moe_config("Qwen2MoeForCausalLM", 4, 2, shared=16),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_hf_to_orbax_and_back_is_bit_identical(tmp_path, kind, stored):
    src = write_random_hf_dir(tmp_path / "hf", CONFIGS[kind](), fresh_seed(), stored)
    dest = tmp_path / "out"
    assert main([str(src), str(dest)]) == 0
    direct, converted = load_checkpoint(src, "checkpoint"), load_checkpoint(dest, "checkpoint")
    assert converted.source_format == "jaxllm" and converted.config == direct.config
    assert ModelConfig.from_file(dest) == direct.config  # its HF-style config.json agrees
    assert converted.config.num_experts == CONFIGS[kind]().num_experts
    assert set(converted.params) == set(direct.params)
    for name, a in direct.params.items():
        b = converted.params[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(np.asarray(b).view(np.uint8), a.view(np.uint8), err_msg=name)
