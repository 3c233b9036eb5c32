"""Constrained requests through the engine on a random model over the real vocabulary.

Random logits make the grammar the only reason an output is well-formed, so every finished,
unstopped output must satisfy its spec. One mixed workload (greedy and seeded sampling, n > 1,
logprobs, a stop string, an abort mid-flight, unconstrained neighbours) runs serially and
overlapped, with and without a page budget small enough to preempt; both loops must agree
token for token and leave no pages behind.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured.spec import StructuredOutputsParams as Spec
from tests.structured.cases import REGEXES, SCHEMAS, satisfies

SMALL = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=8)
# Bounded specs only (a random model would extend an unbounded number forever). \d is
# spelled [0-9]: llguidance's \d takes every Unicode digit of its (newer) Unicode tables, which
# a random model does emit (U+1CCF0, Unicode 16) and Python's re (Unicode 14) does not match.
SPECS = ([Spec(json=SCHEMAS[i]) for i in (0, 3, 6, 9, 12, 13, 19, 20)]
         + [Spec(regex=REGEXES[i].replace(r"\d", "[0-9]")) for i in (0, 2, 4, 6)]
         + [Spec(choice=["left", "right", "up"]),
            Spec(grammar='root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "nil"')])
GRAMMAR_AS_REGEX = r"\((?:[a-c]|nil)(?:,(?:[a-c]|nil))*\)"


def _workload(seed: int) -> tuple[dict[int, list], dict[int, str]]:
    rng = np.random.default_rng(seed)
    arrivals: dict[int, list] = {}
    for k, spec in enumerate(SPECS):
        ids = rng.integers(3, 49152, size=int(rng.integers(4, 24))).tolist()
        kind = k % 4
        params = dict(max_tokens=100, structured_outputs=spec)
        if kind == 0:
            params.update(temperature=0.0, logprobs=2)
        elif kind == 1:
            params.update(temperature=1.0, seed=seed + k)
        elif kind == 2:
            params.update(temperature=0.8, top_p=0.9, seed=seed + k, n=2)
        else:
            params.update(temperature=1.0, seed=seed + k, logprobs=0)
        arrivals.setdefault(k // 3, []).append((f"r{k}", ids, SamplingParams(**params)))
    ids = rng.integers(3, 49152, size=9).tolist()
    arrivals[1].append(("plain", ids, SamplingParams(temperature=0.0, max_tokens=20,
                                                     ignore_eos=True)))
    arrivals[2].append(("stop", ids, SamplingParams(temperature=0.0, max_tokens=60,
                                                    stop=['"'], guided_json=SCHEMAS[0])))
    arrivals[0].append(("ab", ids, SamplingParams(temperature=1.0, seed=seed, max_tokens=60,
                                                  guided_json=SCHEMAS[18])))
    return arrivals, {4: "ab"}


def _drive(engine: LLMEngine, arrivals: dict[int, list], aborts: dict[int, str],
           overlap: bool) -> dict:
    engine.config = dataclasses.replace(engine.config, overlap_scheduling=overlap)
    engine.reset_prefix_cache()
    arrivals = {k: list(v) for k, v in arrivals.items()}
    done, aborted = {}, set()
    for step in range(3000):
        for rid, ids, params in arrivals.pop(step, []):
            engine.add_request(ids, params, rid)
        if step in aborts:
            done[aborts[step]] = engine.abort_request(aborts[step], return_output=True)
            aborted.add(aborts[step])
        if not arrivals and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            assert out.request_id not in aborted, f"output for {out.request_id} after abort"
            done[out.request_id] = out
        engine.scheduler.check_invariants()
    else:
        raise AssertionError("engine did not drain")
    engine.step()
    assert not engine.scheduler.requests and engine.scheduler.allocator.num_used_pages == 0
    assert engine.runner.recompiles == 0
    return done


def _check_valid(done: dict, where: str) -> None:
    params = {rid: p for step in _workload(0)[0].values() for rid, _, p in step}
    for k, spec in enumerate(SPECS):
        for c in done[f"r{k}"].outputs:
            assert c.finish_reason == "stop", f"{where} r{k} {spec.kind}: {c.text!r}"
            assert satisfies(spec, c.text, GRAMMAR_AS_REGEX), f"{where} r{k} {spec.cache_key}: {c.text!r}"
            if params[f"r{k}"].logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)
            if params[f"r{k}"].temperature == 0.0:  # greedy over the grammar's tokens only
                _check_masked_logprobs(c, f"{where} r{k}")
    stopped = done["stop"].outputs[0]
    assert stopped.finish_reason == "stop" and '"' not in stopped.text
    assert stopped.text == "{", f"{where} {stopped.text!r}"  # '{"' is forced, the stop cuts it
    assert done["ab"].outputs[0].finish_reason == "abort"


def _check_masked_logprobs(c, where: str) -> None:
    """A greedy grammar row (no other constraint) takes the argmax of the grammar-masked
    logits: rank 1 of the masked distribution, whose reported mass is at most 1 (raw logprobs
    of a random model would almost never rank the grammar's pick first)."""
    for token, position in zip(c.token_ids, c.logprobs, strict=True):
        assert position[token].rank == 1, f"{where}: {position}"
        mass = sum(np.exp(lp.logprob) for lp in position.values())
        assert mass <= 1 + 1e-4, f"{where}: {position}"


@pytest.fixture(scope="module")
def engine(tiny_full_vocab_dir):
    """One engine for the file (warm-up dominates): a page budget small enough to preempt."""
    return LLMEngine(EngineConfig(model=str(tiny_full_vocab_dir), num_pages=17, **SMALL))


class _SamplerLog:
    """What each sampled token's sampler saw, per (sequence id, output index): its step and
    PRNG key, its allowed-token mask, and its logits row (a digest for bitwise equality and
    a fixed sample of entries for closeness). The two loops run differently shaped steps, and
    XLA's results for a row can differ in the last bits between shapes (1e-7 here): a seeded
    draw whose inverse-CDF point sits that close to a boundary takes a neighbour, with the
    same key and the same distribution to 1e-6. This log tells such a flip from a bug."""

    def __init__(self, engine: LLMEngine, vocab: int) -> None:
        self.runs: list[dict] = []
        self._probe = np.random.default_rng(0).choice(vocab, 1024, replace=False)
        self._pending: list[tuple] = []
        build, sample = engine.tensors.build, engine.runner.sample

        def logged_build(sched, params, keys, rows):
            tensors = build(sched, params, keys, rows)
            self._pending = [(s.request.request_id, s.output_index, i, int(tensors.step[i]),
                              tuple(np.asarray(tensors.key_data[i]).tolist()))
                             for i, s in enumerate(sched.seqs) if s.samples]
            return tensors

        def logged_sample(logits, tensors):
            host, allowed = np.asarray(logits), np.asarray(tensors.allowed_mask)
            for seq_id, index, row, step, key in self._pending:
                self.runs[-1][(seq_id, index)] = (step, key, allowed[row].tobytes(),
                                                  host[row].tobytes(), host[row, self._probe])
            self._pending = []
            return sample(logits, tensors)

        engine.tensors.build, engine.runner.sample = logged_build, logged_sample

    def start(self) -> None:
        self.runs.append({})

    def check_agree(self, seq_id: str, a: list[int], b: list[int], where: str) -> None:
        """Tokens equal wherever both samplers saw bitwise-equal inputs; the first difference
        only where the logits differ by rounding; the same step, key and mask throughout."""
        first, second = self.runs
        for i, (ta, tb) in enumerate(zip(a, b, strict=False)):
            sa, sb = first.get((seq_id, i)), second.get((seq_id, i))
            assert sa is not None and sb is not None, f"{where} {seq_id}[{i}]: not logged"
            assert sa[:3] == sb[:3], f"{where} {seq_id}[{i}]: step, key or mask differ"
            np.testing.assert_allclose(sa[4], sb[4], atol=1e-4, err_msg=f"{where} {seq_id}[{i}]")
            if ta != tb:
                assert sa[3] != sb[3], f"{where} {seq_id}[{i}]: same inputs, another token"
                return  # a rounding flip: the two continuations are different samples now
        assert len(a) == len(b), f"{where} {seq_id}: {len(a)} vs {len(b)} tokens"


def test_constrained_workload_is_valid_and_overlap_equals_serial(engine):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    arrivals, aborts = _workload(seed)
    log = _SamplerLog(engine, engine.model_config.vocab_size)
    log.start()
    serial = _drive(engine, arrivals, aborts, overlap=False)
    preempted = engine.scheduler.num_preemptions
    log.start()
    overlapped = _drive(engine, arrivals, aborts, overlap=True)
    where = f"seed={seed}"
    _check_valid(serial, where)
    _check_valid(overlapped, where)
    params = {rid: p for step in arrivals.values() for rid, _, p in step}
    for rid, a in serial.items():
        if rid == "ab":
            continue
        for i, (ca, cb) in enumerate(zip(a.outputs, overlapped[rid].outputs, strict=True)):
            if params[rid].temperature == 0.0:
                assert (ca.token_ids, ca.text, ca.finish_reason) == \
                    (cb.token_ids, cb.text, cb.finish_reason), f"{where} {rid}"
            else:
                seq_id = rid if len(a.outputs) == 1 else f"{rid}#{i}"
                log.check_agree(seq_id, ca.token_ids, cb.token_ids, where)
    assert engine.scheduler.num_preemptions > preempted > 0, where


def test_bad_spec_is_rejected_before_queueing(engine):
    for bad in (Spec(regex="(ab"), Spec(json={"type": "integer", "minimum": "x"}),
                Spec(grammar="root ::= undefined_rule")):
        with pytest.raises(ValueError, match="invalid structured output"):
            engine.add_request([5, 6, 7], SamplingParams(structured_outputs=bad, n=2), "bad")
        assert not engine.has_unfinished_requests() and not engine.scheduler.requests
    engine.add_request([5, 6, 7], SamplingParams(guided_choice=["a b", "c"], max_tokens=8), "ok")
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[0].outputs[0].text in ("a b", "c") and outs[0].outputs[0].finish_reason == "stop"
    assert engine.grammars.stats.misses >= 1


def test_choice_logprobs_are_over_the_tokens_the_grammar_allows(engine):
    """The first step of guided_choice=["yes", "no"] with logprobs=20: the finite top entries
    are exactly the grammar's allowed tokens (all of them when at most 20), with the masked
    distribution's values: raw logprobs (from prompt_logprobs of prompt + [token])
    renormalised over those tokens."""
    from jaxllm.token_masks import all_allowed, unpack_allowed_host

    seed = int(np.random.SeedSequence().entropy % 2**31)
    where = f"seed={seed}"
    prompt = np.random.default_rng(seed).integers(3, 49152, 7).tolist()
    spec = Spec(choice=["yes", "no"])
    vocab = engine.grammars.vocab_size
    words = all_allowed(1, vocab)
    engine.grammars.fill_bitmasks(engine.grammars.matchers(spec, 1), [0], words)
    allowed = np.flatnonzero(unpack_allowed_host(words[0], vocab)).tolist()
    assert 2 <= len(allowed) <= 20, allowed
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, logprobs=20,
                                              structured_outputs=spec), "c")
    for t in allowed:
        engine.add_request(prompt + [t], SamplingParams(temperature=0.0, max_tokens=1,
                                                        prompt_logprobs=0), f"p{t}")
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step()})
    assert engine.runner.recompiles == 0
    out = done["c"].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop", where
    first = out.logprobs[0]
    finite = {t: lp.logprob for t, lp in first.items() if np.isfinite(lp.logprob)}
    assert sorted(finite) == allowed, where
    assert all(lp.logprob == -np.inf for t, lp in first.items() if t not in finite), where
    raw = np.array([done[f"p{t}"].prompt_logprobs[len(prompt)][t].logprob for t in allowed])
    expected = raw - np.log(np.sum(np.exp(raw - raw.max()))) - raw.max()
    np.testing.assert_allclose([finite[t] for t in allowed], expected, atol=5e-3, err_msg=where)
    assert abs(np.exp(list(finite.values())).sum() - 1) < 1e-4, where
    assert first[out.token_ids[0]].rank == 1, where
