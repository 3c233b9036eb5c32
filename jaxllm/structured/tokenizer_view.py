"""llguidance's view of the engine's tokenizer, built once per engine (about a second).

Built from the Hugging Face fast tokenizer the engine already has (`Tokenizer.hf`, whose
serialized backend llguidance reads) with the model's EOS ids, so EOS is allowed exactly when
the grammar accepts.
"""

from __future__ import annotations

from collections.abc import Iterable

import llguidance
import llguidance.hf

from jaxllm.tokenizer import Tokenizer


def build_llg_tokenizer(tokenizer: Tokenizer, eos_token_ids: Iterable[int]) -> llguidance.LLTokenizer:
    eos = sorted({int(t) for t in eos_token_ids})
    if not eos:
        raise ValueError("structured output needs the model's EOS token id")
    return llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=tokenizer.vocab_size,
                                        eos_token=eos)
