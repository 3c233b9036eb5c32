"""The model registry: architecture names reach their family, the family's tables agree with
independent twins, a newly registered family is used end to end, one "auto" dtype rule."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.models import CausalLM, ModelFamily, build_model, registry
from jaxllm.models.dtypes import auto_dtype_name, resolve_compute_dtype, resolve_param_dtype
from jaxllm.models.llama_family import LlamaFamily
from jaxllm.models.params import check_params, expected_param_shapes, logical_axes
from tests.models.gemma_tiny import random_gemma_config
from tests.models.hf_tiny import ARCH_CONFIGS, hf_state_to_flat, make_tiny_hf_model
from tests.oracles.plain_decode import forward_logits
from tests.sharding.tiny import fresh_seed, hf_tiny_config, random_params


def _random_config(arch: str, rng: np.random.Generator) -> ModelConfig:
    kv = int(rng.integers(1, 4))
    heads = kv * int(rng.integers(1, 4))
    head_dim = 2 * int(rng.integers(2, 9))
    qwen = arch.startswith("Qwen")
    bias = bool(rng.integers(2))
    scaling = (RopeScaling() if rng.integers(2) else
               RopeScaling("llama3", float(rng.integers(2, 9)), 1.0, 4.0, int(rng.integers(64, 512))))
    return ModelConfig(
        architecture=arch, vocab_size=int(rng.integers(10, 300)),
        hidden_size=int(rng.integers(8, 100)), intermediate_size=int(rng.integers(8, 100)),
        num_layers=int(rng.integers(1, 5)), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        rms_norm_eps=float(rng.choice([1e-5, 1e-6])), rope_theta=float(rng.integers(1, 10**6)),
        rope_scaling=scaling, max_position_embeddings=int(rng.integers(16, 4096)),
        tie_word_embeddings=bool(rng.integers(2)),
        qkv_bias=True if arch == "Qwen2ForCausalLM" else bias,
        o_bias=False if qwen else bias, mlp_bias=bool(rng.integers(2)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=int(rng.integers(2, 64)) if rng.integers(2) else None,
        bos_token_id=int(rng.integers(0, 10)),
        eos_token_ids=tuple(int(x) for x in rng.integers(0, 10, size=int(rng.integers(0, 3)))),
        torch_dtype=str(rng.choice(["float32", "bfloat16", "float16"])))


def _random_moe_config(arch: str, rng: np.random.Generator) -> ModelConfig:
    """A random config of a mixture-of-experts architecture (attention as its Llama twin's)."""
    base = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen3MoeForCausalLM": "Qwen3ForCausalLM",
            "Qwen2MoeForCausalLM": "Qwen2ForCausalLM"}[arch]
    cfg = _random_config(base, rng)
    experts = int(rng.integers(2, 9))
    width = cfg.intermediate_size
    return dataclasses.replace(
        cfg, architecture=arch, num_experts=experts,
        num_experts_per_tok=int(rng.integers(1, experts + 1)),
        moe_intermediate_size=width if arch == "MixtralForCausalLM" else int(rng.integers(8, 100)),
        norm_topk_prob=True if arch == "MixtralForCausalLM" else bool(rng.integers(2)),
        shared_expert_intermediate_size=int(rng.integers(8, 100)) if arch.startswith("Qwen2") else 0)


@pytest.mark.parametrize("arch", registry.supported_architectures())
def test_config_to_hf_and_back_is_identity(arch):
    rng = np.random.default_rng(fresh_seed())
    family = registry.family_for(arch)
    for _ in range(20):
        cfg = (_random_moe_config(arch, rng) if "Moe" in arch or arch.startswith("Mixtral")
               else random_gemma_config(arch, rng) if arch.startswith("Gemma")
               else _random_config(arch, rng))
        assert ModelConfig.from_hf_dict(family.config_to_hf(cfg)) == cfg


def test_unknown_names_are_refused_with_the_supported_ones():
    assert all(isinstance(f, ModelFamily) for f in registry.FAMILIES)
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        registry.family_for("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="qwen3"):
        registry.family_for_gguf("gpt2")
    assert registry.architecture_of({"model_type": "qwen3"}) == "Qwen3ForCausalLM"
    assert registry.architecture_of({"architectures": ["X"], "model_type": "llama"}) == "X"


@pytest.mark.parametrize("kind", sorted(ARCH_CONFIGS))
def test_hf_name_map_matches_an_independent_renaming(kind):
    """Every tensor of a transformers model maps to the name the test twin gives it, and back."""
    hf = make_tiny_hf_model(kind, fresh_seed())
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    names = registry.family_for(cfg.architecture).hf_names
    twin = hf_state_to_flat(hf)
    mapped = {}
    for hf_name, tensor in hf.state_dict().items():
        ours, transpose = names.to_jaxllm(hf_name)
        if ours == "lm_head.kernel" and cfg.tie_word_embeddings:
            continue
        mapped[ours] = tensor.numpy().T if transpose else tensor.numpy()
        assert names.to_source(ours) == hf_name
    assert mapped.keys() == twin.keys() == expected_param_shapes(cfg).keys()
    for name, a in mapped.items():
        np.testing.assert_array_equal(a, twin[name], err_msg=name)


@pytest.mark.parametrize("arch", registry.supported_architectures())
def test_every_parameter_has_axes_of_its_rank_and_source_names(arch):
    rng = np.random.default_rng(fresh_seed())
    family = registry.family_for(arch)
    for _ in range(5):
        cfg = (_random_moe_config(arch, rng) if "Moe" in arch or arch.startswith("Mixtral")
               else random_gemma_config(arch, rng) if arch.startswith("Gemma")
               else _random_config(arch, rng))
        for name, shape in expected_param_shapes(cfg).items():
            assert len(logical_axes(name, arch)) == len(shape) and logical_axes(name) == \
                logical_axes(name, arch), name
            reads_gguf = bool(family.gguf_names.top or family.gguf_names.layer)
            for names in (family.hf_names, family.gguf_names) if reads_gguf else (family.hf_names,):
                if names is family.gguf_names and cfg.mlp_bias and "_proj.bias" in name \
                        and name.split(".")[-2] in ("gate_proj", "up_proj", "down_proj"):
                    continue  # llama.cpp's Llama conversion has no MLP biases
                assert names.to_jaxllm(names.to_source(name))[0] == name
    assert family.gguf_names.to_jaxllm("blk.x.attn_q.weight") is None
    assert family.hf_names.to_jaxllm("model.layers.0.self_attn.rotary_emb.inv_freq") is None


class _ToyFamily(LlamaFamily):
    """A new architecture that happens to reuse the Llama network: only registered here."""

    name = "toy"
    architectures = ("ToyForCausalLM",)
    model_types = {"toy": "ToyForCausalLM"}
    gguf_architectures = {}

    def __init__(self) -> None:
        self.built = 0

    def config_from_hf(self, d, architecture):
        return dataclasses.replace(super().config_from_hf(d, "LlamaForCausalLM"),
                                   architecture=architecture)

    def build(self, cfg, params, dtype, quantized, max_positions):
        self.built += 1
        return super().build(cfg, params, dtype, quantized, max_positions)


def test_a_registered_family_is_used_for_config_shapes_and_building(monkeypatch):
    toy = _ToyFamily()
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, toy))
    seed = fresh_seed()
    llama_cfg = hf_tiny_config("llama")
    hf = {**toy.config_to_hf(llama_cfg), "architectures": [], "model_type": "toy"}
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.architecture == "ToyForCausalLM"
    assert cfg == dataclasses.replace(llama_cfg, architecture="ToyForCausalLM")
    params = random_params(llama_cfg, seed)
    check_params(cfg, params, "toy")
    model = build_model(cfg, params, "float32")
    assert toy.built == 1 and isinstance(model, CausalLM)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 6, 13)]
    want = forward_logits(build_model(llama_cfg, params, "float32"), prompts)
    for got, ref in zip(forward_logits(model, prompts), want, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_dtype_policy(backend):
    want = {"float32": "float32", "torch.bfloat16": "bfloat16", "bf16": "bfloat16",
            "float16": "bfloat16", "float64": "float32"}
    for stored, on_accelerator in want.items():
        expected = "float32" if backend == "cpu" else on_accelerator
        assert auto_dtype_name(stored, backend) == expected, stored


def test_loaders_and_builder_resolve_auto_alike():
    for stored in ("float32", "bfloat16", "float16"):
        assert resolve_param_dtype("auto", stored) == resolve_compute_dtype("auto", stored)
    assert resolve_param_dtype("checkpoint", "float16") == np.float16
    assert resolve_param_dtype("bfloat16", "float32") == ml_dtypes.bfloat16
    assert resolve_compute_dtype(jnp.bfloat16) == jnp.bfloat16
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        resolve_compute_dtype("float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_param_dtype("int8", "float32")
