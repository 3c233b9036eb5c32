"""Speculative decoding: proposals (n-gram prompt lookup; a draft model in `jaxllm.spec.draft`
and an EAGLE head drafting from the target's hidden states in `jaxllm.spec.eagle`, imported
on demand), per-request back-off, and exact verification of the proposals against
the target model (rejection sampling)."""

from jaxllm.spec.backoff import SpeculationBackoff
from jaxllm.spec.config import SPECULATIVE_MODES, SpeculativeConfig
from jaxllm.spec.ngram import NgramProposer, TokenHistory, propose_ngram
from jaxllm.spec.rejection import (
    VerifyOutput,
    expand_sampling_tensors,
    rejection_sample,
    verification_uniforms,
)
from jaxllm.spec.verify_layout import VerifyLayout, build_verify_layout, verify_row_buckets

__all__ = [
    "SPECULATIVE_MODES",
    "NgramProposer",
    "SpeculationBackoff",
    "SpeculativeConfig",
    "TokenHistory",
    "VerifyLayout",
    "VerifyOutput",
    "build_verify_layout",
    "expand_sampling_tensors",
    "propose_ngram",
    "rejection_sample",
    "verification_uniforms",
    "verify_row_buckets",
]
