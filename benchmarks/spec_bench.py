"""Speculative decoding (n-gram prompt lookup, a draft model or an EAGLE head) against plain
decoding, same run.

    python benchmarks/spec_bench.py [--max-tokens 128] [--num-speculative-tokens 4]
    python benchmarks/spec_bench.py --speculative-mode draft --speculative-model PATH
    python benchmarks/spec_bench.py --speculative-mode eagle --speculative-model PATH

`--speculative-mode draft` proposes with a draft model (an HF directory of the default
model's vocabulary, 49152 tokens) instead of the n-gram lookup, `--speculative-mode eagle`
with an EAGLE-1 head for the default model (HF directory: hidden size 576, that vocabulary);
everything else is the same.

Batch 1: each prompt of benchmarks/spec_prompts.py's COPY_HEAVY set (rewrite / extract /
continue-a-list / edit code: the answer repeats the prompt) and NO_COPY set (nothing to copy),
chat-templated, greedy, run alone, with `--speculative-mode ngram` and without; prints output
tok/s of each set (wall time, prefill included), the decode rate (after each request's first
token: what speculation changes), their ratios and the acceptance (accepted / proposed drafts, tokens per
verification). Batch 32: all 16 prompts twice at once, with and without speculation (at that
batch the engine does not speculate: `speculative_disable_by_batch_size`), to show the cost of
having it on. Greedy speculation emits exactly the plain greedy output; the script checks it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_prompts import COPY_HEAVY, NO_COPY  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, batch: int):
    """(output tokens per second, decode tokens per second, outputs) running `prompts`
    `batch` at a time. The decode rate counts each request's tokens after its first over the
    time after its first token: the prefill (the same in both modes, and on a CPU a large
    share of a short answer's time) left out."""
    outs, tokens, start = [], 0, time.perf_counter()
    decode_tokens, decode_s = 0, 0.0
    for i in range(0, len(prompts), batch):
        res = llm.generate(prompts[i:i + batch], params, use_tqdm=False)
        outs += [r.outputs[0].token_ids for r in res]
        tokens += sum(len(r.outputs[0].token_ids) for r in res)
        decode_tokens += sum(len(r.outputs[0].token_ids) - 1 for r in res)
        decode_s += max(r.metrics.finished_time for r in res) - min(
            r.metrics.first_token_time for r in res)
    return tokens / (time.perf_counter() - start), decode_tokens / decode_s, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=7)
    ap.add_argument("--speculative-mode", choices=["ngram", "draft", "eagle"], default="ngram")
    ap.add_argument("--speculative-model", default=None,
                    help="draft model or EAGLE head (HF dir) for --speculative-mode draft / eagle")
    args = ap.parse_args()
    if (args.speculative_mode in ("draft", "eagle")) != (args.speculative_model is not None):
        ap.error("--speculative-model goes with --speculative-mode draft or eagle (and only "
                 "with them)")
    common = dict(max_model_len=1024)
    plain = LLM(**common)
    spec = LLM(speculative_mode=args.speculative_mode, speculative_model=args.speculative_model,
               num_speculative_tokens=args.num_speculative_tokens, **common)
    mode = args.speculative_mode
    tok = plain.get_tokenizer()

    def chat(text: str) -> list[int]:
        return tok.apply_chat_template_ids([{"role": "user", "content": text}])

    sets = {"copy-heavy": [chat(t) for t in COPY_HEAVY.values()],
            "no-copy": [chat(t) for t in NO_COPY.values()]}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for llm in (plain, spec):  # warm both (first calls touch lazily built state)
        run(llm, sets["copy-heavy"][:1], SamplingParams(temperature=0.0, max_tokens=8), 1)
    print(f"default model, greedy, max_tokens {args.max_tokens}, "
          f"k = {args.num_speculative_tokens}, {mode}"
          + (f" ({args.speculative_model})" if args.speculative_model else ""))
    print(f"| set | batch | plain tok/s | {mode} tok/s | ratio | decode tok/s plain / {mode} "
          "| decode ratio | accepted / proposed | tokens per verification |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, prompts in [*sets.items(), ("all x2", (sets["copy-heavy"] + sets["no-copy"]) * 2)]:
        batch = 1 if name != "all x2" else 32
        before = spec.engine.get_stats()
        p_rate, p_decode, p_out = run(plain, prompts, params, batch)
        s_rate, s_decode, s_out = run(spec, prompts, params, batch)
        after = spec.engine.get_stats()
        if p_out != s_out:
            print(f"WARNING: {name}: speculative output differs from plain greedy output")
        proposed = after.spec_proposed_tokens - before.spec_proposed_tokens
        accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
        rate = f"{accepted}/{proposed} = {accepted / proposed:.2f}" if proposed else "-"
        print(f"| {name} | {batch} | {p_rate:.1f} | {s_rate:.1f} | {s_rate / p_rate:.2f}x | "
              f"{p_decode:.1f} / {s_decode:.1f} | {s_decode / p_decode:.2f}x | "
              f"{rate} | {after.spec_mean_acceptance_length:.2f} |")


if __name__ == "__main__":
    main()
