"""OpenAI-shaped error bodies and the exception handlers that map failures to statuses.

Every error leaves as `{"error": {"message", "type", "param", "code"}}` with a real status:
400 bad input (pydantic validation included, never 422), 401 auth, 404 unknown model/route,
413 body too large, 429 overloaded (Retry-After), 503 engine dead, 500 only for bugs.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxllm.errors import EngineDeadError, EngineOverloadedError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the client should see with this status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception raised while serving a request to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        retry = max(1, math.ceil(getattr(exc, "retry_after_s", 1.0)))
        return APIError(429, str(exc) or "server overloaded; retry later",
                        code="overloaded", headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc) or "engine is not running", code="engine_dead")
    if isinstance(exc, ValueError | TypeError | OverflowError):
        # Engine admission / SamplingParams validation: the request is at fault.
        return APIError(400, str(exc) or type(exc).__name__)
    logger.exception("internal error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", type="internal_server_error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type", "json_invalid"}


def _body_is_not_json_object(exc: RequestValidationError) -> bool:
    """The body did not parse as a JSON object (no Content-Type: application/json, bad JSON,
    or a JSON value that is not an object): one clear message instead of field errors."""
    return any(e.get("type") in _NOT_AN_OBJECT and (len(e.get("loc", ())) <= 1
                                                    or e.get("type") == "json_invalid")
               for e in exc.errors())


def _format_validation_errors(exc: RequestValidationError) -> tuple[str, str | None]:
    if _body_is_not_json_object(exc):
        detail = next((e.get("msg") for e in exc.errors() if e.get("type") == "json_invalid"),
                      None)
        return ("Expected a JSON object as the request body, sent with "
                "'Content-Type: application/json'" + (f" ({detail})" if detail else ""), None)
    parts, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (where or None)
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    shown = parts[:4] + ([f"... and {len(parts) - 4} more"] if len(parts) > 4 else [])
    return "; ".join(shown) or "invalid request", param


def install_exception_handlers(app: FastAPI) -> None:
    """Register handlers so that every error path answers with an OpenAI error body."""

    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _format_validation_errors(exc)
        return error_response(APIError(400, message, param=param))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        return error_response(APIError(exc.status_code, str(exc.detail), headers=headers))

    async def on_engine_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(EngineOverloadedError, on_engine_error)
    app.add_exception_handler(EngineDeadError, on_engine_error)
    app.add_exception_handler(ValueError, on_engine_error)
    app.add_exception_handler(Exception, on_engine_error)
