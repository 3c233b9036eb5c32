"""EAGLE speculation (`speculative_mode="eagle"`) in the engine.

- A reference twin: a dense float64 numpy EAGLE-1 head (no paging, no buckets) fed the
  target's final hidden states from transformers, run over each request's whole history; the
  engine's head outputs (catch-up and self-fed positions) and its drafts must match it, with
  ragged prompts, several rounds, prefix-cache hits shared by running requests and
  preemption. Breaking the catch-up on purpose must be caught.
- Greedy with a random head equals greedy without speculation token for token (mixed
  lengths, n > 1, prefix reuse, chunked prefill, an abort, preemption); no page leaks and
  nothing recompiles after warm-up. A head built to agree with a bigram target has every
  draft accepted.
- Bad heads are ValueErrors before the target's cache exists; sleep / wake, the KV budget
  and the compile counts include the head's cache, feature store and programs.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams
from jaxllm.spec.eagle import EagleProposer
from tests.spec.conftest import ENGINE, VOCAB, _save

HIDDEN = 64  # the tiny target's (tests/models/hf_tiny.py)
PROMPT_LENGTHS = (3, 9, 20, 40)  # as test_draft_model.py: chunks, catch-up splits, preemption


# -- checkpoints -----------------------------------------------------------------------------
def make_eagle_head(path: Path, seed: int, *, layers: int = 1, own_embedding: bool = False,
                    fc_bias: bool = True, hidden: int = HIDDEN, vocab: int = VOCAB,
                    agree: bool = False, drop: tuple[str, ...] = ()) -> Path:
    """A random EAGLE-1 head in HF format (config.json + model.safetensors). `agree`: fc keeps
    the embedding only and the layers add nothing, so g_p = embed(x_{p+1})."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    heads, kv_heads, head_dim, inter = 4, 2, 16, 96

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    t = {"fc.weight": w(hidden, 2 * hidden)}
    if agree:
        t["fc.weight"] = np.concatenate([np.eye(hidden), np.zeros((hidden, hidden))],
                                        axis=1).astype(np.float32)
    if fc_bias:
        t["fc.bias"] = w(hidden, scale=0.1)
    if own_embedding:
        t["embed_tokens.weight"] = w(vocab, hidden, scale=1.0)
    for i in range(layers):
        p = f"layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim) * (0 if agree else 1)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter) * (0 if agree else 1)
        t[p + "post_attention_layernorm.weight"] = 1 + w(hidden, scale=0.1)
        if i > 0:
            t[p + "input_layernorm.weight"] = 1 + w(hidden, scale=0.1)
    for name in drop:
        t.pop(name)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-5, vocab_size=vocab,
        max_position_embeddings=256, rope_theta=10000.0)))
    return path


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle-heads")
    return {"one_layer": make_eagle_head(root / "one", 1),
            "two_layers": make_eagle_head(root / "two", 2, layers=2, own_embedding=True,
                                          fc_bias=False)}


@pytest.fixture(scope="module")
def eagle_engine(draft_dirs, heads):
    return LLMEngine(EngineConfig(model=str(draft_dirs["target"]), speculative_mode="eagle",
                                  speculative_model=str(heads["one_layer"]), **ENGINE))


def _swap_head(engine: LLMEngine, head_dir: Path) -> EagleProposer:
    """Another head loaded for the same engine (its own KV cache and feature store)."""
    from flax import nnx

    runner = engine.runner
    parts = SimpleNamespace(model_config=engine.model_config, page_size=engine.page_size,
                            max_model_len=engine.max_model_len, mesh=None, dtype=engine.dtype,
                            kv_dtype=engine.kv_dtype,
                            model=nnx.merge(runner.graphdef, runner.state))
    config = dataclasses.replace(engine.config, speculative_model=str(head_dir))
    return EagleProposer.load(config, parts, engine.buckets, engine.scheduler.allocator.num_pages,
                              engine.attention)


@pytest.fixture(scope="module")
def proposers(eagle_engine, heads):
    return {"one_layer": eagle_engine.speculation.proposer,
            "two_layers": _swap_head(eagle_engine, heads["two_layers"])}


@contextmanager
def _proposer(engine: LLMEngine, proposer):
    """`proposer` in the engine; the prefix cache is emptied around it (its feature store
    holds nothing for pages cached under another proposer)."""
    own = engine.speculation.proposer
    engine.reset_prefix_cache()
    engine.speculation.proposer = proposer
    try:
        yield engine
    finally:
        engine.speculation.proposer = own
        engine.reset_prefix_cache()


@contextmanager
def _plain(engine: LLMEngine):
    spec = engine.speculation
    config = spec.config
    spec.config = dataclasses.replace(config, mode="disable", model=None)
    try:
        yield
    finally:
        spec.config = config


def _prompts(seed: int) -> list[list[int]]:
    """Two full pages of prompt 2 shared with prompt 3 (prefix cache), and the token after
    them too: the head's KV at a page's last slot depends on the next token, and requests
    sharing a page whose next tokens differ read each other's (see jaxllm.spec.eagle)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]
    prompts[2][:17] = prompts[3][:17]
    return prompts


def _run(engine: LLMEngine, prompts, params, aborts=None, prefix: str = "r") -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(p, params[i] if isinstance(params, list) else params, f"{prefix}{i}")
    done, step = {}, 0
    while engine.has_unfinished_requests():
        if aborts and step in aborts:
            done[aborts[step]] = engine.abort_request(aborts[step], return_output=True)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.scheduler.check_invariants()
        step += 1
    engine.step()  # a step still in flight
    engine.scheduler.check_invariants()
    assert not engine.scheduler.requests and engine.scheduler.allocator.num_used_pages == 0
    assert len(engine.speculation.proposer) == 0, "head state of finished requests kept"
    assert engine.runner.recompiles == 0
    assert engine.speculation.proposer.runner.recompiles == 0
    return done


def _tokens(outs: dict) -> dict:
    return {rid: [c.token_ids for c in o.outputs] for rid, o in outs.items()}


# -- the reference twin ----------------------------------------------------------------------
class DenseEagle:
    """EAGLE-1 over whole sequences in float64 numpy, from the checkpoints' files: target
    features from transformers (final hidden states, after the norm), the head written out
    (layer 0 without input norm, causal attention over all positions, no final norm)."""

    def __init__(self, target_dir: Path, head_dir: Path) -> None:
        import torch
        import transformers
        from safetensors.numpy import load_file

        self.torch = torch
        self.target = transformers.AutoModelForCausalLM.from_pretrained(
            target_dir, dtype=torch.float32).eval()
        self.lm_head = self.target.lm_head.weight.detach().double().numpy()
        self.w = {k: v.astype(np.float64) for k, v in
                  load_file(str(head_dir / "model.safetensors")).items()}
        self.embed = self.w.get("embed_tokens.weight",
                                self.target.model.embed_tokens.weight.detach().double().numpy())
        self.cfg = json.loads((head_dir / "config.json").read_text())
        self._features: dict[tuple, np.ndarray] = {}

    def features(self, tokens: list[int]) -> np.ndarray:
        key = tuple(tokens)
        if key not in self._features:
            with self.torch.no_grad():
                out = self.target.model(input_ids=self.torch.tensor([tokens]))
            self._features[key] = out.last_hidden_state[0].double().numpy()
        return self._features[key]

    def head(self, tokens_in, feats) -> np.ndarray:
        """g [L, E] at positions 0..L-1 fed (tokens_in[p], feats[p])."""
        c, w = self.cfg, self.w
        n_h, n_kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        length = len(tokens_in)
        x = np.concatenate([self.embed[np.asarray(tokens_in)], np.asarray(feats)], -1)
        x = x @ w["fc.weight"].T + w.get("fc.bias", 0.0)
        pos = np.arange(length)[:, None] * c["rope_theta"] ** (-np.arange(0, d, 2) / d)
        cos, sin = np.cos(pos)[:, None], np.sin(pos)[:, None]

        def rope(v):
            a, b = v[..., :d // 2], v[..., d // 2:]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

        def rms(v, scale):
            return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + c["rms_norm_eps"]) * scale

        mask = np.tril(np.ones((length, length), bool))
        for i in range(c["num_hidden_layers"]):
            p = f"layers.{i}."
            h = x if i == 0 else rms(x, w[p + "input_layernorm.weight"])
            q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(length, n_h, d))
            k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(length, n_kv, d))
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(length, n_kv, d)
            k, v = np.repeat(k, n_h // n_kv, 1), np.repeat(v, n_h // n_kv, 1)
            s = np.where(mask, np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d), -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v)
            x = x + a.reshape(length, n_h * d) @ w[p + "self_attn.o_proj.weight"].T
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
        return x

    def logits(self, g: np.ndarray) -> np.ndarray:
        return g @ self.lm_head.T


@contextmanager
def _recording(proposer: EagleProposer):
    """Record every proposal (request, its tokens, the drafts) and every head output the
    engine computed: (proposal index, request, position, output hidden, greedy token)."""
    proposals, outputs = [], []
    fill, run = proposer.fill, proposer._run

    def spy_fill(sched):
        seqs = [s for s in sched.seqs if s.drafts]
        if seqs:
            proposals.append({s.request.request_id: list(s.request.all_token_ids) for s in seqs})
        fill(sched)
        if seqs:
            proposals[-1] = {s.request.request_id: (proposals[-1][s.request.request_id],
                                                     list(s.drafts)) for s in seqs}

    def spy_run(pieces, null_page, prev):
        out = run(pieces, null_page, prev)
        tokens, hidden = jax.device_get(out)
        for r, p in enumerate(pieces):
            outputs.append((len(proposals) - 1, p.request.request_id,
                            p.start_pos + p.num_new_tokens - 1, hidden[r], int(tokens[r])))
        return out

    proposer.fill, proposer._run = spy_fill, spy_run  # (instance attributes shadow the methods)
    try:
        yield proposals, outputs
    finally:
        del proposer.fill, proposer._run


def _compare(ref: DenseEagle, finals: dict, proposals, outputs) -> dict:
    """Check the engine's head outputs and drafts against the reference (ValueError-free
    report: counts of compared values and mismatches)."""
    report = {"catch_up": 0, "self_fed": 0, "drafts": 0, "bad": []}
    catch_up = {}  # request -> g over its whole final history (catch-up positions)
    for rid, tokens in finals.items():
        feats = ref.features(tokens)
        catch_up[rid] = ref.head(tokens[1:], feats[:-1])
    self_fed: dict[tuple[int, str], list[np.ndarray]] = {}
    for i, batch in enumerate(proposals):
        for rid, (tokens, drafts) in batch.items():
            n = len(tokens)
            assert finals[rid][:n] == tokens
            toks_in, feats = list(tokens[1:]), list(ref.features(finals[rid])[:n - 1])
            g = catch_up[rid][n - 2]
            gs = []
            for j, d in enumerate(drafts):
                logits = ref.logits(g)
                report["drafts"] += 1
                if logits[d] < logits.max() - 1e-3 * max(1.0, abs(logits.max())):
                    report["bad"].append(("draft", i, rid, j, d, int(logits.argmax())))
                toks_in.append(d)  # teacher-forced on the engine's draft
                feats.append(g)
                g = ref.head(toks_in, feats)[-1]
                gs.append(g)
            self_fed[(i, rid)] = gs
    for i, rid, pos, hidden, _ in outputs:
        tokens, _drafts = proposals[i][rid]
        n = len(tokens)
        if pos <= n - 2:
            want, kind = catch_up[rid][pos], "catch_up"
        else:
            gs = self_fed[(i, rid)]
            if pos - (n - 1) >= len(gs) - 1:
                continue  # dk's output is not fed further (not computed by the reference)
            want, kind = gs[pos - (n - 1)], "self_fed"
        report[kind] += 1
        if not np.allclose(hidden, want, rtol=1e-3, atol=2e-3):
            report["bad"].append((kind, i, rid, pos, float(np.abs(hidden - want).max())))
    return report


def _reference_run(engine: LLMEngine, proposer, ref: DenseEagle, seed: int):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    prompts = _prompts(seed)
    before = engine.get_stats()
    finals = {}
    with _proposer(engine, proposer), _recording(proposer) as (proposals, outputs):
        for round_ in ("a", "b"):  # round b: prefix hits on round a's pages, shared by r2, r3
            for rid, out in _run(engine, prompts, params, prefix=round_).items():
                finals[rid] = prompts[int(rid[1:])] + list(out.outputs[0].token_ids)
    after = engine.get_stats()
    assert after.num_preemptions > before.num_preemptions, "no preemption: enlarge the prompts"
    assert after.prefix_cache_hits > before.prefix_cache_hits
    assert after.spec_proposed_tokens > before.spec_proposed_tokens
    return _compare(ref, finals, proposals, outputs)


@pytest.mark.parametrize("head", ["one_layer", "two_layers"])
def test_proposals_equal_the_dense_reference(eagle_engine, proposers, heads, draft_dirs, head):
    ref = DenseEagle(draft_dirs["target"], heads[head])
    report = _reference_run(eagle_engine, proposers[head], ref, seed=21)
    assert not report["bad"], report["bad"][:5]
    assert report["catch_up"] > 20 and report["self_fed"] > 20 and report["drafts"] > 40, report


def test_the_reference_catches_a_stale_head_cache(eagle_engine, proposers, heads, draft_dirs,
                                                  monkeypatch):
    """Trusting one position too many (a self-fed position's KV kept) must be caught."""
    proposer = proposers["one_layer"]
    ref = DenseEagle(draft_dirs["target"], heads["one_layer"])
    valid = proposer.valid_length
    monkeypatch.setattr(proposer, "valid_length", lambda req: valid(req) + 1)
    report = _reference_run(eagle_engine, proposer, ref, seed=22)
    assert any(kind == "catch_up" for kind, *_ in report["bad"])


# -- greedy equality -------------------------------------------------------------------------
def test_greedy_with_a_random_eagle_head_equals_greedy(eagle_engine):
    engine = eagle_engine
    prompts = _prompts(seed=11)
    prompts.append(list(prompts[3][:24]))  # a whole-page prefix of a running request
    greedy = dict(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    params = [SamplingParams(**greedy) for _ in prompts]
    params[1] = SamplingParams(**{**greedy, "n": 2})  # samples share the prompt's full page
    aborts = {4: "r2"}
    with _plain(engine):
        want = _run(engine, prompts, params, aborts)
    before = engine.get_stats()
    got = _run(engine, prompts, params, aborts)
    stats = engine.get_stats()
    assert _tokens(got) == _tokens(want)
    for rid, out in got.items():  # the target's logprobs, as without speculation
        for a, b in zip(want[rid].outputs, out.outputs, strict=True):
            for ea, eb in zip(a.logprobs, b.logprobs, strict=True):
                assert ea.keys() == eb.keys()
                assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)
    assert got["r2"].outputs[0].finish_reason == "abort"
    assert stats.spec_proposed_tokens > before.spec_proposed_tokens
    assert stats.num_preemptions > before.num_preemptions
    assert stats.recompile_count == 0


def test_a_head_that_agrees_with_the_target_has_every_draft_accepted(draft_dirs, tmp_path):
    """A bigram target (its layers add nothing, final norm weights 1: the next token is
    argmax lm_head(embed(x)) scaled) and a head whose output is embed(x_{p+1}): every
    greedy draft is the target's next token."""
    import torch

    from jaxllm.default_model import default_model_path

    def bigram(model):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.norm.weight.fill_(1.0)

    target = tmp_path / "bigram"
    _save(target, "llama", 99, default_model_path(), head_scale=20.0, vocab_size=VOCAB,
          tie_word_embeddings=False, num_hidden_layers=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    bigram(model)
    model.save_pretrained(target)
    head = make_eagle_head(tmp_path / "agree", 5, agree=True, fc_bias=False)
    engine = LLMEngine(EngineConfig(model=str(target), speculative_mode="eagle",
                                    speculative_model=str(head), **ENGINE))
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    prompts = _prompts(seed=3)[:3]
    with _plain(engine):
        want = _tokens(_run(engine, prompts, params))
    steps = engine.get_stats().steps_total
    got = _tokens(_run(engine, prompts, params))
    stats = engine.get_stats()
    assert got == want
    assert stats.spec_proposed_tokens > 0
    assert stats.spec_accepted_tokens == stats.spec_proposed_tokens
    assert stats.steps_total - steps < steps * 0.6


# -- configuration, memory, sleep ------------------------------------------------------------
def test_bad_heads_are_value_errors_before_the_target_cache(draft_dirs, tmp_path, monkeypatch):
    import jaxllm.engine

    target = str(draft_dirs["target"])

    def config(head) -> EngineConfig:
        return EngineConfig(model=target, speculative_mode="eagle", speculative_model=str(head),
                            **ENGINE)

    with pytest.raises(ValueError, match="no such file"):
        config(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        config(tmp_path)
    gguf = tmp_path / "head.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="config.json"):
        config(gguf)
    with pytest.raises(ValueError, match="needs"):
        EngineConfig(model=target, speculative_mode="eagle")

    def no_target_cache(*args, **kwargs):
        raise AssertionError("the target's KV cache was allocated before the head was checked")

    monkeypatch.setattr(jaxllm.engine, "allocate_kv_caches", no_target_cache)
    cases = {
        "hidden_size is 32": make_eagle_head(tmp_path / "hidden", 1, hidden=32),
        "vocabulary has 40 tokens": make_eagle_head(tmp_path / "vocab", 1, vocab=40),
        "no fc.weight": make_eagle_head(tmp_path / "nofc", 1, drop=("fc.weight",)),
        r"missing tensor\(s\) layers.0.mlp.up_proj.weight": make_eagle_head(
            tmp_path / "nomlp", 1, drop=("layers.0.mlp.up_proj.weight",)),
    }
    not_json = tmp_path / "notjson"
    not_json.mkdir()
    (not_json / "config.json").write_text("{")
    cases["not a Llama-style EAGLE config"] = not_json
    for message, head in cases.items():
        with pytest.raises(ValueError, match=message):
            LLMEngine(config(head))


def test_head_cache_shares_the_budget_sleeps_and_counts(eagle_engine):
    """The KV budget pays for the head's cache and the feature store (as many pages as the
    target's); sleep frees both and wake_up restores them; the compile counts include the
    head's programs."""
    from jaxllm.cache.kv_cache import bytes_per_page
    from jaxllm.models.eagle_head import read_eagle_config

    engine = eagle_engine
    runner = engine.speculation.draft_runner
    assert runner is engine.speculation.proposer.runner
    own = bytes_per_page(engine.model_config, engine.page_size, engine.kv_dtype, engine.attention)
    head_cfg = read_eagle_config(engine.config.speculative_model, engine.model_config)
    extra = (bytes_per_page(head_cfg, engine.page_size, engine.kv_dtype, engine.attention)
             + engine.page_size * HIDDEN * np.dtype(engine.dtype).itemsize)
    budget = int(engine.config.kv_cache_memory_bytes * engine.config.memory_fraction)
    assert engine._pages_from_budget() == (budget * own // (own + extra)) // own
    num_pages = engine.scheduler.allocator.num_pages
    assert runner.store.shape == (num_pages * engine.page_size, HIDDEN)
    assert runner.kv_caches[0].shape[0] == num_pages
    stats = engine.get_stats()
    assert stats.compile_count == engine.runner.compile_count + runner.compile_count
    assert runner.compile_count == len(engine.buckets) + len(engine.buckets.token_buckets)
    assert stats.recompile_count == 0
    engine.sleep()
    assert not runner.kv_caches and runner.store is None and not engine.runner.kv_caches
    engine.wake_up()
    prompts = _prompts(seed=5)[:2]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with _plain(engine):
        want = _tokens(_run(engine, prompts, params))
    proposed = engine.get_stats().spec_proposed_tokens
    assert _tokens(_run(engine, prompts, params)) == want
    stats = engine.get_stats()
    assert stats.spec_proposed_tokens > proposed and stats.recompile_count == 0
