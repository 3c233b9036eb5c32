"""POST /v1/completions: legacy text completions, streaming and not."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxllm.outputs import CompletionOutput, RequestOutput

from .errors import bad_request, to_api_error
from .logprobs_format import completion_logprobs, prompt_logprobs_json
from .protocol_openai import CompletionRequest
from .serving import (
    ServingContext,
    build_sampling_params,
    check_model,
    check_token_ids,
    generate,
    get_ctx,
    normalize_stop,
    output_kind,
    request_id,
    resolve_bad_words,
    resolve_max_tokens,
    structured_fields,
    token_constraints,
)
from .streaming import SSE_DONE, SSE_HEADERS, merge_streams, run_unless_disconnected, sse

router = APIRouter()


def _prompts(ctx: ServingContext, req: CompletionRequest) -> list[tuple[list[int], str]]:
    """(token ids, text) per prompt; text is needed for echo."""
    p = req.prompt
    tok = ctx.tokenizer
    if isinstance(p, str):
        items: list[str | list[int]] = [p]
    elif len(p) == 0:
        raise bad_request("prompt must not be empty", param="prompt")
    elif all(isinstance(x, int) for x in p):
        items = [list(p)]  # type: ignore[arg-type]
    else:
        items = list(p)  # type: ignore[arg-type]
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tok.encode(item, add_special_tokens=req.add_special_tokens)
            text = item
        else:
            ids = list(item)
            check_token_ids(ctx, ids)
            text = tok.decode(ids, skip_special_tokens=False)
        if not ids:
            raise bad_request("prompt must contain at least one token", param="prompt")
        out.append((ids, text))
    return out


def _validate(ctx: ServingContext, req: CompletionRequest) -> None:
    check_model(ctx, req.model)
    sc = ctx.server_config
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
    if req.n > sc.max_n:
        raise bad_request(f"n must be <= {sc.max_n}, got {req.n}", param="n")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(req, name)
        if v is not None and v > sc.max_logprobs:
            raise bad_request(f"{name} must be <= {sc.max_logprobs}, got {v}", param=name)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          param="stream_options")


def _params(ctx: ServingContext, req: CompletionRequest, max_tokens: int) -> Any:
    prompt_lp = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_lp = max(prompt_lp or 0, req.logprobs)
    return resolve_bad_words(ctx, build_sampling_params(
        n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        max_tokens=max_tokens, min_tokens=req.min_tokens, stop=normalize_stop(req.stop),
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, logprobs=req.logprobs,
        prompt_logprobs=prompt_lp, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        output_kind=output_kind(req.stream),  # a stream gets DELTA outputs, an answer the final
        **token_constraints(ctx, req.logit_bias, req.allowed_token_ids, req.bad_words),
        **structured_fields(req)))


def _prompt_logprobs(ctx: ServingContext, req: CompletionRequest, out: RequestOutput) -> Any:
    """vLLM's per-choice `prompt_logprobs` (null unless the request asked for them)."""
    if req.prompt_logprobs is None:
        return None
    return prompt_logprobs_json(ctx.tokenizer, out.prompt_token_ids, out.prompt_logprobs,
                                req.prompt_logprobs)


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


class _ChoiceState:
    """Streaming cursor of one choice: tokens the sent chunks carried, tokens received but
    not yet carried, characters sent (the next logprob text offset)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.unsent = 0
        self.offset = 0
        self.echoed = False
        self.done = False


def _echo_part(ctx: ServingContext, req: CompletionRequest, out: RequestOutput,
               prompt_text: str) -> tuple[str, dict[str, Any] | None]:
    if req.logprobs is None or out.prompt_logprobs is None:
        return prompt_text, None
    ids = out.prompt_token_ids
    lps = list(out.prompt_logprobs) + [None] * (len(ids) - len(out.prompt_logprobs))
    return prompt_text, completion_logprobs(ctx.tokenizer, ids, lps, req.logprobs, 0)


def _merge_lp(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def _choice_delta(ctx: ServingContext, req: CompletionRequest, out: RequestOutput,
                  comp: CompletionOutput, st: _ChoiceState, prompt_text: str) -> tuple[str, Any]:
    """Text and logprobs of one choice's new output (a DELTA one, or a final one read from a
    fresh state), echo first, once; advances `st`."""
    text, lp = "", None
    if req.echo and not st.echoed:
        text, lp = _echo_part(ctx, req, out, prompt_text)
        st.offset += len(text)
        st.echoed = True
    new_text = comp.text  # the engine already holds back text that may start a stop string
    if req.logprobs is not None and comp.logprobs is not None:
        gen_lp = completion_logprobs(ctx.tokenizer, comp.token_ids, comp.logprobs,
                                     req.logprobs, st.offset)
        lp = _merge_lp(lp, gen_lp)
    st.offset += len(new_text)
    st.unsent += len(comp.token_ids)
    return text + new_text, lp


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, request: Request) -> Any:
    ctx = get_ctx(request)
    _validate(ctx, req)
    prompts = _prompts(ctx, req)
    jobs = []
    base = request_id(request, "cmpl")
    for i, (ids, _) in enumerate(prompts):
        max_tokens = resolve_max_tokens(ctx, len(ids), req.max_tokens)
        jobs.append((ids, _params(ctx, req, max_tokens), f"{base}-{i}"))
    response_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def streams() -> list[AsyncIterator[RequestOutput]]:
        return [generate(ctx, ids, params, rid, cache_salt=req.cache_salt, priority=req.priority)
                for ids, params, rid in jobs]

    async def abort_all() -> None:
        for _, _, rid in jobs:
            await ctx.engine.abort(rid)

    if req.stream:
        # Admission errors (too long, overloaded) must become a real status, not a stream:
        # start every request and wait for its first output before answering.
        its = streams()
        firsts = []
        try:
            for it in its:
                firsts.append(await anext(it))
        except BaseException:
            for it in its:
                await it.aclose()
            raise
        return StreamingResponse(
            _stream(ctx, req, prompts, its, firsts, response_id, created),
            media_type="text/event-stream", headers=SSE_HEADERS)

    async def collect() -> list[RequestOutput | None]:
        finals: list[RequestOutput | None] = [None] * len(jobs)
        async for i, out in merge_streams(streams()):
            finals[i] = out
        return finals

    finals = await run_unless_disconnected(request, collect, abort_all)
    if finals is None:
        return JSONResponse({}, status_code=499)
    choices = []
    prompt_tokens = completion_tokens = 0
    for p_idx, out in enumerate(finals):
        assert out is not None
        prompt_tokens += len(prompts[p_idx][0])
        for comp in out.outputs:
            completion_tokens += len(comp.token_ids)
            st = _ChoiceState()
            text, lp = _choice_delta(ctx, req, out, comp, st, prompts[p_idx][1])
            choices.append({"index": p_idx * req.n + comp.index, "text": text, "logprobs": lp,
                            "finish_reason": _finish(comp.finish_reason) or "stop",
                            "prompt_logprobs": _prompt_logprobs(ctx, req, out)})
    choices.sort(key=lambda c: c["index"])
    return {"id": response_id, "object": "text_completion", "created": created,
            "model": ctx.model_name, "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens)}


async def _stream(ctx: ServingContext, req: CompletionRequest,
                  prompts: list[tuple[list[int], str]], its: list[AsyncIterator[RequestOutput]],
                  firsts: list[RequestOutput], response_id: str, created: int
                  ) -> AsyncIterator[str]:
    # Usage in every chunk only with include_usage AND continuous_usage_stats (as vLLM); its
    # completion_tokens count the tokens the chunks sent so far carry.
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
    states: dict[tuple[int, int], _ChoiceState] = {}
    started: set[int] = set()
    prompt_lps: dict[int, list[Any]] = {}  # per prompt: its DELTA outputs' prompt logprobs

    def usage_now() -> dict[str, int]:
        prompt = sum(len(prompts[i][0]) for i in started)
        return _usage(prompt, sum(st.tokens for st in states.values()))

    def chunks_for(p_idx: int, out: RequestOutput) -> list[str]:
        started.add(p_idx)
        if out.prompt_logprobs is not None:  # (echo and the first chunk read them whole)
            joined = prompt_lps.setdefault(p_idx, [])
            joined += out.prompt_logprobs
            out = dataclasses.replace(out, prompt_logprobs=joined)
        events = []
        for comp in out.outputs:
            st = states.setdefault((p_idx, comp.index), _ChoiceState())
            if st.done:
                continue
            first = not st.echoed and st.tokens == 0 and st.offset == 0
            text, lp = _choice_delta(ctx, req, out, comp, st, prompts[p_idx][1])
            finish = _finish(comp.finish_reason)
            if lp is not None and not lp["tokens"]:
                lp = None
            if not text and finish is None and lp is None:
                continue  # nothing sent: the tokens go with a later chunk
            st.tokens, st.unsent = st.tokens + st.unsent, 0
            st.done = finish is not None
            choice: dict[str, Any] = {"index": p_idx * req.n + comp.index, "text": text,
                                      "logprobs": lp, "finish_reason": finish}
            if first and req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _prompt_logprobs(ctx, req, out)
            chunk: dict[str, Any] = {
                "id": response_id, "object": "text_completion", "created": created,
                "model": ctx.model_name, "choices": [choice]}
            if continuous:
                chunk["usage"] = usage_now()
            events.append(sse(chunk))
        return events

    async def rest() -> AsyncIterator[tuple[int, RequestOutput]]:
        for i, first in enumerate(firsts):
            yield i, first
        async for item in merge_streams(its):
            yield item

    merged = rest()
    try:
        async for p_idx, out in merged:
            for event in chunks_for(p_idx, out):
                yield event
        if include_usage:
            yield sse({"id": response_id, "object": "text_completion", "created": created,
                       "model": ctx.model_name, "choices": [], "usage": usage_now()})
    except Exception as exc:  # noqa: BLE001 -- headers are sent; report in-band
        yield sse(to_api_error(exc).body())
    finally:
        await merged.aclose()
        for it in its:
            await it.aclose()
    yield SSE_DONE
