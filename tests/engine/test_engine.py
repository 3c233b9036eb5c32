"""The engine end to end on a tiny random model: equal to the plain decode, no leaks, no recompiles."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.conversions import load_checkpoint
from jaxllm.engine import LLMEngine
from jaxllm.llm import LLM
from jaxllm.models import build_model
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from tests.oracles.plain_decode import forward_logits, plain_generate

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=8)


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def _prompts(seed: int, lengths, vocab: int = 512) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir):
    cfg, params = load_checkpoint(tiny_model_dir, dtype="float32")
    return build_model(cfg, params, "float32")


def _assert_no_leaks(engine: LLMEngine) -> None:
    engine.scheduler.check_invariants()
    assert not engine.scheduler.requests
    assert engine.scheduler.allocator.num_used_pages == 0


@pytest.mark.parametrize("variant", [
    dict(),
    dict(prefill_chunk_size=8),
    dict(enable_prefix_caching=False),
    dict(num_pages=12),  # forces preemption: 11 usable pages of 8 tokens for 6 requests
])
def test_greedy_equals_plain_decode(tiny_model_dir, plain_model, variant):
    seed = _fresh_seed()
    prompts = _prompts(seed, [5, 17, 1, 30, 9, 23])
    prompts.append(prompts[1][:12] + [7, 8])  # shares a prefix with prompt 1
    expected = plain_generate(plain_model, prompts, max_new_tokens=12)
    llm = LLM(str(tiny_model_dir), **{**SMALL, **variant})
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected, f"seed={seed} variant={variant}"
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    _assert_no_leaks(llm.engine)
    assert llm.engine.runner.recompiles == 0
    if "num_pages" in variant:
        assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("impl", ["cpu_native", "cpu", "reference"])
def test_bfloat16_kv_cache_equals_plain_decode_with_rounded_kv(tiny_model_dir, plain_model, impl):
    """kv_cache_dtype="bfloat16" under a float32 model: the cache holds K/V rounded to
    bfloat16, so the engine equals the plain decode that rounds K/V the same way (and the
    rounding is real: the plain logits move)."""
    from jaxllm.kernels.native_build import native_attention_available

    if impl == "cpu_native" and not native_attention_available():
        pytest.skip("native attention unavailable")
    seed = _fresh_seed()
    prompts = _prompts(seed, [5, 17, 1, 30, 9])
    expected = plain_generate(plain_model, prompts, max_new_tokens=10, kv_dtype="bfloat16")
    llm = LLM(str(tiny_model_dir), kv_cache_dtype="bfloat16", attention_impl=impl,
              **{**SMALL, "prefill_chunk_size": 8})
    assert all(c.dtype == jax.numpy.bfloat16 for c in llm.engine.runner.kv_caches)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected, f"seed={seed} impl={impl}"
    _assert_no_leaks(llm.engine)
    assert llm.engine.runner.recompiles == 0
    exact, rounded = (forward_logits(plain_model, prompts[3:4], kv)[0] for kv in (None, "bfloat16"))
    assert 0 < np.abs(exact - rounded).max() < 0.05 * np.abs(exact).max(), f"seed={seed}"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), **SMALL))


def _run(engine: LLMEngine, ids: list[str]) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return {i: done[i] for i in ids if i in done}


def test_seeded_sampling_independent_of_batch(engine):
    seed = _fresh_seed()
    prompt = _prompts(seed, [11])[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=10, ignore_eos=True)
    engine.add_request(prompt, params, "alone")
    alone = _run(engine, ["alone"])["alone"].outputs[0].token_ids
    others = _prompts(seed + 1, [3, 25, 8])
    for i, p in enumerate(others):
        engine.add_request(p, SamplingParams(temperature=0.8, max_tokens=14,
                                                          ignore_eos=True), f"other{i}")
    engine.add_request(prompt, params, "crowd")
    crowd = _run(engine, ["crowd"])["crowd"].outputs[0].token_ids
    assert alone == crowd, f"seed={seed}"
    _assert_no_leaks(engine)


def test_abort_in_every_state_frees_pages(engine):
    seed = _fresh_seed()
    prompts = _prompts(seed, [40, 3, 60, 12, 7])
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True), f"r{i}")
    engine.abort_request("r4")  # waiting
    engine.step()
    engine.step()
    engine.abort_request("r0")  # running / mid-prefill
    for _ in range(3):
        engine.step()
    engine.abort_request("r1")  # decoding
    engine.scheduler.check_invariants()
    _run(engine, [])
    _assert_no_leaks(engine)
    assert engine.runner.recompiles == 0


def test_logprobs_match_log_softmax(engine, plain_model):
    seed = _fresh_seed()
    prompt = _prompts(seed, [9])[0]
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                                    prompt_logprobs=2, ignore_eos=True), "lp")
    out = _run(engine, ["lp"])["lp"]
    seq = prompt + out.outputs[0].token_ids
    logits = forward_logits(plain_model, [seq])[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for j, entry in enumerate(out.outputs[0].logprobs):
        pos = len(prompt) - 1 + j
        tok = out.outputs[0].token_ids[j]
        assert abs(entry[tok].logprob - logp[pos, tok]) < 1e-4
        assert entry[tok].rank == 1  # greedy
        top = sorted(((lp.rank, t) for t, lp in entry.items() if lp.rank <= 3))
        assert [t for _, t in top][:3] == list(np.argsort(-logp[pos])[:3])
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        tok = prompt[pos]
        assert abs(out.prompt_logprobs[pos][tok].logprob - logp[pos - 1, tok]) < 1e-4


def test_n_samples_and_stop_strings(engine):
    seed = _fresh_seed()
    prompt = _prompts(seed, [21])[0]
    engine.add_request(prompt, SamplingParams(n=3, temperature=1.0, seed=seed,
                                                    max_tokens=8, ignore_eos=True), "n3")
    out = _run(engine, ["n3"])["n3"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    _assert_no_leaks(engine)
    # A stop string taken from a greedy run's text ends the request right before it. Several
    # prompts: with this vocabulary some outputs are lone bytes held back until the finish,
    # where the stop string is found only when the held text is flushed.
    prompts = _prompts(seed + 1, [21] * 6)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, greedy, f"g{i}")
    texts = {k: o.outputs[0].text for k, o in _run(engine, [f"g{i}" for i in range(6)]).items()}
    stops = {}
    for i, p in enumerate(prompts):
        text = texts[f"g{i}"]
        stop = text[len(text) // 2:len(text) // 2 + 2]
        if stop.strip():
            stops[f"s{i}"] = (stop, text)
            engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=12,
                                                          ignore_eos=True, stop=[stop]), f"s{i}")
    for key, res in _run(engine, list(stops)).items():
        stop, text = stops[key]
        out = res.outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop, f"seed={seed} {text!r}"
        assert out.text == text[:text.index(stop)]
    _assert_no_leaks(engine)


def test_bad_input_rejected_without_side_effects(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams(), "e")
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(3, 300)), SamplingParams(max_tokens=4), "long")
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([10**6], SamplingParams(), "v")
    engine.add_request([5, 6], SamplingParams(max_tokens=2), "dup")
    with pytest.raises(ValueError, match="in use"):
        engine.add_request([5, 6], SamplingParams(max_tokens=2), "dup")
    _run(engine, ["dup"])
    _assert_no_leaks(engine)


def test_penalties_and_logprob_mixes_do_not_recompile(engine):
    seed = _fresh_seed()
    prompts = _prompts(seed, [6, 13, 4])
    mixes = [SamplingParams(max_tokens=5, ignore_eos=True, repetition_penalty=1.3),
             SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.7, top_k=5,
                            frequency_penalty=0.5, presence_penalty=0.2, logprobs=2),
             SamplingParams(max_tokens=5, ignore_eos=True, min_p=0.1, top_p=0.8, seed=seed)]
    # Count XLA's own compile events too: warm-up compiles ahead of time, so a warmed shape's
    # first call must reuse that executable, not merely be excused by the runner's counter.
    compiled = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        for i, (p, sp) in enumerate(zip(prompts, mixes, strict=True)):
            engine.add_request(p, sp, f"mix{i}")
        done = _run(engine, [f"mix{i}" for i in range(3)])
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert all(len(o.outputs[0].token_ids) == 5 for o in done.values())
    assert engine.runner.recompiles == 0
    assert not {"_step", "sample", "_prompt_logprobs"} & set(compiled), compiled
    _assert_no_leaks(engine)


def test_stop_string_completed_by_the_last_allowed_token_reports_stop(engine):
    seed = _fresh_seed()
    tok = engine.tokenizer
    for attempt in range(20):
        prompt = _prompts(seed + attempt, [17])[0]
        rid = f"full{attempt}"
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=10,
                                                       ignore_eos=True), rid)
        ids = _run(engine, [rid])[rid].outputs[0].token_ids
        # find k and a stop string that first appears in the text of exactly k tokens
        for k in range(1, 11):
            before = tok.decode(ids[:k - 1], skip_special_tokens=True)
            text = tok.decode(ids[:k], skip_special_tokens=True)
            stop = text[len(before):][-2:]
            if stop.strip() and text.endswith(stop) and stop not in before and \
                    stop not in text[:-len(stop)] and "\ufffd" not in text:
                break
        else:
            continue
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=k,
                                                        ignore_eos=True, stop=[stop]), "sk")
        res = _run(engine, ["sk"])["sk"].outputs[0]
        assert (res.finish_reason, res.stop_reason) == ("stop", stop), f"seed={seed}"
        assert res.text == text[:-len(stop)]
        _assert_no_leaks(engine)
        return
    raise AssertionError(f"seed={seed}: no greedy text gave a usable stop string")


def test_sleep_refuses_requests_until_wake_up(engine):
    engine.sleep(1)
    with pytest.raises(ValueError, match="asleep"):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), "zz")
    engine.wake_up()
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True), "zz")
    assert len(_run(engine, ["zz"])["zz"].outputs[0].token_ids) == 2
    _assert_no_leaks(engine)


def test_bad_words_are_resolved_for_offline_requests(engine):
    """bad_words given to the engine directly (no server to tokenize them) are banned."""
    seed = _fresh_seed()
    greedy = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    tok = engine.tokenizer
    for i, prompt in enumerate(_prompts(seed, [7, 9, 5, 11, 8, 6])):
        engine.add_request(prompt, SamplingParams(**greedy), f"free{i}")
        free = _run(engine, [f"free{i}"])[f"free{i}"].outputs[0].token_ids
        word = next((t for t in free  # (a bad word is not blank: "\x1e" counts as white space)
                     if tok.decode([t]).strip()
                     and tok.encode(tok.decode([t]), add_special_tokens=False) == [t]), None)
        if word is not None:
            break
    else:
        pytest.skip(f"seed={seed}: no generated token round-trips through its text")
    engine.add_request(prompt, SamplingParams(**greedy, bad_words=[tok.decode([word])]), "ban")
    banned = _run(engine, ["ban"])["ban"].outputs[0].token_ids
    assert word not in banned and banned[:free.index(word)] == free[:free.index(word)], seed
    _assert_no_leaks(engine)


def test_unstreamed_text_is_decoded_at_the_finish(engine):
    """FINAL_ONLY without stop strings decodes once at the finish (or the abort): the same
    text as a streamed request with the same seed, and as decoding its token ids."""
    seed = _fresh_seed()
    prompts = _prompts(seed, [6, 13, 9])
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True)
    final_only = params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, f"streamed{i}")
        engine.add_request(p, final_only, f"final{i}")
    engine.add_request(prompts[0], final_only, "aborted")
    for _ in range(4):
        engine.step()
    aborted = engine.abort_request("aborted", return_output=True)
    done = _run(engine, [f"{kind}{i}" for kind in ("streamed", "final") for i in range(3)])
    tok = engine.tokenizer
    for i in range(3):
        final, streamed = done[f"final{i}"].outputs[0], done[f"streamed{i}"].outputs[0]
        assert final.token_ids == streamed.token_ids, f"seed={seed}"
        assert final.text == streamed.text == tok.decode(final.token_ids, skip_special_tokens=True)
    out = aborted.outputs[0]
    assert out.finish_reason == "abort" and out.token_ids
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    _assert_no_leaks(engine)


def test_delta_outputs_concatenate_to_the_cumulative_ones(engine):
    """The same seeded workload twice, CUMULATIVE then DELTA (n > 1, logprobs, prompt logprobs
    over a chunked prefill, a stop string, an abort mid-flight; prompt logprobs keep every
    request out of the prefix cache, so both passes run the same steps): the DELTA outputs
    come in the same steps, only the last is finished, and concatenated they are the
    cumulative ones, logprob values included."""
    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    prompts = _prompts(seed, [90, 7, 12])  # 90 > max_num_batched_tokens: a chunked prefill
    base = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=int(rng.integers(5, 20)),
                           logprobs=int(rng.integers(0, 3)), prompt_logprobs=i % 2,
                           n=1 + i % 2, stop=[engine.tokenizer.decode([int(rng.integers(3, 500))])]
                           if i == 2 else None, ignore_eos=True)
            for i in range(len(prompts))]
    abort_at = int(rng.integers(1, 8))

    def run(kind: RequestOutputKind) -> list[list]:
        """Each step's outputs (the abort's first, at step `abort_at`)."""
        for i, (p, params) in enumerate(zip(prompts, base, strict=True)):
            engine.add_request(p, params.clone(output_kind=kind), f"{kind.name}{i}")
        steps = []
        while engine.has_unfinished_requests():
            outs = []
            if len(steps) == abort_at:
                outs.append(engine.abort_request(f"{kind.name}1", return_output=True))
            steps.append(outs + engine.step())
        _assert_no_leaks(engine)
        return steps

    cumulative, delta = run(RequestOutputKind.CUMULATIVE), run(RequestOutputKind.DELTA)
    assert len(cumulative) == len(delta), seed
    joined: dict[str, RequestOutput] = {}
    for step, (c_outs, d_outs) in enumerate(zip(cumulative, delta, strict=True)):
        assert [o.request_id[len("CUMULATIVE"):] for o in c_outs if o is not None] == [
            o.request_id[len("DELTA"):] for o in d_outs if o is not None], (seed, step)
        for c, d in zip(filter(None, c_outs), filter(None, d_outs), strict=True):
            acc = joined.get(d.request_id)
            if acc is None:
                acc = joined[d.request_id] = copy.deepcopy(d)
            else:
                acc.finished, acc.metrics = d.finished, d.metrics
                if d.prompt_logprobs is not None:
                    acc.prompt_logprobs += d.prompt_logprobs
                for a, new in zip(acc.outputs, d.outputs, strict=True):
                    a.text += new.text
                    a.token_ids += new.token_ids
                    if new.logprobs is not None:
                        a.logprobs += new.logprobs
                    a.cumulative_logprob = new.cumulative_logprob
                    a.finish_reason, a.stop_reason = new.finish_reason, new.stop_reason
            want = copy.copy(c)  # (timestamps differ between the passes)
            want.request_id, want.metrics = d.request_id, acc.metrics
            assert c.metrics.num_cached_tokens == d.metrics.num_cached_tokens
            assert acc == want, (seed, step)
    assert {o.finished for s in delta for o in s if o is not None} == {False, True}
    finals = [o for s in delta for o in s if o is not None and o.finished]
    assert len(finals) == len(prompts), seed
    assert joined["DELTA1"].outputs[0].finish_reason == "abort"
