"""Errors as OpenAI writes them: `{"error": {"message", "type", "param", "code"}}`.

Every failure leaves through one of these handlers, so a client sees the
same body shape whatever went wrong: our own checks (`RequestError`), the
engine's refusals (`RequestRejected`, mapped by `rejected`), the body
decoder's (a body msgspec cannot decode is a 400, never a 422: `body_error`,
shared with `balansis run-batch`, which decodes its lines' bodies with
`decode_body`), Litestar's own (an oversized body a 413, an unknown route a
404), and anything unexpected (a 500 that keeps the server up).
"""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec

from engine.outputs import RejectedField, RequestRejected
from serving.schemas import ErrorResponse

log = logging.getLogger("balansis.serving")
T = TypeVar("T")

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
_CODES = {400: "invalid_value", 401: "invalid_api_key", 403: "permission_denied", 404: "not_found",
          405: "method_not_allowed", 413: "request_too_large", 429: "rate_limit_exceeded", 503: "service_unavailable"}
# msgspec names the offending field like "... - at `$.messages[0].role`".
_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_MISSING_FIELD = re.compile(r"missing required field `([^`]*)`")


class RequestError(Exception):
    """A request we cannot serve, as OpenAI reports it: a message, the parameter at fault, a
    code, the status, and response headers (Retry-After on a 429). `error_type` overrides the type the
    status implies, as OpenAI's rate limits do ("requests", "tokens", "insufficient_quota")."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status_code: int = 400, headers: dict[str, str] | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status_code = message, param, status_code
        self.code = code or _CODES.get(status_code, "error")
        self.headers = headers or {}
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        """OpenAI's error response body, {"error": {"message", "type", "param", "code"}}."""
        if self.error_type is not None:
            kind = self.error_type
        elif self.status_code >= 500 and self.status_code != 503:
            kind = "server_error"
        else:
            kind = _TYPES.get(self.status_code, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def rejected(error: RequestRejected, *, prompt_param: str, max_tokens_param: str = "max_tokens") -> RequestError:
    """The 400 for a request the engine (or an embedder) refused, naming the caller's parameter."""
    param = {RejectedField.PROMPT: prompt_param, RejectedField.MAX_TOKENS: max_tokens_param}.get(
        error.field, error.field.value)
    return RequestError(str(error), param=param,
                        code="context_length_exceeded" if error.is_context_length else "invalid_value")


def body_error(message: str, param: str | None = None) -> RequestError:
    """The 400 for a body the msgspec decoder refused, worded as OpenAI words it.

    `message` is msgspec's ("... - at `$.path`"); `param` the field the caller
    knows to be at fault when the message names none.
    """
    match = _MSGSPEC_PATH.search(message)
    if match is not None:
        message, param = _MSGSPEC_PATH.sub("", message), match.group(1) or param
    if param in ("", "data"):  # "data": Litestar's name for the whole body
        param = None
    unknown, missing = _UNKNOWN_FIELD.search(message), _MISSING_FIELD.search(message)
    if unknown is not None:
        field = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
        return RequestError(f"unrecognized request argument supplied: {field}", param=field,
                            code="unknown_parameter")
    if missing is not None:
        field = f"{param}.{missing.group(1)}" if param else missing.group(1)
        return RequestError(f"missing required parameter: {field}", param=field, code="missing_required_parameter")
    return RequestError(message if param is None else f"{message} (at {param})", param=param)


def decode_body(body: Any, body_type: type[T]) -> T:
    """A JSON-decoded body as `body_type`, checked as the server checks bodies: msgspec's lax
    mode (numeric strings become numbers, as Litestar and vLLM's pydantic allow)."""
    try:
        return msgspec.convert(body, body_type, strict=False, str_keys=True)
    except msgspec.ValidationError as e:
        raise body_error(str(e)) from None


def error_response(error: RequestError) -> Response:
    return Response(error.body(), status_code=error.status_code, media_type=MediaType.JSON, headers=error.headers)


def _request_error(_: Request, exc: RequestError) -> Response:
    return error_response(exc)


def _http_exception(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, ValidationException) or status in (400, 422):
        return error_response(_validation_error(exc))
    message = exc.detail
    if status == 413:
        message = "the request body is too large"
    elif status == 404:
        message = f"no such route: {exc.detail}" if exc.detail and exc.detail != "Not Found" else "no such route"
    return error_response(RequestError(message, status_code=status, headers=exc.headers))


def _validation_error(exc: HTTPException) -> RequestError:
    """The 400 for Litestar's ValidationException: the decoder's message and the field it names.

    Litestar decodes bodies in msgspec's lax mode (numeric strings become
    numbers), as pydantic does for vLLM; what still fails is reported here.
    """
    items = [item for item in exc.extra if isinstance(item, dict)] if isinstance(exc.extra, list) else []
    message = items[0].get("message", "") if items else str(exc.detail)
    if "malformed" in message.lower() or "truncated" in message.lower():
        return RequestError(f"the request body is not valid JSON: {message}")
    param = items[0].get("key") if items else None
    if items and message == repr(param):  # Litestar's KeyError: the parameter is absent
        if items[0].get("source") == "body":
            return RequestError("the request body is empty; send a JSON object")
        return RequestError(f"missing parameter: {param}", param=param)
    return body_error(message, param)


def _too_deep(_: Request, exc: RecursionError) -> Response:
    """JSON nested past the decoder's recursion limit (`[[[[…]]]]` a thousand deep): a bad body."""
    return error_response(RequestError("the request body is nested too deeply to decode"))


def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(RequestError(f"internal error: {type(exc).__name__}", status_code=500,
                                       code="internal_error"))


# The error statuses API routes answer with, for the OpenAPI docs (Litestar
# would otherwise document its own validation body).
ERROR_RESPONSES = {status: ResponseSpec(data_container=ErrorResponse, description=description)
                   for status, description in (
    (400, "Invalid request: a value, a field, the body, or the context length"),
    (401, "Missing, wrong, expired or revoked API key (when authentication is on)"),
    (403, "The key may not use this model, or this route needs an admin key"),
    (404, "Unknown model"),
    (413, "Request body too large"),
    (429, "Queue full; see Retry-After"),
    (503, "Model loading, engine stopped, or shutting down"))}

EXCEPTION_HANDLERS = {RequestError: _request_error, HTTPException: _http_exception, RecursionError: _too_deep,
                      Exception: _unexpected}
