"""POST /v1/responses (and GET /v1/responses/{id}): the OpenAI Responses API over the chat path.

A request becomes a `ChatCompletionRequest` (instructions -> system message, input items ->
messages, function tools -> chat tools), so templating, tool-call parsing and the reasoning
split are the chat endpoint's own. One `OutputBuilder` turns the generated text into output
items and stream events; the non-streamed response is the same builder fed the whole text, so
both agree by construction. `previous_response_id` replays a stored conversation (in memory,
server lifetime).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxllm.outputs import RequestOutput

from .chat_output import ChatChoiceProcessor
from .errors import APIError, bad_request, to_api_error
from .openai_chat import (
    build_chat_prompt,
    chat_processor,
    chat_sampling_params,
    validate_chat_request,
)
from .protocol_openai import ChatCompletionRequest
from .protocol_responses import (
    ContentPartEvent,
    ErrorEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionToolChoice,
    IncompleteDetails,
    InputContentPart,
    InputTokensDetails,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from .response_store import StoredResponse
from .serving import ServingContext, check_model, generate, get_ctx, request_id, resolve_max_tokens
from .streaming import SSE_HEADERS, first_item, last_unless_disconnected

router = APIRouter()


# --- request -> chat request --------------------------------------------------------------

def _text(content: str | list[InputContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise bad_request(f"{where}: content part type {part.type!r} is not supported "
                              f"(text only)", param=where)
        texts.append(part.text)
    return "\n".join(texts)


def _input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as chat message dicts (instructions not included)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(req.input):
        where = f"input.{i}"
        if item.type == "message":
            role = "system" if item.role == "developer" else (item.role or "user")
            messages.append({"role": role, "content": _text(item.content, where)})
        elif item.type == "function_call":
            if not item.name or item.call_id is None:
                raise bad_request(f"{where}: a function_call needs name and call_id", param=where)
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _text(item.output, where)})
        elif item.type != "reasoning":  # replayed reasoning is not fed back to the model
            raise bad_request(f"{where}: input item type {item.type!r} is not supported",
                              param=where)
    return messages


def _chat_request(req: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    if not messages:
        raise bad_request("input must not be empty", param="input")
    tools = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
             for t in req.tools or []]
    choice: Any = req.tool_choice
    if isinstance(choice, FunctionToolChoice):
        choice = {"type": "function", "function": {"name": choice.name}}
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body = {
        "model": req.model, "messages": system + messages, "tools": tools or None,
        "tool_choice": choice, "parallel_tool_calls": req.parallel_tool_calls,
        "max_completion_tokens": req.max_output_tokens,
        **req.model_dump(include={"temperature", "top_p", "top_k", "min_p", "seed", "stop",
                                  "repetition_penalty", "presence_penalty", "frequency_penalty",
                                  "min_tokens", "logit_bias", "allowed_token_ids", "bad_words",
                                  "cache_salt", "priority"}),
    }
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema_body is None:
            raise bad_request("text.format json_schema needs a schema", param="text.format")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.json_schema_body, "strict": fmt.strict}}
    return ChatCompletionRequest.model_validate(body)


# --- generated text -> output items and events --------------------------------------------

class OutputBuilder:
    """Routes generated text through the chat processor into output items, returning the
    stream events each step causes. Items are numbered (output_index) in the order they open."""

    def __init__(self, proc: ChatChoiceProcessor, reasoning_on: bool,
                 next_sequence: Callable[[], int]) -> None:
        self._proc = proc
        self._reasoning_on = reasoning_on
        self._seq = next_sequence
        self.items: list[OutputMessage | ReasoningItem | FunctionCallItem] = []
        self._message: OutputMessage | None = None
        self._reasoning: ReasoningItem | None = None
        self.calls: list[FunctionCallItem] = []

    def feed(self, delta: str) -> list[Any]:
        return self._route(*self._proc.feed(delta))

    def finish(self, incomplete: bool) -> list[Any]:
        events = self._route(*self._proc.finish())
        if not self.items:  # nothing generated: still one (empty) message, as the chat path
            events += self._open_message()
        status = "incomplete" if incomplete else "completed"
        events += self._close_reasoning(status) + self._close_message(status)
        return events

    def _route(self, reasoning: str, content: str, calls: list[Any]) -> list[Any]:
        events: list[Any] = []
        if reasoning and self._reasoning_on:
            if self._reasoning is None:
                self._reasoning = ReasoningItem(id=f"rs_{uuid.uuid4().hex}", status="in_progress",
                                                content=[ReasoningText(text="")])
                events.append(self._item_event("response.output_item.added", self._reasoning))
            self._reasoning.content[0].text += reasoning
            events.append(ReasoningTextDeltaEvent(
                sequence_number=self._seq(), item_id=self._reasoning.id,
                output_index=self._index(self._reasoning), content_index=0, delta=reasoning))
        if content:
            events += self._close_reasoning("completed")
            if self._message is None:
                events += self._open_message()
            assert self._message is not None
            self._message.content[0].text += content
            events.append(OutputTextDeltaEvent(
                sequence_number=self._seq(), item_id=self._message.id,
                output_index=self._index(self._message), content_index=0, delta=content))
        for call in calls:
            events += self._close_reasoning("completed")
            item = FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=call.id,
                                    name=call.name, arguments="", status="in_progress")
            events.append(self._item_event("response.output_item.added", item))
            self.calls.append(item)
            index = self._index(item)
            events.append(FunctionCallArgumentsDeltaEvent(
                sequence_number=self._seq(), item_id=item.id, output_index=index,
                delta=call.arguments))
            item.arguments, item.status = call.arguments, "completed"
            events.append(FunctionCallArgumentsDoneEvent(
                sequence_number=self._seq(), item_id=item.id, output_index=index,
                name=item.name, arguments=item.arguments))
            events.append(self._item_event("response.output_item.done", item))
        return events

    def _index(self, item: Any) -> int:
        return next(i for i, x in enumerate(self.items) if x is item)

    def _item_event(self, kind: str, item: Any) -> OutputItemEvent:
        if kind == "response.output_item.added":
            self.items.append(item)
        return OutputItemEvent(type=kind, sequence_number=self._seq(),
                               output_index=self._index(item), item=item.model_copy(deep=True))

    def _open_message(self) -> list[Any]:
        self._message = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress",
                                      content=[OutputText(text="")])
        added = self._item_event("response.output_item.added",
                                 self._message.model_copy(update={"content": []}))
        self.items[-1] = self._message
        return [added, ContentPartEvent(
            type="response.content_part.added", sequence_number=self._seq(),
            item_id=self._message.id, output_index=self._index(self._message), content_index=0,
            part=OutputText(text=""))]

    def _close_message(self, status: str) -> list[Any]:
        msg, self._message = self._message, None
        if msg is None:
            return []
        index, text = self._index(msg), msg.content[0].text
        msg.status = status  # type: ignore[assignment]
        return [
            OutputTextDoneEvent(sequence_number=self._seq(), item_id=msg.id,
                                output_index=index, content_index=0, text=text),
            ContentPartEvent(type="response.content_part.done", sequence_number=self._seq(),
                             item_id=msg.id, output_index=index, content_index=0,
                             part=OutputText(text=text)),
            self._item_event("response.output_item.done", msg),
        ]

    def _close_reasoning(self, status: str) -> list[Any]:
        item, self._reasoning = self._reasoning, None
        if item is None:
            return []
        item.status = status  # type: ignore[assignment]
        return [ReasoningTextDoneEvent(sequence_number=self._seq(), item_id=item.id,
                                       output_index=self._index(item), content_index=0,
                                       text=item.content[0].text),
                self._item_event("response.output_item.done", item)]


# --- the endpoint -------------------------------------------------------------------------

class _Turn:
    """One request's fixed facts, shared by the streamed and non-streamed answers."""

    def __init__(self, ctx: ServingContext, req: ResponsesRequest, chat: ChatCompletionRequest,
                 messages: list[dict[str, Any]], prefix: str, prompt_len: int) -> None:
        self.ctx, self.req, self.chat, self.messages = ctx, req, chat, messages
        self.prefix, self.prompt_len = prefix, prompt_len
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = time.time()
        self._sequence = 0

    def next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def builder(self) -> OutputBuilder:
        return OutputBuilder(chat_processor(self.ctx, self.chat, self.prefix),
                             self.ctx.server_config.reasoning_parser is not None,
                             self.next_sequence)

    def response(self, status: str, output: list[Any], final: RequestOutput | None,
                 incomplete: bool = False, out_tokens: int | None = None) -> ResponseObject:
        """`out_tokens`: the output's length when `final` is a DELTA output (default: the
        length of the cumulative `final`)."""
        req = self.req
        usage = None
        if final is not None:
            if out_tokens is None:
                out_tokens = sum(len(c.token_ids) for c in final.outputs)
            cached = final.metrics.num_cached_tokens if final.metrics else 0
            usage = ResponseUsage(
                input_tokens=self.prompt_len,
                input_tokens_details=InputTokensDetails(cached_tokens=cached),
                output_tokens=out_tokens, output_tokens_details=OutputTokensDetails(),
                total_tokens=self.prompt_len + out_tokens)
        return ResponseObject(
            id=self.id, created_at=self.created, model=self.ctx.model_name, status=status,
            completed_at=time.time() if status in ("completed", "incomplete") else None,
            output=output, instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, temperature=req.temperature,
            top_p=req.top_p, tools=req.tools or [], tool_choice=req.tool_choice or "auto",
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id, metadata=req.metadata,
            user=req.user, usage=usage,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete
            else None)

    def store(self, builder: OutputBuilder, response: ResponseObject) -> None:
        if self.req.store is False:
            return
        content = "".join(i.content[0].text for i in builder.items if isinstance(i, OutputMessage))
        assistant: dict[str, Any] = {"role": "assistant", "content": content or None}
        if builder.calls:
            assistant["tool_calls"] = [
                {"id": c.call_id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for c in builder.calls]
        self.ctx.responses.put(self.id, StoredResponse(
            self.messages + [assistant], response.model_dump(mode="json")))


def _prepare(ctx: ServingContext, req: ResponsesRequest) -> tuple[_Turn, list[int]]:
    check_model(ctx, req.model)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        stored = ctx.responses.get(req.previous_response_id)
        if stored is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not "
                           f"found.", param="previous_response_id",
                           code="previous_response_not_found")
        history = [dict(m) for m in stored.messages]
    messages = history + _input_messages(req)
    chat = _chat_request(req, messages)
    validate_chat_request(ctx, chat)
    prompt, prefix = build_chat_prompt(ctx, chat)
    ids = ctx.tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        raise bad_request("the rendered prompt is empty", param="input")
    return _Turn(ctx, req, chat, messages, prefix, len(ids)), ids


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request) -> Any:
    ctx = get_ctx(request)
    turn, ids = _prepare(ctx, req)
    params = chat_sampling_params(ctx, turn.chat,
                                  resolve_max_tokens(ctx, len(ids), req.max_output_tokens),
                                  bool(req.stream))
    rid = request_id(request, "resp")
    stream = generate(ctx, ids, params, rid, cache_salt=req.cache_salt, priority=req.priority)
    if req.stream:
        first = await first_item(stream)
        return StreamingResponse(_stream(turn, first, stream), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    final = await last_unless_disconnected(request, stream, lambda: ctx.engine.abort(rid))
    if final is None:
        return JSONResponse({}, status_code=499)
    comp = final.outputs[0]
    builder = turn.builder()
    builder.feed(comp.text)
    incomplete = comp.finish_reason == "length"
    builder.finish(incomplete)
    response = turn.response("incomplete" if incomplete else "completed", builder.items, final,
                             incomplete)
    turn.store(builder, response)
    return response.model_dump(mode="json")


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> Any:
    stored = get_ctx(request).responses.get(response_id)
    if stored is None:
        raise APIError(404, f"Response with id '{response_id}' not found.",
                       param="response_id", code="response_not_found")
    return stored.response


def _event(e: Any) -> str:
    body = e.model_dump(mode="json")
    return f"event: {body['type']}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(turn: _Turn, first: RequestOutput, rest: AsyncIterator[RequestOutput]
                  ) -> AsyncIterator[str]:
    builder = turn.builder()
    final = first
    tokens = 0  # the engine sends DELTA outputs: their tokens add up to the usage
    try:
        start = turn.response("in_progress", [], None)
        for kind in ("response.created", "response.in_progress"):
            yield _event(ResponseLifecycleEvent(type=kind, sequence_number=turn.next_sequence(),
                                                response=start))

        async def outputs() -> AsyncIterator[RequestOutput]:
            yield first
            async for out in rest:
                yield out

        async for out in outputs():
            final = out
            tokens += len(out.outputs[0].token_ids)
            for e in builder.feed(out.outputs[0].text):
                yield _event(e)
        incomplete = final.outputs[0].finish_reason == "length"
        for e in builder.finish(incomplete):
            yield _event(e)
        status = "incomplete" if incomplete else "completed"
        response = turn.response(status, builder.items, final, incomplete, tokens)
        turn.store(builder, response)
        yield _event(ResponseLifecycleEvent(type=f"response.{status}", response=response,
                                            sequence_number=turn.next_sequence()))
    except Exception as exc:  # noqa: BLE001 -- headers are sent; report in-band
        err = to_api_error(exc)
        yield _event(ErrorEvent(sequence_number=turn.next_sequence(), message=err.message,
                                code=err.code or err.type, param=err.param))
    finally:
        await rest.aclose()
