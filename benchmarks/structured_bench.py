"""Structured output cost: batch throughput with every row constrained by a JSON schema
against the same batch unconstrained, and the time-to-first-token cost of compiling a grammar
with and without the cache of compiled grammars.

    python benchmarks/structured_bench.py [--batch 32] [--max-tokens 256] [--rounds 2]
        [--repeats 5]
        [--variant quantized_activations=bfloat16,kv_cache_dtype=bfloat16]

Default model, one engine, same run. The constrained pass samples at temperature 1 (seeded);
the unconstrained pass then replays exactly those per-row lengths (EOS ignored), so both
passes produce the same tokens per row and the same batch occupancy over time: the ratio of
their tok/s is the price of the grammars (host mask filling, the sampler waiting for it).
`valid` and `finished_stop` count the last constrained round's outputs that validate
against the schema and that ended with "stop" (all of them unless max_tokens cut some).
TTFT: a one-token request with a schema never seen (cache miss: compile + validate) against
the same schema again (cache hit); the first structured request also builds llguidance's
tokenizer view, reported on its own. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["title", "year", "cast"],
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genre": {"enum": ["drama", "comedy", "action", "documentary"]},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "cast": {"type": "array", "maxItems": 6, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "role"],
            "properties": {"name": {"type": "string", "maxLength": 30},
                           "role": {"type": "string", "maxLength": 30}}}},
    },
}
TOPICS = ["a space opera", "a heist", "a road trip", "a courtroom drama", "a cooking contest",
          "a haunted lighthouse", "a chess prodigy", "a mountain rescue"]


def _engine_options(variant: str | None) -> dict:
    if not variant:
        return {}
    return dict(kv.split("=", 1) for kv in variant.split(","))


def throughput(llm, batch: int, max_tokens: int, rounds: int) -> dict:
    """Constrained and unconstrained passes alternate `rounds` times (the prefix cache reset
    before each, so neither reuses the other's prompts); the best of each is kept."""
    from jaxllm import SamplingParams

    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template_ids([{"role": "user", "content":
               f"Describe {TOPICS[i % len(TOPICS)]} film as JSON with title, year and cast."}])
               for i in range(batch)]
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                  guided_json=SCHEMA) for i in range(batch)]
    llm.generate(prompts[:2], constrained[:2], use_tqdm=False)  # tokenizer view + compile

    def timed(params) -> tuple[float, list]:
        llm.engine.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t, outs

    constrained_s, plain_s = [], []
    for _ in range(rounds):
        seconds, outs = timed(constrained)
        constrained_s.append(seconds)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        plain = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
                 for i, n in enumerate(lengths)]
        plain_s.append(timed(plain)[0])
    total = sum(lengths)
    return {"batch": batch, "tokens": total, "mean_len": total / batch,
            "valid": sum(_valid(o.outputs[0].text) for o in outs),
            "finished_stop": sum(o.outputs[0].finish_reason == "stop" for o in outs),
            "constrained_tok_s": total / min(constrained_s),
            "unconstrained_tok_s": total / min(plain_s),
            "ratio": min(plain_s) / min(constrained_s),
            "rounds_s": {"constrained": constrained_s, "unconstrained": plain_s}}


def _valid(text: str) -> bool:
    import jsonschema

    try:
        return jsonschema.Draft202012Validator(SCHEMA).is_valid(json.loads(text))
    except json.JSONDecodeError:
        return False


def ttft(llm, repeats: int) -> dict:
    """One-token requests: fresh schemas (cache misses) vs a repeated one (hits)."""
    from jaxllm import SamplingParams
    from jaxllm.structured.spec import StructuredOutputsParams

    def first_token_s(schema: dict) -> float:
        t = time.perf_counter()
        llm.generate(["Reply in JSON."], SamplingParams(max_tokens=1, guided_json=schema),
                     use_tqdm=False)
        return time.perf_counter() - t

    def plain_s() -> float:
        t = time.perf_counter()
        llm.generate(["Reply in JSON."], SamplingParams(max_tokens=1), use_tqdm=False)
        return time.perf_counter() - t

    grammars = llm.engine.grammars
    fresh = [dict(SCHEMA, description=f"variant {i} {time.time_ns()}") for i in range(repeats)]
    compile_ms = []
    for schema in fresh:  # compile alone, on copies the requests below never use
        t = time.perf_counter()
        grammars.compile(StructuredOutputsParams(json=dict(schema, title=str(time.time_ns()))))
        compile_ms.append(1000 * (time.perf_counter() - t))
    miss = [first_token_s(s) for s in fresh]
    hit = [first_token_s(fresh[0]) for _ in range(repeats)]
    base = [plain_s() for _ in range(repeats)]
    return {"compile_ms_median": statistics.median(compile_ms),
            "ttft_unconstrained_ms": 1000 * statistics.median(base),
            "ttft_cache_miss_ms": 1000 * statistics.median(miss),
            "ttft_cache_hit_ms": 1000 * statistics.median(hit),
            "cache": {"hits": grammars.stats.hits, "misses": grammars.stats.misses}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variant", default=None, help="engine options name=value,...")
    args = ap.parse_args()

    from jaxllm import LLM

    t = time.perf_counter()
    llm = LLM(max_num_seqs=args.batch, max_model_len=1024, **_engine_options(args.variant))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    _ = llm.engine.grammars.tokenizer  # llguidance's view of the tokenizer, built once
    view_s = time.perf_counter() - t
    result = {"load_s": load_s, "tokenizer_view_s": view_s,
              "throughput": throughput(llm, args.batch, args.max_tokens, args.rounds),
              "ttft": ttft(llm, args.repeats), "variant": args.variant,
              "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"structured_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
