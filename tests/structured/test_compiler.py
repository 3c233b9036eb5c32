"""Grammar compiler and matcher against llguidance itself, on the default model's tokenizer.

Random walks: each step draws a token the packed mask allows; the batched, lazily synced
`GrammarMatcher`s must give the same masks as a fresh llguidance matcher fed the whole prefix
token by token, and every finished walk must be accepted by llguidance's own check.
"""

from __future__ import annotations

import llguidance
import numpy as np
import pytest

from jaxllm.structured.compiler import grammar_accepts
from jaxllm.structured.spec import StructuredOutputsParams as Spec
from jaxllm.token_masks import all_allowed, unpack_allowed_host

SPECS = [
    Spec(json={"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": -5, "maximum": 300},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3}},
        "required": ["name", "n"], "additionalProperties": False}),
    Spec(regex=r"(ab|cd)[0-9]{2,4}x?"),
    Spec(choice=["yes", "no", "maybe so"]),
    Spec(grammar='root ::= "(" [a-c]{1,3} ")" | "none"'),
]


def reference_mask(compiler, spec, prefix) -> np.ndarray:
    """llguidance's own bitmask after consuming `prefix` one token at a time."""
    m = llguidance.LLMatcher(compiler.tokenizer, _grammar(spec), log_level=0)
    for t in prefix:
        assert m.consume_token(int(t))
    words = -(-compiler.vocab_size // 32)  # compute_bitmask may pad one word past the vocab
    return np.frombuffer(m.compute_bitmask(), np.int32)[:words]


def _grammar(spec):
    from jaxllm.structured.compiler import grammar_text

    return grammar_text(spec)


@pytest.mark.parametrize("seed", [3, 11])
def test_matchers_follow_random_walks(compiler, seed):
    rng = np.random.default_rng(seed)
    vocab = compiler.vocab_size
    specs = [SPECS[i] for i in rng.permutation(len(SPECS))]
    matchers = [compiler.matchers(s, 1)[0] for s in specs]
    outputs: list[list[int]] = [[] for _ in specs]
    done = [False] * len(specs)
    for _ in range(40):
        live = [i for i in range(len(specs)) if not done[i]]
        if not live:
            break
        for i in live:  # lazy sync, sometimes skipped so the next one catches up by several
            if rng.random() < 0.7:
                matchers[i].sync(outputs[i])
        rows = list(rng.permutation(len(live)) + 1)  # scattered rows of a bigger batch
        allowed = all_allowed(len(live) + 2, vocab)
        for i in live:
            matchers[i].sync(outputs[i])
        compiler.fill_bitmasks([matchers[i] for i in live], rows, allowed)
        assert (allowed[0] == -1).all() and (allowed[-1] == -1).all()  # other rows untouched
        for i, row in zip(live, rows, strict=True):
            np.testing.assert_array_equal(allowed[row], reference_mask(compiler, specs[i],
                                                                       outputs[i]))
            ids = np.flatnonzero(unpack_allowed_host(allowed[row], vocab))
            assert ids.size > 0
            token = int(rng.choice(ids))
            if token in compiler.tokenizer.eos_tokens:
                assert matchers[i].accepting
                done[i] = True
            else:
                outputs[i].append(token)
    for i, spec in enumerate(specs):
        matchers[i].sync(outputs[i])
        if done[i] or matchers[i].finished:
            assert grammar_accepts(compiler, spec, outputs[i])
            assert matchers[i].accepting and matchers[i].error is None


def test_rollback_when_output_shrinks(compiler):
    spec = Spec(regex=r"[a-z]{3,8}")
    m = compiler.matchers(spec, 1)[0]
    ids = compiler.tokenizer.tokenize_str("hello")
    m.sync(ids)
    assert m.accepting
    m.sync(ids[:1])
    assert m.num_consumed == 1
    words = all_allowed(1, compiler.vocab_size)
    compiler.fill_bitmasks([m], [0], words)
    np.testing.assert_array_equal(words[0], reference_mask(compiler, spec, ids[:1]))


def test_model_vocab_differs_from_tokenizer(compiler):
    """A model vocabulary smaller than the tokenizer's keeps its words; a bigger one has the
    words past the tokenizer cleared (those ids decode to nothing the grammar can match)."""
    spec = Spec(choice=["a", "b"])
    m = compiler.matchers(spec, 1)[0]
    ref = reference_mask(compiler, spec, [])
    small = all_allowed(2, 512)
    compiler.fill_bitmasks([m], [1], small)
    np.testing.assert_array_equal(small[1], ref[:16])
    big = all_allowed(1, compiler.vocab_size + 100)
    compiler.fill_bitmasks([m], [0], big)
    np.testing.assert_array_equal(big[0, :ref.size], ref)
    assert (big[0, ref.size:] == 0).all()


@pytest.mark.parametrize("spec, message", [
    (Spec(regex="a("), "regex.*unclosed group"),
    (Spec(json={"type": "foo"}), "JSON schema.*foo"),
    (Spec(json={"type": "string", "pattern": "(("}), "JSON schema.*regex"),
    (Spec(grammar="start: foo"), "grammar.*foo"),
    (Spec(grammar="root ::= (("), "grammar"),
])
def test_bad_specs_name_the_problem(compiler, spec, message):
    with pytest.raises(ValueError, match=message):
        compiler.compile(spec)


def test_cache_is_bounded_lru(default_tokenizer):
    from jaxllm.structured.compiler import GrammarCompiler
    from jaxllm.structured.tokenizer_view import build_llg_tokenizer

    c = GrammarCompiler(lambda: build_llg_tokenizer(default_tokenizer, [2]), cache_size=2)
    a, b, d = Spec(regex="a+"), Spec(regex="b+"), Spec(regex="d+")
    first = c.compile(a)
    c.compile(b)
    assert c.compile(a) is first  # hit, now most recent
    c.compile(d)  # evicts b
    assert len(c) == 2 and c.stats.hits == 1 and c.stats.misses == 3
    c.compile(b)
    assert c.stats.misses == 4
    assert c.compile(Spec(regex="d+")) is not None and c.stats.hits == 2
    two = c.matchers(a, 2)
    two[0].sync(c.tokenizer.tokenize_str("aa"))
    assert two[1].num_consumed == 0 and not two[1].accepting  # independent copies


def test_tokenizer_view_is_built_in_the_background(default_tokenizer):
    """Constructing the compiler starts the build on another thread, without a compile call;
    the first compile then uses that build (the factory runs once)."""
    import threading

    from jaxllm.structured.compiler import GrammarCompiler
    from jaxllm.structured.tokenizer_view import build_llg_tokenizer

    calls, built = [], threading.Event()

    def factory():
        calls.append(threading.get_ident())
        tokenizer = build_llg_tokenizer(default_tokenizer, default_tokenizer.eos_token_ids)
        built.set()
        return tokenizer

    c = GrammarCompiler(factory)
    assert built.wait(60), "the background build did not run"
    assert calls == [calls[0]] and calls[0] != threading.get_ident()
    m = c.matchers(Spec(choice=["yes", "no"]), 1)[0]
    m.sync(c.tokenizer.tokenize_str("yes"))
    assert m.accepting and len(calls) == 1


def test_first_use_waits_for_the_build_and_errors_surface_there():
    import threading

    from jaxllm.structured.compiler import GrammarCompiler

    release, calls = threading.Event(), []
    sentinel = object()

    def slow():
        calls.append(threading.get_ident())
        release.wait(30)
        return sentinel

    c = GrammarCompiler(slow)
    threading.Timer(0.2, release.set).start()
    assert c.tokenizer is sentinel and c.tokenizer is sentinel and len(calls) == 1
    assert calls[0] != threading.get_ident()

    def broken():
        calls.append("broken")
        raise ValueError("structured output needs the model's EOS token id")

    c = GrammarCompiler(broken)  # no error at construction
    with pytest.raises(ValueError, match="EOS token id"):
        c.compile(Spec(regex="a+"))
    lazy_calls = len(calls)
    lazy = GrammarCompiler(broken, build_in_background=False)
    assert len(calls) == lazy_calls  # not built until first use
    with pytest.raises(ValueError, match="EOS token id"):
        _ = lazy.tokenizer
