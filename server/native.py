"""POST /generate: the native SGLang-shaped endpoint (single or batched input)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxllm.outputs import CompletionOutput, PositionLogprobs, RequestOutput

from .errors import bad_request, to_api_error
from .logprobs_format import finite_logprob, top_entries
from .protocol_native import GenerateRequest, NativeSamplingParams
from .serving import (
    ServingContext,
    build_sampling_params,
    check_token_ids,
    generate,
    get_ctx,
    normalize_stop,
    output_kind,
    resolve_max_tokens,
)
from .streaming import SSE_DONE, SSE_HEADERS, merge_streams, run_unless_disconnected, sse

router = APIRouter()


def _inputs(ctx: ServingContext, req: GenerateRequest) -> tuple[list[list[int]], bool]:
    """Token ids per item and whether the input was batched."""
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text or input_ids", param="text")
    if req.text is not None:
        batched = isinstance(req.text, list)
        texts = req.text if batched else [req.text]
        ids = [ctx.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    else:
        assert req.input_ids is not None
        batched = len(req.input_ids) > 0 and isinstance(req.input_ids[0], list)
        ids = [list(x) for x in req.input_ids] if batched else [list(req.input_ids)]  # type: ignore[arg-type]
        for x in ids:
            check_token_ids(ctx, x)
    if not ids or any(not x for x in ids):
        raise bad_request("every input needs at least one token", param="text")
    return ids, batched


def _per_item(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise bad_request(f"{name} has {len(value)} entries for {count} inputs", param=name)
        return value
    return [value] * count


def _params(ctx: ServingContext, req: GenerateRequest, sp: NativeSamplingParams,
            prompt_len: int) -> Any:
    if req.top_logprobs_num > ctx.server_config.max_logprobs:
        raise bad_request(f"top_logprobs_num must be <= {ctx.server_config.max_logprobs}",
                          param="top_logprobs_num")
    if sp.n > ctx.server_config.max_n:
        raise bad_request(f"n must be <= {ctx.server_config.max_n}", param="sampling_params.n")
    max_tokens = resolve_max_tokens(ctx, prompt_len, sp.max_new_tokens)
    want_lp = req.return_logprob
    return build_sampling_params(
        n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
        max_tokens=max_tokens, min_tokens=sp.min_new_tokens, stop=normalize_stop(sp.stop),
        stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos,
        presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty, seed=sp.seed,
        logprobs=req.top_logprobs_num if want_lp else None,
        prompt_logprobs=(req.top_logprobs_num if want_lp and req.logprob_start_len >= 0
                         else None),
        skip_special_tokens=sp.skip_special_tokens, include_stop_str_in_output=sp.no_stop_trim,
        output_kind=output_kind(req.stream, cumulative=True),  # its events are cumulative
        structured_outputs=_structured(sp))


def _structured(sp: NativeSamplingParams) -> dict[str, Any] | None:
    """SGLang's json_schema / regex / ebnf as a structured_outputs spec (at most one)."""
    given = {k: v for k, v in (("json", sp.json_schema), ("regex", sp.regex),
                               ("grammar", sp.ebnf)) if v is not None}
    if len(given) > 1:
        raise bad_request("set at most one of json_schema, regex, ebnf",
                          param="sampling_params")
    return given or None


def _finish_reason(comp: CompletionOutput) -> dict[str, Any] | None:
    if comp.finish_reason is None:
        return None
    if comp.finish_reason == "length":
        return {"type": "length", "length": len(comp.token_ids)}
    if comp.finish_reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": "stop", "matched": comp.stop_reason}


def _lp_triples(ctx: ServingContext, ids: list[int], positions: list[PositionLogprobs | None],
                top_k: int, with_text: bool) -> tuple[list[Any], list[Any]]:
    def triple(tid: int, lp: Any) -> list[Any]:
        text = ctx.tokenizer.decode([tid], skip_special_tokens=False) if with_text else None
        return [None if lp is None else finite_logprob(lp), tid, text]

    chosen, tops = [], []
    for tid, pos in zip(ids, positions, strict=False):
        entry = pos.get(tid) if pos else None
        chosen.append(triple(tid, entry.logprob if entry else None))
        tops.append([triple(i, lp.logprob) for i, lp in top_entries(pos, top_k)] if pos else None)
    return chosen, tops


def _result(ctx: ServingContext, req: GenerateRequest, out: RequestOutput,
            comp: CompletionOutput, rid: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid, "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(comp.token_ids), "finish_reason": _finish_reason(comp),
        "cached_tokens": out.metrics.num_cached_tokens if out.metrics else 0,
    }
    if req.return_logprob and comp.logprobs is not None:
        chosen, tops = _lp_triples(ctx, comp.token_ids, comp.logprobs, req.top_logprobs_num,
                                   req.return_text_in_logprobs)
        meta["output_token_logprobs"] = chosen
        meta["output_top_logprobs"] = tops
    if req.return_logprob and out.prompt_logprobs is not None:
        start = max(req.logprob_start_len, 0)
        chosen, tops = _lp_triples(ctx, out.prompt_token_ids[start:],
                                   list(out.prompt_logprobs)[start:], req.top_logprobs_num,
                                   req.return_text_in_logprobs)
        meta["input_token_logprobs"] = chosen
        meta["input_top_logprobs"] = tops
    # comp.text never ends in a possible stop-string start: the engine holds that back
    return {"text": comp.text, "output_ids": list(comp.token_ids), "meta_info": meta}


@router.post("/generate")
async def native_generate(req: GenerateRequest, request: Request) -> Any:
    ctx = get_ctx(request)
    ids, batched = _inputs(ctx, req)
    sps = _per_item(req.sampling_params or NativeSamplingParams(), len(ids), "sampling_params")
    rids = _per_item(req.rid, len(ids), "rid")
    if not isinstance(req.rid, list) and req.rid is not None and len(ids) > 1:
        rids = [f"{req.rid}-{i}" for i in range(len(ids))]
    rids = [r or uuid.uuid4().hex for r in rids]
    params = [_params(ctx, req, sp, len(x)) for sp, x in zip(sps, ids, strict=True)]
    streams = [generate(ctx, x, p, r, cache_salt=req.cache_salt, priority=req.priority)
               for x, p, r in zip(ids, params, rids, strict=True)]
    multi = batched or any(p.n > 1 for p in params)

    if req.stream:
        merged = merge_streams(streams)
        try:
            first = await anext(merged)
        except BaseException:
            await merged.aclose()
            raise
        return StreamingResponse(_stream(ctx, req, first, merged, rids, params, multi),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def collect() -> list[RequestOutput | None]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, out in merge_streams(streams):
            finals[i] = out
        return finals

    async def abort_all() -> None:
        for r in rids:
            await ctx.engine.abort(r)

    finals = await run_unless_disconnected(request, collect, abort_all)
    if finals is None:
        return JSONResponse({}, status_code=499)
    results = []
    for i, out in enumerate(finals):
        assert out is not None
        for comp in out.outputs:
            results.append(_result(ctx, req, out, comp, rids[i]))
    return results if multi else results[0]


async def _stream(ctx: ServingContext, req: GenerateRequest, first: tuple[int, RequestOutput],
                  merged: AsyncIterator[tuple[int, RequestOutput]], rids: list[str],
                  params: list[Any], multi: bool) -> AsyncIterator[str]:
    """Each event is a cumulative result (SGLang style); batched items carry `index`."""
    offsets = [0]
    for p in params[:-1]:
        offsets.append(offsets[-1] + p.n)
    try:
        item = first
        while True:
            i, out = item
            for comp in out.outputs:
                body = _result(ctx, req, out, comp, rids[i])
                if multi:
                    body["index"] = offsets[i] + comp.index
                yield sse(body)
            try:
                item = await anext(merged)
            except StopAsyncIteration:
                break
    except Exception as exc:  # noqa: BLE001 -- headers are sent; report in-band
        yield sse(to_api_error(exc).body())
    finally:
        await merged.aclose()
    yield SSE_DONE
