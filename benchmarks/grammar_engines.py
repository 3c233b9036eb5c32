"""Grammar engines compared on the default model's tokenizer: llguidance (what jaxllm uses)
against xgrammar, for the choice recorded in docs/architecture.md.

    pip install --no-deps --target /tmp/xg xgrammar apache-tvm-ffi   # (it wants torch+triton)
    PYTHONPATH=/tmp/xg python benchmarks/grammar_engines.py

Prints the time to build each engine's view of the tokenizer, to compile structured_bench's
JSON schema (fresh each time, no cache), and per token of a valid instance the time to fill
the next-token bitmask and accept the token (walking from a fresh matcher, median of 5).
xgrammar is not a dependency of the project: it requires torch and triton.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import llguidance
import llguidance.numpy as llnp
import numpy as np
import xgrammar as xgr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from structured_bench import SCHEMA  # noqa: E402

from jaxllm.default_model import default_model_path  # noqa: E402
from jaxllm.structured.tokenizer_view import build_llg_tokenizer  # noqa: E402
from jaxllm.tokenizer import load_tokenizer  # noqa: E402

tok = load_tokenizer(default_model_path())
V = tok.vocab_size
eos = tuple(tok.eos_token_ids)
instance = {"title": "The Long Night", "year": 1994, "genre": "drama", "rating": 7.5,
            "cast": [{"name": "Ann Lee", "role": "lead"}, {"name": "Bo Chan", "role": "support"}]}

def med(f, n=5):
    ts = []
    for _ in range(n):
        start = time.perf_counter()
        r = f()
        ts.append(time.perf_counter() - start)
    return 1e3 * statistics.median(ts), r

t_llg_tok, llg_tok = med(lambda: build_llg_tokenizer(tok, eos), 3)
t_xg_tok, xg_info = med(lambda: xgr.TokenizerInfo.from_huggingface(
    tok.hf, vocab_size=V, stop_token_ids=list(eos)), 3)
print(f"tokenizer view: llguidance {t_llg_tok:.0f} ms, xgrammar {t_xg_tok:.0f} ms")
text = json.dumps(instance)
ids = tok.encode(text, add_special_tokens=False)

def fresh_schema(i):
    return json.dumps(dict(SCHEMA, description=f"variant {i} {time.time_ns()}"))

def llg_compile():
    g = llguidance.LLMatcher.grammar_from_json_schema(fresh_schema(0))
    return llguidance.LLMatcher(llg_tok, g, log_level=0)
t_llg_c, m = med(llg_compile)
xg_compiler = xgr.GrammarCompiler(xg_info, cache_enabled=False)
t_xg_c, cg = med(lambda: xg_compiler.compile_json_schema(fresh_schema(0)))
print(f"schema compile: llguidance {t_llg_c:.2f} ms, xgrammar {t_xg_c:.2f} ms")

TEMPLATE = llguidance.LLMatcher(llg_tok, llguidance.LLMatcher.grammar_from_json_schema(
    json.dumps(SCHEMA)), log_level=0)


def llg_walk(warm: bool = False):
    """From a fresh matcher (the grammar's lazy tables built on the way), or (`warm`) from a
    copy of a cached start state whose tables earlier walks built, as the engine's cache does."""
    if warm:
        mt = TEMPLATE.deep_copy()
    else:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
        mt = llguidance.LLMatcher(llg_tok, grammar, log_level=0)
    words = np.zeros((1, (V + 31) // 32), np.int32)
    ok = True
    for t in ids:
        llnp.fill_next_token_bitmask(mt, words, 0)
        ok &= bool((words[0, t // 32] >> (t % 32)) & 1)
        mt.consume_token(t)
    return ok
def xg_walk():
    mt = xgr.GrammarMatcher(cg)
    bm = xgr.allocate_token_bitmask(1, xg_info.vocab_size)
    ok = True
    for t in ids:
        mt.fill_next_token_bitmask(bm)
        ok &= bool((bm[0, t // 32].item() >> (t % 32)) & 1)
        mt.accept_token(t)
    return ok
t_llg_w, ok1 = med(llg_walk)
llg_walk(warm=True)
t_llg_warm, ok3 = med(lambda: llg_walk(warm=True))
t_xg_w, ok2 = med(xg_walk)
n = len(ids)
print(f"{n} tokens of a valid instance, mask + accept per token: llguidance "
      f"{t_llg_w / n:.3f} ms fresh, {t_llg_warm / n:.3f} ms from a cached start state (all "
      f"allowed: {ok1 and ok3}), xgrammar {t_xg_w / n:.3f} ms (all allowed: {ok2})")
