"""Anthropic's Messages API: POST /v1/messages (whole or streamed) and /v1/messages/count_tokens.

For clients on the official `anthropic` SDK. A Messages body becomes the same checked chat
request as OpenAI's (serving.openai_requests.ParsedRequest: the model's chat template, the
engine's SamplingParams and check) and runs through the same admission, limits, usage and
engine; what differs is the wire: `system` beside the messages, content blocks, `max_tokens`
required, `stop_sequences`, Anthropic's stop reasons, its stream events (message_start,
content_block_start, ping, content_block_delta, content_block_stop, message_delta,
message_stop) and its error bodies (`{"type": "error", "error": {"type", "message"}}`, on
these routes for every error, authentication's included). Text blocks only: tool use, images
and extended thinking are refused with a 400 naming them.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

import msgspec
from litestar import Request, Response, Router, post
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.params import JSONBody
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from engine.outputs import RequestOutput
from serving.errors import RequestError, error_responses, request_error_of
from serving.generation import AdmittedStream, admit, charge, final_outputs, stream_requests, unless_disconnected
from serving.openai_requests import Endpoint, ParsedRequest, prompt_token_ids, sampling_params
from serving.anthropic_schemas import (CountTokensRequest, ErrorBody, ErrorDetail, InputMessage, Message,
                                       MessagesRequest, MessageUsage, TextBlock, TokenCount)
from serving.state import ServedModel, ServerState

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error"}
# Fields the engine cannot honour yet, with the values that ask for nothing.
_UNSUPPORTED = {"tools": (None, []), "tool_choice": (None,), "thinking": (None,), "output_config": (None,),
                "container": (None,)}


@post("/v1/messages", summary="Messages (Anthropic); SSE when stream is true", status_code=200,
      responses=error_responses(ErrorBody))
async def create_message(request: Request, data: JSONBody[MessagesRequest],
                         server: NamedDependency[ServerState]) -> Message | ServerSentEvent:
    parsed = _parsed(data)
    model = server.model_for(request, parsed.model, generate=True)
    engine = model.engine_core
    (prompt,) = await asyncio.to_thread(prompt_token_ids, parsed, engine.info.tokenizer)
    params = server.config.limits.apply(sampling_params(parsed, prompt, engine), num_prompt_tokens=len(prompt),
                                        max_tokens_given=True, prompt_param="messages",
                                        max_tokens_param="max_tokens", logprobs_param="logprobs")
    server.check_precision(request, model, params, param="model")
    message_id = f"msg_{uuid.uuid4().hex}"
    meter = server.meter(model, params=params, is_stream=parsed.stream, num_prompts=1, is_prompt_only=False,
                         prompt=lambda: parsed.messages)
    charged = await charge(request, server.rate_limiter, meter=meter, tokens=len(prompt) + params.max_tokens)
    admission = await admit(model, 1, charged)
    if parsed.stream:
        return AdmittedStream(_events(server, model, message_id, prompt, params, charged), admission=admission,
                              charge=charged)
    try:
        (final,) = await unless_disconnected(
            request, final_outputs(model, server.metrics, message_id, [prompt], [params], charged.meter))
    finally:
        admission.release()
        await charged.settle()
    return _message(final, message_id=message_id, model=model.name)


@post("/v1/messages/count_tokens", summary="Tokens a Messages request's prompt takes (Anthropic)",
      status_code=200, responses=error_responses(ErrorBody))
async def count_tokens(request: Request, data: JSONBody[CountTokensRequest],
                       server: NamedDependency[ServerState]) -> TokenCount:
    _refuse_unsupported(data)
    model = server.model_for(request, data.model, generate=True)
    parsed = _chat(data.model, data.system, data.messages, max_tokens=1, sampling={}, stream=False)
    (prompt,) = await asyncio.to_thread(prompt_token_ids, parsed, model.engine_core.info.tokenizer)
    return TokenCount(input_tokens=len(prompt))


def _error_response(_: Request, exc: Exception) -> Response:
    error = request_error_of(exc)
    kind = _ERROR_TYPES.get(error.status_code, "api_error" if error.status_code >= 500 else "invalid_request_error")
    body = ErrorBody(error=ErrorDetail(type=kind, message=error.message))
    return Response(msgspec.json.encode(body), status_code=error.status_code, media_type=MediaType.JSON,
                    headers=error.headers)


def router(*, guards) -> Router:
    """The Messages routes, behind `guards` (authentication), answering errors in Anthropic's shape."""
    return Router(path="/", guards=guards, route_handlers=[create_message, count_tokens],
                  exception_handlers={Exception: _error_response})


def _parsed(data: MessagesRequest) -> ParsedRequest:
    _refuse_unsupported(data)
    if data.max_tokens < 1:
        raise RequestError("max_tokens: must be at least 1", param="max_tokens")
    sampling: dict[str, Any] = {name: value for name in ("temperature", "top_p", "top_k")
                                if (value := getattr(data, name)) is not None}
    if data.stop_sequences:
        sampling["stop"] = data.stop_sequences
    return _chat(data.model, data.system, data.messages, max_tokens=data.max_tokens, sampling=sampling,
                 stream=bool(data.stream))


def _chat(model: str, system, messages: list[InputMessage], *, max_tokens: int, sampling: dict,
          stream: bool) -> ParsedRequest:
    """The chat request a Messages body stands for: `system` first, then each message's text."""
    if not messages:
        raise RequestError("messages: at least one message is required", param="messages")
    chat = [] if system is None else [{"role": "system", "content": _text(system, "system")}]
    chat += [{"role": m.role, "content": _text(m.content, f"messages.{i}.content")} for i, m in enumerate(messages)]
    return ParsedRequest(endpoint=Endpoint.CHAT, model=model, messages=tuple(chat), prompts=(), sampling=sampling,
                         max_tokens=max_tokens, max_tokens_param="max_tokens", num_logprobs=None, echo=False,
                         stream=stream, include_usage=False)


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    """A string, or the text of a list of text blocks (joined); any other block is a 400."""
    if isinstance(content, str):
        return content
    texts = []
    for i, block in enumerate(content):
        kind = block.get("type")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise RequestError(f"{where}.{i}: content blocks of type {kind!r} are not supported (text only)",
                               param=f"{where}.{i}.type")
        texts.append(block["text"])
    return "\n".join(texts)


def _refuse_unsupported(data: MessagesRequest | CountTokensRequest) -> None:
    for name, neutral in _UNSUPPORTED.items():
        if getattr(data, name, None) not in neutral:
            raise RequestError(f"{name}: not supported by this server yet", param=name)


def _stop(output) -> tuple[str | None, str | None]:
    """Anthropic's stop_reason and stop_sequence for a finished choice."""
    if output.finish_reason == "length":
        return "max_tokens", None
    if isinstance(output.stop_reason, str):
        return "stop_sequence", output.stop_reason
    return "end_turn", None


def _message(final: RequestOutput, *, message_id: str, model: str) -> Message:
    choice = final.outputs[0]
    stop_reason, stop_sequence = _stop(choice)
    return Message(id=message_id, model=model, content=[TextBlock(text=choice.text)], stop_reason=stop_reason,
                   stop_sequence=stop_sequence,
                   usage=MessageUsage(input_tokens=len(final.prompt_ids), output_tokens=len(choice.token_ids)))


async def _events(server: ServerState, model: ServedModel, message_id: str, prompt: list[int], params,
                  charged) -> AsyncIterator[ServerSentEventMessage]:
    """Anthropic's stream: the message's start, one text block's deltas, the stop reason and usage."""
    encode = msgspec.json.encode

    def event(name: str, data: dict) -> ServerSentEventMessage:
        return ServerSentEventMessage(event=name, data=encode({"type": name, **data}).decode())

    start = Message(id=message_id, model=model.name, content=[], stop_reason=None, stop_sequence=None,
                    usage=MessageUsage(input_tokens=len(prompt), output_tokens=0))
    yield event("message_start", {"message": msgspec.to_builtins(start)})
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    yield event("ping", {})
    sent, final = 0, None
    try:
        stream = stream_requests(model, server.metrics, message_id, [prompt], [params], charged.meter)
        try:
            async for _, output in stream:
                final, choice = output, output.outputs[0]
                if len(choice.text) > sent:
                    yield event("content_block_delta", {"index": 0, "delta": {"type": "text_delta",
                                                                             "text": choice.text[sent:]}})
                    sent = len(choice.text)
        finally:
            await stream.aclose()
    except RequestError as e:
        charged.meter.has_failed = True
        error = msgspec.json.decode(_error_response(None, e).content)
        yield ServerSentEventMessage(event="error", data=encode(error).decode())
        return
    choice = final.outputs[0]
    stop_reason, stop_sequence = _stop(choice)
    yield event("content_block_stop", {"index": 0})
    yield event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                  "usage": {"output_tokens": len(choice.token_ids)}})
    yield event("message_stop", {})
