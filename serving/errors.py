"""Errors as OpenAI writes them: `{"error": {"message", "type", "param", "code"}}`.

Every failure leaves through one of these handlers, so a client sees the
same body shape whatever went wrong: our own checks (`RequestError`, from
engine.openai_format, and `ApiError` here), Litestar's (a body msgspec
cannot decode is a 400, never a 422; an oversized body a 413; an unknown
route a 404), and anything unexpected (a 500 that keeps the server up).
"""

from __future__ import annotations

import logging
import re

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec

from engine.openai_format import RequestError
from serving.schemas import ErrorResponse

log = logging.getLogger("balansis.serving")

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}
_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
          429: "rate_limit_exceeded", 503: "service_unavailable"}
# msgspec names the offending field like "... - at `$.messages[0].role`".
_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_MISSING_FIELD = re.compile(r"missing required field `([^`]*)`")


class ApiError(RequestError):
    """A RequestError that may carry response headers (Retry-After on a 429)."""

    def __init__(self, message: str, *, status_code: int, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, param=param, code=code or _CODES.get(status_code, "error"),
                         status_code=status_code)
        self.headers = headers or {}


def error_body(message: str, *, status_code: int, code: str | None, param: str | None = None) -> dict:
    if status_code >= 500 and status_code != 503:
        kind = "server_error"
    else:
        kind = _TYPES.get(status_code, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: RequestError) -> Response:
    body = error_body(error.message, status_code=error.status_code, code=error.code, param=error.param)
    return Response(body, status_code=error.status_code, media_type=MediaType.JSON,
                    headers=getattr(error, "headers", None))


def _request_error(_: Request, exc: RequestError) -> Response:
    return error_response(exc)


def _http_exception(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    message, param, code = exc.detail, None, _CODES.get(status, "error")
    if isinstance(exc, ValidationException) or status in (400, 422):
        status, code = 400, "invalid_value"
        message, param = _validation_message(exc)
        unknown, missing = _UNKNOWN_FIELD.search(message), _MISSING_FIELD.search(message)
        if unknown is not None:  # worded as OpenAI words it
            field = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
            message, param, code = f"unrecognized request argument supplied: {field}", field, "unknown_parameter"
        elif missing is not None:
            field = f"{param}.{missing.group(1)}" if param else missing.group(1)
            message, param, code = f"missing required parameter: {field}", field, "missing_required_parameter"
    elif status == 413:
        message = "the request body is too large"
    elif status == 404:
        message = f"no such route: {exc.detail}" if exc.detail and exc.detail != "Not Found" else "no such route"
    return error_response(ApiError(message, status_code=status, code=code, param=param,
                                   headers=exc.headers))


def _validation_message(exc: HTTPException) -> tuple[str, str | None]:
    """The decoder's message and the field it names, from Litestar's ValidationException.

    Litestar decodes bodies in msgspec's lax mode (numeric strings become
    numbers), as pydantic does for vLLM; what still fails is reported here.
    """
    items = [item for item in exc.extra if isinstance(item, dict)] if isinstance(exc.extra, list) else []
    message = items[0].get("message", "") if items else str(exc.detail)
    if "malformed" in message.lower() or "truncated" in message.lower():
        return f"the request body is not valid JSON: {message}", None
    param = items[0].get("key") if items else None
    if items and message == repr(param):  # Litestar's KeyError: the parameter is absent
        if items[0].get("source") == "body":
            return "the request body is empty; send a JSON object", None
        return f"missing parameter: {param}", param
    match = _MSGSPEC_PATH.search(message)
    if match is not None:
        message, param = _MSGSPEC_PATH.sub("", message), match.group(1) or param
    if param in (None, "", "data"):
        return message, None
    return f"{message} (at {param})", param


def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(ApiError(f"internal error: {type(exc).__name__}", status_code=500,
                                   code="internal_error"))


# The error statuses API routes answer with, for the OpenAPI docs (Litestar
# would otherwise document its own validation body).
ERROR_RESPONSES = {status: ResponseSpec(data_container=ErrorResponse, description=description)
                   for status, description in (
    (400, "Invalid request: a value, a field, the body, or the context length"),
    (401, "Missing or wrong API key (when the server has keys)"),
    (404, "Unknown model"),
    (413, "Request body too large"),
    (429, "Queue full; see Retry-After"),
    (503, "Model loading, engine stopped, or shutting down"))}

EXCEPTION_HANDLERS = {RequestError: _request_error, HTTPException: _http_exception, Exception: _unexpected}
