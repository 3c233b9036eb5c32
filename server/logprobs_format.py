"""Engine logprobs -> the two OpenAI wire formats (legacy completions and chat)."""

from __future__ import annotations

import math
from typing import Any

from jaxllm.outputs import Logprob, PositionLogprobs

_FLOOR = -9999.0  # JSON has no -inf; clients expect a very negative number


def finite_logprob(x: float) -> float:
    """A logprob JSON can carry: -inf (a token a grammar excludes) and NaN become -9999.0."""
    return _FLOOR if (math.isinf(x) or math.isnan(x)) else max(float(x), _FLOOR)


def token_text(tokenizer: Any, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def top_entries(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely entries of a position, most likely first."""
    if k <= 0:
        return []
    ranked = sorted(position.items(),
                    key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                    -kv[1].logprob))
    return ranked[:k]


def completion_logprobs(tokenizer: Any, token_ids: list[int],
                        positions: list[PositionLogprobs | None], top_k: int,
                        text_offset_start: int) -> dict[str, Any]:
    """Legacy format {tokens, token_logprobs, top_logprobs, text_offset}; a None position
    (the first prompt token under echo) gives nulls."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset_start
    for tid, pos in zip(token_ids, positions, strict=True):
        chosen = pos.get(tid) if pos else None
        text = token_text(tokenizer, tid, chosen)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if pos is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(finite_logprob(chosen.logprob) if chosen else _FLOOR)
        tops.append(_completion_top(tokenizer, tid, pos, top_k))
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _completion_top(tokenizer: Any, token_id: int, position: PositionLogprobs,
                    top_k: int) -> dict[str, float]:
    """The sampled token first, then the top_k alternatives: up to top_k + 1 entries, as vLLM
    sends (so `logprobs: 0` still names the sampled token)."""
    entries = [(token_id, position[token_id])] if token_id in position else []
    entries += [(i, lp) for i, lp in top_entries(position, top_k) if i != token_id]
    out: dict[str, float] = {}
    for i, lp in entries[:top_k + 1]:
        out.setdefault(token_text(tokenizer, i, lp), finite_logprob(lp.logprob))
    return out


def prompt_logprobs_json(tokenizer: Any, token_ids: list[int],
                         positions: list[PositionLogprobs | None] | None,
                         top_k: int) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: null for the first prompt token, then per position
    {token_id: {logprob, rank, decoded_token}} with the prompt token and its top_k
    alternatives."""
    if positions is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    padded = list(positions)[:len(token_ids)]
    padded += [None] * (len(token_ids) - len(padded))
    for tid, pos in zip(token_ids, padded, strict=True):
        if pos is None:
            out.append(None)
            continue
        keep = [(tid, pos[tid])] if tid in pos else []
        keep += [(i, lp) for i, lp in top_entries(pos, top_k) if i != tid]
        out.append({str(i): {"logprob": finite_logprob(lp.logprob), "rank": lp.rank,
                             "decoded_token": token_text(tokenizer, i, lp)} for i, lp in keep})
    return out


def chat_logprobs_content(tokenizer: Any, token_ids: list[int],
                          positions: list[PositionLogprobs], top_k: int) -> list[dict[str, Any]]:
    """Chat format: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    out = []
    for tid, pos in zip(token_ids, positions, strict=True):
        chosen = pos.get(tid)
        out.append({
            "token": token_text(tokenizer, tid, chosen),
            "logprob": finite_logprob(chosen.logprob) if chosen else _FLOOR,
            "bytes": list(tokenizer.token_bytes(tid)),
            "top_logprobs": [
                {"token": token_text(tokenizer, i, lp), "logprob": finite_logprob(lp.logprob),
                 "bytes": list(tokenizer.token_bytes(i))}
                for i, lp in top_entries(pos, top_k)
            ],
        })
    return out
