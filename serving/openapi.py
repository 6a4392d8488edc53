"""The OpenAPI document made exact: what it says is what the server does.

Litestar derives the document from the handlers' signatures and the msgspec
Structs; `finish` completes it where the types cannot say enough, from the
same tables the request parser uses (serving.openai_requests), so a client
generator or a fuzzer can trust it:

- request bodies: unknown fields refused (`additionalProperties: false`),
  chat roles and content parts as the parser takes them, the four prompt
  and input forms, the precision levels, and each unsupported OpenAI field
  as the only values that ask for nothing (an `enum` of them);
- streamed routes answer 200 with `application/json` or, with `stream`,
  `text/event-stream`;
- every response carries `x-request-id`; every 429 `Retry-After` and
  `retry-after-ms`; responses of authenticated routes may carry the
  rate-limit headers (serving.rate_limits);
- with authentication on, a bearer scheme, required by every route but the
  open ones (health, ready, metrics).

`FinishedJson` serves the finished document at /docs/openapi.json.
"""

from __future__ import annotations

import copy
from typing import Any

from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from serving.api_keys import PRECISION_LEVELS
from serving.openai_requests import CHAT_UNSUPPORTED, COMPLETION_UNSUPPORTED, MESSAGE_FIELDS, ROLES

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
STREAMED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/api/v1/chat"})
_REQUEST_SCHEMAS = ("ChatCompletionRequest", "CompletionRequest", "ChatMessage", "ContentPart", "StreamOptions",
                    "EmbeddingsRequest", "TokenizeRequest", "DetokenizeRequest", "SeedGenerateRequest",
                    "SeedChatRequest", "SeedEmbeddingsRequest", "CreateKeyRequest")
_NULL = {"type": "null"}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# OpenAI's four input forms (serving.openai_requests.text_or_token_inputs).
_TEXT_OR_TOKENS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                             _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]}


def _header(description: str, *, required: bool = False) -> dict:
    return {"description": description, "required": required, "schema": {"type": "string"}}


_REQUEST_ID = _header("The request's id: the client's X-Request-ID when it is sane, else a fresh one",
                      required=True)
_RETRY = {"Retry-After": _header("Whole seconds until the request would be accepted"),
          "retry-after-ms": _header("Milliseconds until the request would be accepted"),
          "x-should-retry": _header("false when retrying cannot help (a spent daily quota, a request too large)")}
_RATE_LIMITS = {f"x-ratelimit-{part}-{kind}": _header(f"{what} of the caller's {kind} limit (keys and users with "
                                                      f"limits only)")
                for kind in ("requests", "tokens", "tokens-day")
                for part, what in (("limit", "The size"), ("remaining", "What is left"),
                                   ("reset", "Until full again (a duration such as 6m0s)"))}


def finish(document: dict[str, Any], *, is_auth_on: bool) -> dict[str, Any]:
    """A copy of Litestar's document, completed as the module docstring says."""
    doc = copy.deepcopy(document)
    schemas = doc.get("components", {}).get("schemas", {})
    _requests(schemas)
    if is_auth_on:
        doc.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key (sk-…), a static --api-key, or a JWT"}}
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            is_open = path in OPEN_PATHS
            if is_auth_on and not is_open:
                operation["security"] = [{"bearer": []}]
            for status, response in operation["responses"].items():
                headers = response.setdefault("headers", {})
                headers["x-request-id"] = _REQUEST_ID
                if status == "429":
                    headers.update(_RETRY)
                if not is_open:
                    headers.update(_RATE_LIMITS)
            if path in STREAMED_PATHS:
                _streamed(operation["responses"]["200"])
            if path in ("/v1/chat/completions", "/v1/completions"):
                operation["responses"]["200"]["headers"]["x-balansis-cache"] = _header(
                    "hit or miss, for a request the response cache (--response-cache) may answer")
            if path in ("/health", "/ready"):
                ok = operation["responses"]["200"]
                operation["responses"]["503"] = {**ok, "description": "Unhealthy, or not ready (the body says why)"}
    return doc


def _streamed(response: dict) -> None:
    """200: the JSON object, or with `stream` its server-sent events (each `data:` line one chunk, then
    `data: [DONE]`)."""
    content = response["content"]
    schema = content["application/json"]["schema"]
    alternatives = [s for s in schema.get("oneOf", [schema]) if s]  # Litestar adds {} for the SSE branch
    content["application/json"]["schema"] = alternatives[0]
    # Before OpenAPI 3.2 the schema of an event stream describes one event (as schemathesis reads it).
    content["text/event-stream"] = {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": (
            "with stream: true, one chunk as JSON (an error body if the request fails after the stream has "
            "started), then the last event's [DONE]")},
            "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}


def _requests(schemas: dict) -> None:
    for name in _REQUEST_SCHEMAS:
        if name in schemas:
            schemas[name]["additionalProperties"] = False  # unknown fields are a 400
    if "ChatMessage" in schemas:
        message = schemas["ChatMessage"]["properties"]
        message["role"] = {"type": "string", "enum": sorted(ROLES)}
        for field in list(message):
            if field not in MESSAGE_FIELDS:
                message[field] = _NULL  # tool calls and the like: not supported yet
    if "ContentPart" in schemas:
        part = schemas["ContentPart"]
        part["properties"] = {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}
        part["required"] = ["type", "text"]
    for name, unsupported in (("ChatCompletionRequest", CHAT_UNSUPPORTED),
                              ("CompletionRequest", COMPLETION_UNSUPPORTED)):
        if name not in schemas:
            continue
        properties = schemas[name]["properties"]
        for field, neutral in unsupported.items():
            if field != "best_of":  # best_of equal to n is taken (it changes nothing)
                properties[field] = {"enum": list(neutral)}
        properties["precision"] = {"oneOf": [{"type": "string", "enum": list(PRECISION_LEVELS)}, _NULL]}
    if "ChatCompletionRequest" in schemas:
        schemas["ChatCompletionRequest"]["properties"]["messages"] = {
            "type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1}
        schemas["ChatCompletionRequest"]["required"] = ["messages"]
    if "CompletionRequest" in schemas:
        schemas["CompletionRequest"]["properties"]["prompt"] = _TEXT_OR_TOKENS
        schemas["CompletionRequest"]["required"] = ["prompt"]
    if "EmbeddingsRequest" in schemas:
        schemas["EmbeddingsRequest"]["properties"]["input"] = _TEXT_OR_TOKENS


class FinishedJson(JsonRenderPlugin):
    """/docs/openapi.json: the finished document (made once)."""

    def __init__(self, *, is_auth_on: bool):
        super().__init__()
        self._is_auth_on = is_auth_on
        self._finished: dict | None = None

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        if self._finished is None:
            self._finished = finish(openapi_schema, is_auth_on=self._is_auth_on)
        return super().render(request, self._finished)
