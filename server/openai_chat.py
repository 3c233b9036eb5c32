"""POST /v1/chat/completions: chat template, tools (Hermes), reasoning split, streaming."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxllm.outputs import RequestOutput

from .chat_output import (
    ChatChoiceProcessor,
    chat_finish_reason,
    tool_call_delta_json,
    tool_call_json,
)
from .errors import bad_request, to_api_error
from .logprobs_format import chat_logprobs_content, prompt_logprobs_json
from .protocol_openai import ChatCompletionRequest, ChatMessage, NamedToolChoice
from .serving import (
    ServingContext,
    build_sampling_params,
    check_model,
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
from .streaming import SSE_DONE, SSE_HEADERS, first_item, last_unless_disconnected, sse
from .structured_output import tool_call_spec

router = APIRouter()


def messages_for_template(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the plain dicts chat templates expect (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}]: content part type {part.type!r} is not "
                                      f"supported (text only)", param=f"messages.{i}.content")
                texts.append(part.text)
            d["content"] = "\n".join(texts)
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass  # leave it as given; the template renders the string
                calls.append({"id": c.id, "type": c.type,
                              "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        out.append(d)
    return out


def validate_chat_request(ctx: ServingContext, req: ChatCompletionRequest) -> None:
    check_model(ctx, req.model)
    sc = ctx.server_config
    if req.n > sc.max_n:
        raise bad_request(f"n must be <= {sc.max_n}, got {req.n}", param="n")
    if req.prompt_logprobs is not None and req.prompt_logprobs > sc.max_logprobs:
        raise bad_request(f"prompt_logprobs must be <= {sc.max_logprobs}, got "
                          f"{req.prompt_logprobs}", param="prompt_logprobs")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if req.top_logprobs > sc.max_logprobs:
            raise bad_request(f"top_logprobs must be <= {sc.max_logprobs}, got "
                              f"{req.top_logprobs}", param="top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          param="stream_options")
    choice = req.tool_choice
    if choice not in (None, "none", "auto") and not req.tools:
        raise bad_request("tool_choice requires tools", param="tool_choice")
    if choice not in (None, "none") and req.tools and ctx.server_config.tool_call_parser is None:
        raise bad_request("tool calling is disabled on this server (no --tool-call-parser)",
                          param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        names = {t.function.name for t in req.tools or []}
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names unknown function {choice.function.name!r}",
                              param="tool_choice")


def _tools_active(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def build_chat_prompt(ctx: ServingContext, req: ChatCompletionRequest) -> tuple[str, str]:
    """(prompt text, forced tool prefix) for the request."""
    tools = ([t.model_dump(exclude_none=True) for t in req.tools]
             if _tools_active(req) else None)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        prompt = ctx.tokenizer.apply_chat_template(
            messages_for_template(req.messages),
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            tools=tools, **kwargs)
    except Exception as e:  # noqa: BLE001 -- template errors (jinja raise_exception) are input errors
        raise bad_request(f"cannot apply the chat template: {e}", param="messages") from e
    return prompt + _forced_tool_prefix(req), _forced_tool_prefix(req)


def _forced_tool_prefix(req: ChatCompletionRequest) -> str:
    """tool_choice "required" / named opens the Hermes tool-call block (and its name) in the
    prompt; the rest of the block is constrained to the tools' parameter schemas
    (`structured_output.tool_call_spec`)."""
    if isinstance(req.tool_choice, NamedToolChoice):
        name = json.dumps(req.tool_choice.function.name, ensure_ascii=False)
        return '<tool_call>\n{"name": ' + name + ', "arguments": '
    if req.tool_choice == "required" and req.tools:
        return '<tool_call>\n{"name": "'
    return ""


def chat_processor(ctx: ServingContext, req: ChatCompletionRequest, prefix: str) -> ChatChoiceProcessor:
    return ChatChoiceProcessor(reasoning=ctx.server_config.reasoning_parser is not None,
                               tools=_tools_active(req), tool_prefix=prefix)


def _top_k(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


def chat_sampling_params(ctx: ServingContext, req: ChatCompletionRequest, max_tokens: int,
                         stream: bool) -> Any:
    """The engine request's params; a stream gets DELTA outputs, an answer only the final
    one (`output_kind`)."""
    tool_spec = (tool_call_spec(req.tools or [], req.tool_choice, _forced_tool_prefix(req))
                 if _tools_active(req) else None)
    return resolve_bad_words(ctx, build_sampling_params(
        n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        max_tokens=max_tokens, min_tokens=req.min_tokens, stop=normalize_stop(req.stop),
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, logprobs=_top_k(req),
        prompt_logprobs=req.prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        output_kind=output_kind(stream),
        **token_constraints(ctx, req.logit_bias, req.allowed_token_ids, req.bad_words),
        **structured_fields(req, tool_spec)))


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Any:
    ctx = get_ctx(request)
    validate_chat_request(ctx, req)
    prompt, prefix = build_chat_prompt(ctx, req)
    ids = ctx.tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
    if not ids:
        raise bad_request("the rendered prompt is empty", param="messages")
    want = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = chat_sampling_params(ctx, req, resolve_max_tokens(ctx, len(ids), want), req.stream)
    rid = request_id(request, "chatcmpl")
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = generate(ctx, ids, params, rid, cache_salt=req.cache_salt, priority=req.priority)

    if req.stream:
        first = await first_item(stream)
        return StreamingResponse(
            _stream(ctx, req, prefix, len(ids), first, stream, response_id, created),
            media_type="text/event-stream", headers=SSE_HEADERS)

    final = await last_unless_disconnected(request, stream, lambda: ctx.engine.abort(rid))
    if final is None:
        return JSONResponse({}, status_code=499)
    choices, completion_tokens = [], 0
    reasoning_on = ctx.server_config.reasoning_parser is not None
    for comp in final.outputs:
        completion_tokens += len(comp.token_ids)
        proc = chat_processor(ctx, req, prefix)
        r1, c1, _ = proc.feed(comp.text)
        r2, c2, _ = proc.finish()
        content, reasoning = c1 + c2, r1 + r2
        message: dict[str, Any] = {"role": "assistant",
                                   "content": content if (content or not proc.tool_calls) else None}
        calls = proc.tool_calls if req.parallel_tool_calls is not False else proc.tool_calls[:1]
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        if reasoning_on:
            message["reasoning_content"] = reasoning or None
        logprobs = None
        if req.logprobs and comp.logprobs is not None:
            logprobs = {"content": chat_logprobs_content(ctx.tokenizer, comp.token_ids,
                                                         comp.logprobs, req.top_logprobs or 0)}
        choices.append({"index": comp.index, "message": message, "logprobs": logprobs,
                        "finish_reason": chat_finish_reason(comp.finish_reason or "stop",
                                                            bool(proc.tool_calls))})
    choices.sort(key=lambda c: c["index"])
    prompt_lps = (prompt_logprobs_json(ctx.tokenizer, final.prompt_token_ids,
                                       final.prompt_logprobs, req.prompt_logprobs)
                  if req.prompt_logprobs is not None else None)
    return {"id": response_id, "object": "chat.completion", "created": created,
            "model": ctx.model_name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens},
            "prompt_logprobs": prompt_lps}


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, prefix: str, prompt_len: int,
                  first: RequestOutput, rest: AsyncIterator[RequestOutput], response_id: str,
                  created: int) -> AsyncIterator[str]:
    # Usage in every chunk only with include_usage AND continuous_usage_stats (as vLLM); its
    # completion_tokens count the tokens the chunks sent so far carry (0 for the role chunk).
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
    reasoning_on = ctx.server_config.reasoning_parser is not None
    # The engine sends DELTA outputs: each carries the choice's new text and tokens. Tokens
    # (and their logprobs) wait in `pending` until a chunk carries them.
    procs: dict[int, ChatChoiceProcessor] = {}
    sent_tokens: dict[int, int] = {}
    pending: dict[int, tuple[list[int], list[Any]]] = {}
    done: set[int] = set()

    def usage() -> dict[str, int]:
        completion_tokens = sum(sent_tokens.values())
        return {"prompt_tokens": prompt_len, "completion_tokens": completion_tokens,
                "total_tokens": prompt_len + completion_tokens}

    def chunk(choices: list[dict[str, Any]]) -> str:
        body: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk",
                                "created": created, "model": ctx.model_name, "choices": choices}
        if continuous:
            body["usage"] = usage()
        return sse(body)

    def events(out: RequestOutput) -> list[str]:
        result = []
        for comp in out.outputs:
            i = comp.index
            if i in done:
                continue
            if i not in procs:
                procs[i] = chat_processor(ctx, req, prefix)
                sent_tokens[i] = 0
                pending[i] = ([], [])
                result.append(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]))
            proc = procs[i]
            # (the engine already holds back text that may start a stop string)
            reasoning, content, calls = proc.feed(comp.text)
            new_ids, new_lps = pending[i]
            new_ids += comp.token_ids
            if comp.logprobs is not None:
                new_lps += comp.logprobs
            finish = None
            if comp.finish_reason is not None:
                r2, c2, t2 = proc.finish()
                reasoning, content, calls = reasoning + r2, content + c2, calls + t2
                finish = chat_finish_reason(comp.finish_reason, bool(proc.tool_calls))
                done.add(i)
            delta: dict[str, Any] = {}
            if reasoning and reasoning_on:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if req.parallel_tool_calls is False:
                calls = [c for c in calls if c.index == 0]
            if calls:
                delta["tool_calls"] = [tool_call_delta_json(c) for c in calls]
            logprobs = None
            if req.logprobs and comp.logprobs is not None and new_ids:
                logprobs = {"content": chat_logprobs_content(
                    ctx.tokenizer, new_ids, new_lps, req.top_logprobs or 0)}
            if delta or finish is not None or logprobs is not None:
                sent_tokens[i] += len(new_ids)
                pending[i] = ([], [])
                result.append(chunk([{"index": i, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish}]))
        return result

    try:
        for event in events(first):
            yield event
        async for out in rest:
            for event in events(out):
                yield event
        if include_usage:
            yield sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                       "model": ctx.model_name, "choices": [], "usage": usage()})
    except Exception as exc:  # noqa: BLE001 -- headers are sent; report in-band
        yield sse(to_api_error(exc).body())
    finally:
        await rest.aclose()
    yield SSE_DONE
