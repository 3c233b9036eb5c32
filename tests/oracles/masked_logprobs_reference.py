"""float64 numpy twin of the logprobs the sampler reports (`jaxllm.sampling.logprob_logits`):
raw log_softmax, except on rows flagged `masked_logprobs`, whose tokens outside the row's
grammar mask are -inf first (a flagged row whose grammar allows nothing stays raw).
"""

from __future__ import annotations

import numpy as np

from jaxllm.sampling import SamplingTensors
from jaxllm.token_masks import unpack_allowed_host
from tests.oracles.sampling_reference import reference_logprobs


def reference_reported_logits(logits: np.ndarray, t: SamplingTensors) -> np.ndarray:
    """float64 [R, V]: the logits whose log_softmax each row reports."""
    x = np.asarray(logits, np.float64).copy()
    flagged = np.asarray(t.masked_logprobs)
    allowed = unpack_allowed_host(np.asarray(t.grammar_mask), x.shape[1])
    for r in range(x.shape[0]):
        if flagged[r] and allowed[r].any():
            x[r, ~allowed[r]] = -np.inf
    return x


def reference_reported_logprobs(logits: np.ndarray, tokens: np.ndarray, k: int,
                                t: SamplingTensors):
    """(chosen logprobs, ranks, top-k ids, top-k logprobs) the sampler must report; -inf
    entries of the top k (fewer allowed tokens than k) are the lowest excluded ids."""
    return reference_logprobs(reference_reported_logits(logits, t), tokens, k)
