"""Structured output: grammar-constrained decoding with llguidance.

`StructuredOutputsParams` (spec.py) says what a request's output must match; `GrammarCompiler`
(compiler.py) turns it into validated, cached grammars and per-sequence `GrammarMatcher`s
(matcher.py), which fill rows of the sampler's packed allowed-token bitmask
(`jaxllm.token_masks`). The engine imports this package only when a request asks for it.
"""

from jaxllm.structured.spec import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
