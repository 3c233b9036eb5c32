"""Tiny synthetic GGUF files -> flat params: un-permuted q/k, dequantization, config, errors."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.conversions import detect_format, load_checkpoint, save_checkpoint
from jaxllm.conversions.gguf_loader import unpermute_rope_rows
from tests.conversions.tiny_gguf import llama_cpp_permute, quant_roundtrip, write_llama_gguf
from tests.conversions.tiny_hf import expected_flat

Q = gguf.GGMLQuantizationType


def _tiny_llama(seed: int, tied: bool):
    """A random llama; every input dimension is a multiple of 32 (the quantization block)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied, rope_theta=30000.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng()
    for heads, head_dim, cols in ((4, 8, 5), (1, 2, 3), (3, 64, 7)):
        w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)
        b = w[:, 0].copy()
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(b, heads), heads), b)
    with pytest.raises(ValueError, match="cannot un-permute"):
        unpermute_rope_rows(np.zeros((6, 2)), 2)


@pytest.mark.parametrize("tied", [True, False])
def test_f32_gguf_equals_hf_weights(tmp_path, tied):
    model = _tiny_llama(seed=int(np.random.SeedSequence().entropy % 1000), tied=tied)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config, _state(model))
    assert detect_format(path) == "gguf"
    loaded = load_checkpoint(path, "float32")
    assert loaded.source_format == "gguf" and loaded.tokenizer_path == path
    cfg, want_cfg = loaded.config, ModelConfig.from_hf_dict(model.config.to_dict())
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rope_scaling",
                  "max_position_embeddings", "tie_word_embeddings", "qkv_bias", "qk_norm"):
        assert getattr(cfg, field) == getattr(want_cfg, field), field
    assert cfg.rms_norm_eps == pytest.approx(want_cfg.rms_norm_eps)
    assert loaded.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    want = expected_flat(model)
    assert set(loaded.params) == set(want)
    for name, a in want.items():
        np.testing.assert_array_equal(loaded.params[name], a, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0])
def test_quantized_weights_dequantize(tmp_path, qtype):
    model = _tiny_llama(seed=7, tied=False)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config, _state(model), qtype=qtype)
    loaded = load_checkpoint(path, "float32").params
    c = model.config
    for hf_name, a in _state(model).items():
        if a.ndim != 2:
            continue
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(
            hf_name.split(".")[-2])
        stored = llama_cpp_permute(a, heads) if heads else a
        want = quant_roundtrip(stored, qtype)
        want = unpermute_rope_rows(want, heads) if heads else want
        name = {"model.embed_tokens.weight": "embed_tokens.embedding",
                "lm_head.weight": "lm_head.kernel"}.get(hf_name)
        if name is None:
            layer, module = hf_name.split(".")[2], hf_name.split(".")[-2]
            name = f"layers.{layer}.{module}.kernel"
        got = loaded[name] if name == "embed_tokens.embedding" else loaded[name].T
        np.testing.assert_array_equal(got, want, err_msg=name)
        if qtype not in (Q.F16, Q.BF16):  # a real quantizer loses something, but not much
            assert 0 < np.abs(got - a).max() < 0.35 * np.abs(a).max(), name


def test_gguf_to_orbax_round_trip(tmp_path):
    model = _tiny_llama(seed=9, tied=True)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config, _state(model), qtype=Q.Q8_0)
    direct = load_checkpoint(path, "float32")
    save_checkpoint(tmp_path / "out", direct.config, direct.params,
                    generation_config=direct.generation_config, hf_config=direct.hf_config)
    back = load_checkpoint(tmp_path / "out", "float32")
    assert back.config == direct.config and back.generation_config == direct.generation_config
    assert ModelConfig.from_file(tmp_path / "out") == direct.config
    for name, a in direct.params.items():
        np.testing.assert_array_equal(back.params[name], a, err_msg=name)


def test_gguf_errors(tmp_path):
    model = _tiny_llama(seed=3, tied=True)
    state = _state(model)
    missing = write_llama_gguf(tmp_path / "a.gguf", model.config, state,
                               drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing tensor.*layers\.1\.up_proj\.kernel"):
        load_checkpoint(missing)
    bad = dict(state)
    bad["model.layers.0.mlp.down_proj.weight"] = bad["model.layers.0.mlp.down_proj.weight"][:, :32]
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight has shape"):
        load_checkpoint(write_llama_gguf(tmp_path / "b.gguf", model.config, bad))
    rope = write_llama_gguf(tmp_path / "c.gguf", model.config, state,
                            extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):
        load_checkpoint(rope)
    gpt2 = write_llama_gguf(tmp_path / "d.gguf", model.config, state, arch="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_checkpoint(gpt2)
    good = write_llama_gguf(tmp_path / "e.gguf", model.config, state).read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="trunc.gguf"):
        load_checkpoint(tmp_path / "trunc.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"NOTGGUF" * 10)
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        load_checkpoint(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.gguf")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0])
@pytest.mark.parametrize("tied", [True, False])
def test_kept_blocks_stand_for_the_dequantized_weights(tmp_path, qtype, tied):
    """keep_blocks packs Q4_0/Q4_1/Q8_0 matrices (q/k rows un-permuted on the blocks) into
    weights bit-identical to the dequantized ones; other types load dense. The model built
    on the blocks gives the dense model's logits (vocab 40: a ragged 16-column group)."""
    from jaxllm.kernels.native_build import quantized_matmul_available
    from jaxllm.kernels.quantized_weights import PackedWeight, dequantize
    from jaxllm.models import build_model
    from jaxllm.models.quantized_layers import QuantizedMatmulOptions
    from tests.oracles.plain_decode import forward_logits

    seed = int(np.random.SeedSequence().entropy % 1000)
    model = _tiny_llama(seed=seed, tied=tied)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config, _state(model), qtype=qtype)
    dense = load_checkpoint(path, "float32")
    kept = load_checkpoint(path, "float32", keep_blocks=True)
    packable = qtype != Q.Q5_0
    for name, want in dense.params.items():
        got = kept.params[name]
        if not isinstance(got, PackedWeight):
            assert not packable or want.ndim == 1, name
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        assert packable and got.shape == want.shape, name
        w = np.asarray(dequantize(got.kind, jnp.asarray(got.codes), jnp.asarray(got.scales),
                                  None if got.mins is None else jnp.asarray(got.mins), got.n))
        np.testing.assert_array_equal(w.T if got.as_table else w, want, err_msg=f"seed={seed} {name}")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 40, size=n).tolist() for n in (1, 7, 19)]
    want = forward_logits(build_model(dense.config, dense.params, "float32"), prompts)
    got = forward_logits(build_model(kept.config, kept.params, "float32"), prompts)
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max(), f"seed={seed}"
    if packable:
        # bfloat16 activations reach every quantized layer: the logits move (both impls). How
        # far is not bounded here: randn-weighted tiny models are chaotic (one activation
        # rounded to the neighbouring bfloat16 moved logits 1-38% over 800 seeds). The products
        # are checked per call against a float64 oracle (test_quantized_matmul) and the whole
        # model's distance on SmolLM2 (tests/models/test_smollm2_vs_hf.py).
        impls = ("native", "reference") if quantized_matmul_available() else ("reference",)
        for impl in impls:
            rounded = forward_logits(build_model(kept.config, kept.params, "float32",
                                                 QuantizedMatmulOptions(impl, "bfloat16")), prompts)
            scale = max(np.abs(w).max() for w in want)
            moved = max(np.abs(g - w).max() for g, w in zip(rounded, want, strict=True)) / scale
            assert moved > 1e-5, f"seed={seed} {impl}: bfloat16 rounding did not happen"
    with pytest.raises(ValueError, match="compute in float32"):
        load_checkpoint(path, "bfloat16", keep_blocks=True)
    if packable:
        with pytest.raises(ValueError, match="compute in float32"):
            build_model(kept.config, kept.params, "bfloat16")


def test_engine_choice_of_kept_blocks(tmp_path):
    """EngineConfig.quantization: "auto" keeps blocks only where the native kernel serves,
    "gguf" insists (clear error naming what is in the way), "none" dequantizes."""
    from jaxllm.config import EngineConfig
    from jaxllm.kernels.native_build import quantized_matmul_available
    from jaxllm.loading import keep_gguf_blocks

    model = _tiny_llama(seed=5, tied=True)
    path = write_llama_gguf(tmp_path / "m.gguf", model.config, _state(model), qtype=Q.Q8_0)
    assert keep_gguf_blocks(EngineConfig(quantization="none"), path) is False
    assert keep_gguf_blocks(EngineConfig(quantization="gguf"), path) is True
    assert keep_gguf_blocks(EngineConfig(), path) is quantized_matmul_available()
    assert keep_gguf_blocks(EngineConfig(tensor_parallel_size=2), path) is False
    assert keep_gguf_blocks(EngineConfig(dtype="bfloat16"), path) is False
    with pytest.raises(ValueError, match="sharded"):
        keep_gguf_blocks(EngineConfig(quantization="gguf", tensor_parallel_size=2), path)
    with pytest.raises(ValueError, match="not a .gguf file"):
        keep_gguf_blocks(EngineConfig(quantization="gguf"), tmp_path)
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="awq")
    with pytest.raises(ValueError, match="quantized_activations must be one of"):
        EngineConfig(quantized_activations="int4")
