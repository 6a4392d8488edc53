"""Anthropic's Messages API on the wire: request and response bodies (msgspec Structs).

Only what `serving.anthropic_routes` serves: text blocks in and out. Blocks of other types
(images, documents, tool_use, tool_result) decode as mappings so the route can refuse them by
name with a 400, rather than the decoder with a riddle.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from serving.schemas import _Body


class InputMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Body):
    model: str
    max_tokens: int
    messages: list[InputMessage]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    # Sampling: today's SDK no longer offers these (send them in extra_body); older clients do.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = None
    # Accepted and without effect here: prefix caching is automatic, and there is one tier and place.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: Any = None
    inference_geo: str | None = None
    speed: str | None = None
    diagnostics: Any = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    # Refused unless empty (serving.anthropic_routes): no tool use, extended thinking, output
    # formats or code containers yet.
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None
    output_config: Any = None
    container: Any = None


class CountTokensRequest(_Body):
    model: str
    messages: list[InputMessage]
    system: str | list[dict[str, Any]] | None = None
    cache_control: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None
    output_config: Any = None


class TextBlock(msgspec.Struct):
    text: str
    type: Literal["text"] = "text"


class MessageUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int


class Message(msgspec.Struct):
    id: str
    model: str
    content: list[TextBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence"] | None
    stop_sequence: str | None
    usage: MessageUsage
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"


class TokenCount(msgspec.Struct):
    input_tokens: int


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class ErrorBody(msgspec.Struct):
    error: ErrorDetail
    type: Literal["error"] = "error"
