"""Streaming detokenization per token: standalone pieces and the Rust incremental decoder
against their Python twin.

    python benchmarks/detokenizer_bench.py [--tokens 3000] [--repeats 3]

Feeds one token per `add_token` (as the engine does for a streamed request) to an
`IncrementalDetokenizer` with the default model's tokenizer in three modes: the default
(a token's standalone piece where nothing is held back, else tokenizers' `DecodeStream` while
it sees the same window), `standalone_pieces=False` (the Rust decoder alone) and
`rust_stream=False` (two small decodes per token, `_decode_new` alone); on three streams: real
text (this repository's docs, encoded), random ids over the whole vocabulary, and random ids
below 512 (what `host_overhead.py`'s 512-token random model emits: a quarter of them raw
bytes, mostly invalid UTF-8, where the fast paths decline and the Python path decides).
Prints microseconds per token (best of the repeats) and the speed-up over the Python twin.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jaxllm.default_model import default_model_path
from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.tokenizer import load_tokenizer

DOCS = Path(__file__).resolve().parents[1] / "docs"


def per_token_us(tokenizer, ids: list[int], repeats: int, **mode) -> float:
    best = float("inf")
    for _ in range(repeats):
        detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], **mode)
        start = time.perf_counter()
        for token in ids:
            detok.add_token(token)
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tokenizer = load_tokenizer(default_model_path())
    text = "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    rng = np.random.default_rng(0)
    streams = {
        "real text (docs/*.md)": tokenizer.encode(text, add_special_tokens=False)[:args.tokens],
        "random ids, whole vocabulary": rng.integers(0, tokenizer.vocab_size, args.tokens).tolist(),
        "random ids < 512": rng.integers(3, 512, args.tokens).tolist(),
    }
    print("| stream | Python twin us/token | Rust stream | speed-up | pieces + Rust (default) "
          "| speed-up |")
    print("|---|---|---|---|---|---|")
    for name, ids in streams.items():
        python = per_token_us(tokenizer, ids, args.repeats, rust_stream=False)
        rust = per_token_us(tokenizer, ids, args.repeats, standalone_pieces=False)
        pieces = per_token_us(tokenizer, ids, args.repeats)
        print(f"| {name} | {python:.2f} | {rust:.2f} | {python / rust:.2f}x | {pieces:.2f} | "
              f"{python / pieces:.2f}x |")


if __name__ == "__main__":
    main()
