"""Host overhead of the engine loop: how much of its own device step's rate the engine delivers.

    python benchmarks/host_overhead.py [--batches 1,64,256] [--output-len 64] [--profile]
        [--output-kind delta|cumulative|final_only] [--stub-device [--phases]]

A tiny random-weight Llama (its device step is much cheaper than the host work around it)
runs B requests of 32 prompt + `--output-len` output tokens. For each batch B it prints:
- runner only: the decode step's time with the runner alone (forward + sampler + fetch of a
  ready-made batch-B decode step), i.e. the rate the device could deliver;
- end to end, serial and overlapped loops: decode tok/s of `LLMEngine.step` (steady state:
  steps where every request decodes), as a fraction of the runner-only rate;
- host ms per step: wall time of a step minus the time it waited for the device.
Requests are streamed with `--output-kind` (`SamplingParams.output_kind`): delta (the default:
an output per request per step carrying its new token, as the server's streams), cumulative
(each output copies everything so far) or final_only (one output at the finish, as
`LLM.generate` and non-streaming HTTP requests).
The heap is frozen after warm-up (`gc.freeze()`, as the server does): a full garbage
collection of the ~700k objects of torch, transformers and jax would otherwise stall a step for
~0.3 s now and then. `--profile` prints the top functions of a cProfile of the overlapped run at the largest batch.
`--stub-device` measures the host work alone: the runner's programs run once per shape and
are then skipped (each call returns that shape's first result), so a step is the scheduler,
input layout, sampling columns, `update` and output processing, with no dispatch and no device
beside the host thread on the two cores (on this machine the device's threads share the
host's cores and caches; an accelerator's do not). It prints the median host ms per step of
the serial loop; with `--phases`, also the per-step host budget: the median us of each engine
phase over the run's steps (most of them steady decoding; each phase wrapped with
`perf_counter`, which adds ~1 us a call).
This is the CPU proxy for the GPU issue (on an H200, a 5.9 ms device step ran at ~15 ms per
step end to end, serial).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from step_fixtures import decode_step_inputs

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

PROMPT_LEN = 32


def make_tiny_checkpoint(path: Path, vocab: int = 512) -> Path:
    """A 2-layer random Llama saved by transformers, with the default model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxllm.default_model import default_model_path
    from jaxllm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    load_tokenizer(default_model_path()).save(path)
    return path


def runner_only_ms(engine: LLMEngine, batch: int, ctx: int, iters: int) -> float:
    bucket = engine.buckets.pick(batch, batch, -(-ctx // engine.page_size))
    inputs = decode_step_inputs(batch, ctx, engine.page_size, bucket)
    tensors = engine.tensors.dummy(bucket.num_seqs)
    runner = engine.runner
    for _ in range(3):
        runner.fetch(runner.execute(inputs, tensors)[0])
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        runner.fetch(runner.execute(inputs, tensors)[0])
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def end_to_end(engine: LLMEngine, batch: int, output_len: int, overlap: bool,
               output_kind: RequestOutputKind,
               profile: cProfile.Profile | None = None) -> tuple[float, float]:
    """(decode tok/s in the all-decoding steady state, median host ms per step)."""

    engine.config = dataclasses.replace(engine.config, overlap_scheduling=overlap)
    rng = np.random.default_rng(batch)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            output_kind=output_kind)
    for i in range(batch):
        engine.add_request(rng.integers(3, 500, PROMPT_LEN).tolist(), params, f"r{i}")
    steady_tokens, steady_time, host = 0, 0.0, []
    if profile:
        profile.enable()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        stats = engine.get_stats()
        decoding = stats.num_running == batch and stats.num_waiting == 0
        if decoding and stats.last_step_tokens == batch:
            steady_tokens += batch
            steady_time += dt
            host.append(stats.host_time_s)
    if profile:
        profile.disable()
    engine.step()  # a look-ahead step may still be in flight
    return steady_tokens / steady_time, 1e3 * statistics.median(host)


def stub_device(engine: LLMEngine) -> None:
    """Make the engine's runner return each shape's first forward and sample result again
    instead of running (host work alone). Fetched tokens cycle through ids that decode to
    plain text (what a real model mostly emits), so streamed rows detokenize as they would."""
    runner = engine.runner
    forward, sample, fetch = runner.forward, runner.sample, runner.fetch
    forwards, samples, results = {}, {}, {}
    decode = engine.tokenizer.decode
    # (U+FFFD: a lone byte of a multi-byte character; random ones never complete, and the
    # detokenizer would hold them back and re-decode, which real text does not make it do)
    text_ids = np.array([i for i in range(engine.tokenizer.vocab_size)
                         if (t := decode([i])).isprintable() and t.strip()
                         and "\ufffd" not in t], np.int32)
    steps = iter(range(1 << 62))

    def stub_forward(inputs, prev_tokens=None):
        key = inputs.shape_key
        if key not in forwards:
            forwards[key] = forward(inputs, prev_tokens)
        return forwards[key]

    def stub_sample(logits, tensors):
        key = logits.shape[0]
        if key not in samples:
            samples[key] = sample(logits, tensors)
        return samples[key]

    def stub_fetch(sampled):
        key = sampled.next_input_ids.shape, sampled.output.token_ids.shape
        if key not in results:
            results[key] = fetch(sampled)
        result = results[key]
        shift = next(steps)
        ids = text_ids[(np.arange(result.token_ids.size) + shift) % text_ids.size]
        return dataclasses.replace(result, token_ids=ids.reshape(result.token_ids.shape))

    runner.forward, runner.sample, runner.fetch = stub_forward, stub_sample, stub_fetch


PHASES = (("schedule", "scheduler", "schedule"), ("layout", None, "step_layout"),
          ("sampling tensors", "tensors", "build"), ("update", "scheduler", "update"),
          ("  of which page registration", "scheduler.cache", "register_computed_rows"),
          ("output processing", "outputs", "process"), ("collecting outputs", "outputs", "collect"))


def time_phases(engine: LLMEngine) -> dict[str, list[float]]:
    """Wrap each engine phase of `PHASES` with a timer; returns the lists it appends to."""
    times: dict[str, list[float]] = {}
    for label, owner, name in PHASES:
        obj = engine
        for part in owner.split(".") if owner else ():
            obj = getattr(obj, part)
        times[label] = spent = []

        def timed(*args, _call=getattr(obj, name), _spent=spent, **kwargs):
            start = time.perf_counter()
            out = _call(*args, **kwargs)
            _spent.append(time.perf_counter() - start)
            return out

        setattr(obj, name, timed)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--output-kind", default="delta",
                    choices=[k.name.lower() for k in RequestOutputKind],
                    help="what each output carries (see above)")
    ap.add_argument("--stub-device", action="store_true",
                    help="host work alone: the runner's programs are not run (see above)")
    ap.add_argument("--phases", action="store_true",
                    help="with --stub-device: the host budget per engine phase (see above)")
    args = ap.parse_args()
    if args.phases and not args.stub_device:
        ap.error("--phases needs --stub-device")
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_checkpoint(Path(d))
        engine = LLMEngine(EngineConfig(model=str(path), max_num_seqs=max(batches),
                                        max_num_batched_tokens=max(512, max(batches)),
                                        max_model_len=max(256, PROMPT_LEN + args.output_len)))
    gc.collect()
    gc.freeze()  # as the server does (ServerConfig.freeze_gc): no 0.3 s full collections
    print(f"jax {jax.__version__} on {jax.default_backend()}; tiny Llama (2 layers, hidden 64)")
    kind = RequestOutputKind[args.output_kind.upper()]
    if args.stub_device:
        stub_device(engine)
        times = time_phases(engine) if args.phases else {}
        budgets = {}
        print("| batch | host ms/step, device stubbed (serial loop) |\n|---|---|")
        for b in batches:
            end_to_end(engine, b, args.output_len, overlap=False, output_kind=kind)  # warm
            for spent in times.values():
                spent.clear()
            _, host = end_to_end(engine, b, args.output_len, overlap=False, output_kind=kind)
            budgets[b] = {k: 1e6 * statistics.median(v) for k, v in times.items() if v}
            print(f"| {b} | {host:.2f} |")
        if times:
            print("\n| phase (median us per step) | " + " | ".join(f"batch {b}" for b in batches)
                  + " |\n|---|" + "---|" * len(batches))
            for label, _, _ in PHASES:
                print(f"| {label} | " + " | ".join(f"{budgets[b].get(label, 0):.0f}"
                                                   for b in batches) + " |")
        return
    print("| batch | runner-only ms/step | runner-only tok/s | serial tok/s (frac) | "
          "overlapped tok/s (frac) | host ms/step serial | overlapped |")
    print("|---|---|---|---|---|---|---|")
    prof = cProfile.Profile() if args.profile else None
    for b in batches:
        ms = runner_only_ms(engine, b, PROMPT_LEN + args.output_len // 2, args.iters)
        dev = b / (ms / 1e3)
        serial, host_s = end_to_end(engine, b, args.output_len, overlap=False, output_kind=kind)
        over, host_o = end_to_end(engine, b, args.output_len, overlap=True, output_kind=kind,
                                  profile=prof if b == max(batches) else None)
        print(f"| {b} | {ms:.2f} | {dev:.0f} | {serial:.0f} ({serial / dev:.2f}) | "
              f"{over:.0f} ({over / dev:.2f}) | {host_s:.2f} | {host_o:.2f} |")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
