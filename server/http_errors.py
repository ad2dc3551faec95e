"""Every error as the contract's HTTP answer, in one place:

    status code + {"error": {"message": str, "type": str, "code": str | null}}

(OpenAI-compatible routes under /v1 also get "param", as OpenAI clients expect.) Error types
(`fsrl.errors`, `server.errors`) know nothing of HTTP: `HTTP_ERRORS` maps each to its status,
type, code and headers, the nearest class in the exception's MRO winning. HTTP exceptions,
validation errors, malformed JSON and unknown routes are mapped here too; anything unexpected
is logged and answered with a 500 in the same shape, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from fsrl.errors import ConflictError, CorruptFileError, ForbiddenError, FsrlError, MismatchError, NotFoundError
from server.errors import EngineStopped, GenerationFailed, InvalidField, ModelNotFound, Overloaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str | None
    headers: dict[str, str] = field(default_factory=dict)


INVALID = "invalid_request_error"
HTTP_ERRORS: dict[type[FsrlError], HttpError] = {
    FsrlError: HttpError(400, INVALID, "invalid_request"),
    MismatchError: HttpError(400, INVALID, "mismatch"),
    CorruptFileError: HttpError(400, INVALID, "corrupt_file"),
    ForbiddenError: HttpError(403, "permission_error", "forbidden"),
    NotFoundError: HttpError(404, "not_found_error", "not_found"),
    ModelNotFound: HttpError(404, "not_found_error", "model_not_found"),
    ConflictError: HttpError(409, "conflict_error", "conflict"),
    InvalidField: HttpError(422, INVALID, "invalid_value"),
    GenerationFailed: HttpError(500, "server_error", "generation_failed"),
    Overloaded: HttpError(503, "overloaded_error", "overloaded", {"Retry-After": "1"}),
    EngineStopped: HttpError(503, "overloaded_error", "engine_stopped", {"Retry-After": "30"}),
}


def http_error(exc: FsrlError) -> HttpError:
    """The answer for this error: its own class's, else its nearest parent's."""
    return next(HTTP_ERRORS[cls] for cls in type(exc).__mro__ if cls in HTTP_ERRORS)


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413 (pure ASGI): at once when the
    Content-Length says so; a body sent without one (chunked) is read here, up to the limit,
    and handed on whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope, receive, send) -> None:
        message = f"the request body is over this server's limit of {self.max_bytes} bytes"
        openai = scope.get("path", "").startswith("/v1/")
        response = JSONResponse(error_body(message, "invalid_request_error", "too_large", None, openai),
                                status_code=413)
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            item = await receive()
            if item["type"] != "http.request":  # the client left
                return
            chunks.append(item.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = item.get("more_body", False)
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict:
            nonlocal whole
            if whole is not None:
                item, whole = whole, None
                return item
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)


# Status -> error type for errors that carry only a status (HTTPException, routing).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error",
          503: "overloaded_error"}
_CODES = {403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "too_large", 503: "overloaded"}


def error_body(message: str, type_: str, code: str | None, param: str | None = None,
               openai: bool = False) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if openai:
        error["param"] = param
    return {"error": error}


def _respond(request: Request, status: int, message: str, type_: str, code: str | None,
             param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    openai = request.url.path.startswith("/v1/")
    return JSONResponse(error_body(message, type_, code, param, openai), status_code=status,
                        headers=headers)


def _field_name(loc: Sequence[Any]) -> str:
    """('body', 'features', 0, 'op') -> 'features[0].op'."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return name or "body"


def describe_validation(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str]:
    """pydantic errors -> (message naming the fields, first field, code)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        where = first["loc"][-1] if len(first["loc"]) > 1 else "?"
        why = (first.get("ctx") or {}).get("error", "JSON decode error")
        return f"body: malformed JSON at character {where} ({why})", "body", "invalid_json"
    parts = []
    for e in errors[:4]:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{_field_name(e.get('loc', ()))}: {msg}")
    if len(errors) > 4:
        parts.append(f"and {len(errors) - 4} more")
    return "; ".join(parts), _field_name(first.get("loc", ())), "validation_error"


async def _fsrl_error(request: Request, exc: FsrlError) -> JSONResponse:
    answer = http_error(exc)
    if answer.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc)
    return _respond(request, answer.status, str(exc), answer.type, answer.code,
                    getattr(exc, "field", None), answer.headers or None)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    if status == 400 and message == "There was an error parsing the body":  # FastAPI's words
        # As pydantic's malformed JSON: 422 invalid_json.
        return _respond(request, 422, "body: not valid JSON (not UTF-8, or nested too deep)",
                        "invalid_request_error", "invalid_json", "body")
    return _respond(request, status, message,
                    _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                    _CODES.get(status), headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param, code = describe_validation(exc.errors())
    return _respond(request, 422, message, "invalid_request_error", code, param)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # One line here; the server's own logger records the traceback. The client gets neither.
    log.error("500 on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return _respond(request, 500, "internal server error", "server_error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FsrlError, _fsrl_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


def error_event(exc: BaseException, openai: bool = False) -> dict[str, Any]:
    """The error shape for a failure after a stream has started (the status is already sent)."""
    if isinstance(exc, FsrlError):
        answer = http_error(exc)
        return error_body(str(exc), answer.type, answer.code, getattr(exc, "field", None), openai)
    return error_body("internal server error", "server_error", "internal_error", None, openai)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None = None  # /v1 routes only (OpenAI's shape)


class ErrorResponse(BaseModel):
    """Every error, on every route: `{"error": {"message", "type", "code"}}`."""

    error: ErrorDetail


# Documented on every route, so the OpenAPI schema describes the errors clients really get
# (it replaces FastAPI's default 422 body, which this server never sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in {
        400: "Bad adapter files", 401: "Missing or wrong API key", 403: "Forbidden",
        404: "Not found", 409: "Conflict", 413: "Request too large",
        422: "Invalid request (names the field)", 500: "Internal error",
        503: "Overloaded (see Retry-After)"}.items()}

# What /generate and /v1 answer with `stream: true`.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or with `stream: true` server-sent events ending in `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
