"""Request plumbing shared by the endpoints: model check, prompt length limits, building
SamplingParams, and running one engine request with metrics and abort-on-exit."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from jaxllm.config import EngineConfig
from jaxllm.engine_client import EngineClient
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind
from jaxllm.tokenizer import Tokenizer

from .errors import APIError, bad_request
from .metrics import ServerMetrics
from .response_store import ResponseStore
from .server_config import ServerConfig


@dataclass
class ServingContext:
    """What handlers need, stored on app.state.ctx (one per app, no globals)."""

    engine: EngineClient
    engine_config: EngineConfig
    server_config: ServerConfig
    metrics: ServerMetrics
    responses: ResponseStore = field(default_factory=ResponseStore)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name


def get_ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


def request_id(request: Request, prefix: str) -> str:
    """Engine request id: the X-Request-Id when given, else a fresh one (unique per request)."""
    given = request.scope.get("state", {}).get("request_id")
    return f"{prefix}-{given}-{uuid.uuid4().hex[:8]}" if given else f"{prefix}-{uuid.uuid4().hex}"


def check_model(ctx: ServingContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise APIError(404, f"The model `{model}` does not exist. Served: `{ctx.model_name}`.",
                       param="model", code="model_not_found")


def resolve_max_tokens(ctx: ServingContext, prompt_len: int, max_tokens: int | None) -> int:
    """Enforce prompt + max_tokens <= max_model_len, naming the numbers."""
    limit = ctx.engine.max_model_len
    if max_tokens is None:
        max_tokens = limit - prompt_len
        if max_tokens < 1:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, "
                              f"your prompt has {prompt_len} tokens, leaving no room to generate.",
                              param="messages")
        return max_tokens
    if prompt_len + max_tokens > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens. However, you "
                          f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                          f"prompt, {max_tokens} for the completion). Reduce the prompt or "
                          f"max_tokens.", param="max_tokens")
    return max_tokens


def check_token_ids(ctx: ServingContext, ids: list[int]) -> None:
    vocab = ctx.tokenizer.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is out of range [0, {vocab})", param="prompt")


def build_sampling_params(**fields: Any) -> Any:
    """SamplingParams from the fields the request set (None means: engine default)."""
    from jaxllm.sampling_params import SamplingParams

    known = {f.name for f in dataclasses.fields(SamplingParams)}
    kwargs = {k: v for k, v in fields.items() if v is not None and k in known}
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise bad_request(str(e)) from e


def structured_fields(req: Any, tool_spec: Any = None) -> dict[str, Any]:
    """The `structured_outputs` SamplingParams field of an OpenAI request (None: none): a tool
    call that must happen, else response_format / structured_outputs / guided_*."""
    from .structured_output import structured_spec

    spec = structured_spec(
        response_format=getattr(req, "response_format", None),
        structured_outputs=req.structured_outputs, guided_json=req.guided_json,
        guided_regex=req.guided_regex, guided_choice=req.guided_choice,
        guided_grammar=req.guided_grammar)
    return {"structured_outputs": tool_spec or spec}


def token_constraints(ctx: ServingContext, logit_bias: dict[str, float] | None,
                      allowed_token_ids: list[int] | None,
                      bad_words: list[str] | None) -> dict[str, Any]:
    """SamplingParams fields for logit_bias (JSON keys are strings), allowed_token_ids and
    bad_words, with token ids checked against the vocabulary."""
    vocab = ctx.tokenizer.vocab_size
    bias = None
    if logit_bias:
        bias = {}
        for key, value in logit_bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}",
                                  param="logit_bias") from None
            if not 0 <= token < vocab:
                raise bad_request(f"logit_bias token id {token} is out of range [0, {vocab})",
                                  param="logit_bias")
            bias[token] = value
    if allowed_token_ids is not None:
        bad = [t for t in allowed_token_ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"allowed_token_ids entry {bad[0]} is out of range [0, {vocab})",
                              param="allowed_token_ids")
    return {"logit_bias": bias, "allowed_token_ids": allowed_token_ids,
            "bad_words": bad_words or None}


def resolve_bad_words(ctx: ServingContext, params: Any) -> Any:
    """Params with bad_words tokenized (the sampler bans token sequences, not strings)."""
    return params.resolve_bad_words(
        lambda text: ctx.tokenizer.encode(text, add_special_tokens=False))


def normalize_stop(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(s == "" for s in stops):
        raise bad_request("stop strings must be non-empty", param="stop")
    return stops or None


def output_kind(stream: bool, cumulative: bool = False) -> RequestOutputKind:
    """What the engine sends for a request: its deltas (a stream sends what is new; the engine
    then copies nothing per step) or, cumulative=True, everything so far (the native API's
    stream); FINAL_ONLY for a non-streaming answer (no per-step outputs at all)."""
    if not stream:
        return RequestOutputKind.FINAL_ONLY
    return RequestOutputKind.CUMULATIVE if cumulative else RequestOutputKind.DELTA


async def generate(ctx: ServingContext, prompt_ids: list[int], params: Any, rid: str, *,
                   cache_salt: str | None, priority: int) -> AsyncIterator[RequestOutput]:
    """One engine request. Records latency metrics (from the arrival of outputs; a FINAL_ONLY
    request's one output, from the engine's timestamps); aborts the request if the consumer
    leaves early (disconnect, error) so its pages are freed."""
    start = time.perf_counter()
    last_time, last_tokens, finished = None, 0, False
    delta = params.output_kind is RequestOutputKind.DELTA
    final_only = params.output_kind is RequestOutputKind.FINAL_ONLY
    stream = ctx.engine.generate(prompt_ids, params, rid, cache_salt=cache_salt,
                                 priority=priority)
    try:
        async for out in stream:
            if out.error:
                raise APIError(500, f"engine failed the request: {out.error}",
                               type="internal_server_error")
            now = time.perf_counter()
            tokens = sum(len(o.token_ids) for o in out.outputs) + (last_tokens if delta else 0)
            if final_only:
                _observe_final(ctx, out, tokens)
                last_tokens = tokens
            elif tokens > last_tokens:
                if last_time is None:
                    ctx.metrics.ttft.observe(now - start)
                elif tokens > last_tokens:
                    gap = (now - last_time) / (tokens - last_tokens)
                    for _ in range(tokens - last_tokens):
                        ctx.metrics.inter_token.observe(gap)
                last_time, last_tokens = now, tokens
            finished = out.finished
            yield out
        ctx.metrics.e2e.observe(time.perf_counter() - start)
        ctx.metrics.prompt_tokens.inc(len(prompt_ids))
        ctx.metrics.generation_tokens.inc(last_tokens)
    finally:
        if not finished:
            await _close_quietly(stream)
            await ctx.engine.abort(rid)


def _observe_final(ctx: ServingContext, out: RequestOutput, tokens: int) -> None:
    """Latency of a request whose only output is its final one: time to first token and the
    mean gap after it, from the engine's timestamps."""
    m = out.metrics
    if m is None or m.first_token_time is None:
        return
    ctx.metrics.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
    if tokens > 1 and m.finished_time is not None:
        gap = max(0.0, m.finished_time - m.first_token_time) / (tokens - 1)
        for _ in range(tokens - 1):
            ctx.metrics.inter_token.observe(gap)


async def _close_quietly(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 -- already leaving; the abort below frees the request
            pass
