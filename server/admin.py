"""Operational endpoints: health, models, info, cache flush, abort, tokenize, metrics."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jaxllm.errors import EngineDeadError

from .errors import APIError, bad_request, error_body
from .openai_chat import messages_for_template
from .protocol_native import AbortRequest
from .protocol_openai import DetokenizeRequest, TokenizeRequest
from .serving import check_model, check_token_ids, get_ctx

router = APIRouter()
_CREATED = int(time.time())


@router.get("/health")
async def health(request: Request) -> Response:
    try:
        await get_ctx(request).engine.check_health()
    except EngineDeadError as e:
        return JSONResponse(error_body(str(e) or "engine is dead", "service_unavailable_error",
                                       None, "engine_dead"), status_code=503)
    return Response(status_code=200)


def _model_card(ctx: Any) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": _CREATED, "owned_by": "jaxllm",
            "root": ctx.engine_config.model or ctx.model_name, "parent": None,
            "max_model_len": ctx.engine.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(get_ctx(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    ctx = get_ctx(request)
    check_model(ctx, model_id)
    return _model_card(ctx)


@router.get("/model_info")
async def model_info(request: Request) -> dict[str, Any]:
    ctx = get_ctx(request)
    mc = ctx.engine.model_config
    return {"model_path": ctx.engine_config.model, "served_model_name": ctx.model_name,
            "max_model_len": ctx.engine.max_model_len, "is_generation": True,
            "model_config": dataclasses.asdict(mc) if dataclasses.is_dataclass(mc) else None}


@router.get("/server_info")
async def server_info(request: Request) -> dict[str, Any]:
    ctx = get_ctx(request)
    stats = ctx.engine.get_stats()
    return {"engine_config": ctx.engine_config.redacted(),
            "server_config": dataclasses.asdict(ctx.server_config),
            "stats": dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else {}}


@router.post("/flush_cache")
async def flush_cache(request: Request) -> dict[str, Any]:
    await get_ctx(request).engine.reset_prefix_cache()
    return {"success": True}


@router.post("/abort_request")
async def abort_request(req: AbortRequest, request: Request) -> dict[str, Any]:
    found = await get_ctx(request).engine.abort(req.rid)
    return {"success": bool(found), "rid": req.rid}


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
    ctx = get_ctx(request)
    check_model(ctx, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        try:
            text = ctx.tokenizer.apply_chat_template(
                messages_for_template(req.messages),
                add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 -- template errors are input errors
            raise bad_request(f"cannot apply the chat template: {e}", param="messages") from e
        ids = ctx.tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.engine.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
    ctx = get_ctx(request)
    check_model(ctx, req.model)
    check_token_ids(ctx, req.tokens)
    return {"prompt": ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ctx = get_ctx(request)
    if not ctx.server_config.enable_metrics:
        raise APIError(404, "metrics are disabled", code="not_found")
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
