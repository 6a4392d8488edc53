"""Operations: /health, /ready, /metrics, /version, /tokenize, /detokenize."""

from __future__ import annotations

from importlib import metadata

import jax
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar import MediaType, Request, Response, get, post

from serving.auth import principal_of
from serving.errors import ERROR_RESPONSES, RequestError
from serving.openai_requests import parse_chat, prompt_token_ids
from serving.schemas import (ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse, StatusResponse,
                             TokenizeRequest, TokenizeResponse, VersionResponse)
from serving.state import ServerState


@get("/health", summary="Liveness: 200 while the process serves (503 once a model failed to load or an "
     "engine has died)")
async def health(server: NamedDependency[ServerState]) -> Response[StatusResponse]:
    if any(model.has_failed for model in server.models.values()):
        return Response(StatusResponse("unhealthy"), status_code=503)
    return Response(StatusResponse("ok"))


@get("/ready", summary="Readiness: 200 once every model is loaded and warmed; 503 while loading, draining, or "
     "once loading failed or an engine stopped")
async def ready(server: NamedDependency[ServerState]) -> Response[StatusResponse]:
    if server.is_ready:
        return Response(StatusResponse("ready"))
    if server.is_draining:
        status = "draining"
    elif server.load_error is not None:
        status = "failed"
    elif any(model.has_failed for model in server.models.values()):  # loaded, but an engine has stopped
        status = "stopped"
    else:
        status = "loading"
    return Response(StatusResponse(status), status_code=503)


@get("/metrics", summary="Prometheus metrics", media_type=MediaType.TEXT)
async def metrics(server: NamedDependency[ServerState]) -> Response[bytes]:
    return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@get("/version", summary="Versions of the server and of JAX, and the JAX backend", responses=ERROR_RESPONSES)
async def version() -> VersionResponse:
    return VersionResponse(version=metadata.version("balansis"), jax=jax.__version__,
                           backend=jax.default_backend())


@post("/tokenize", summary="Token ids of a prompt, or of chat messages through the chat template",
      status_code=200, responses=ERROR_RESPONSES)
async def tokenize(request: Request, data: JSONBody[TokenizeRequest],
                   server: NamedDependency[ServerState]) -> TokenizeResponse:
    model = server.model(data.model, principal=principal_of(request))
    info = model.info
    if (data.prompt is None) == (data.messages is None):
        raise RequestError("give exactly one of prompt and messages", param="prompt")
    if data.messages is not None:
        request = parse_chat(ChatCompletionRequest(messages=data.messages,
                                                   add_generation_prompt=data.add_generation_prompt,
                                                   continue_final_message=data.continue_final_message))
        ids = prompt_token_ids(request, info.tokenizer)[0]
    else:
        add_special = True if data.add_special_tokens is None else data.add_special_tokens
        ids = info.tokenizer.encode(data.prompt, add_special_tokens=add_special)
    return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids)


@post("/detokenize", summary="The text of token ids", status_code=200, responses=ERROR_RESPONSES)
async def detokenize(request: Request, data: JSONBody[DetokenizeRequest],
                     server: NamedDependency[ServerState]) -> DetokenizeResponse:
    info = server.model(data.model, principal=principal_of(request)).info
    if any(not 0 <= t < info.vocab_size for t in data.tokens):
        raise RequestError(f"token ids must be in [0, {info.vocab_size})", param="tokens")
    return DetokenizeResponse(prompt=info.tokenizer.decode(data.tokens, skip_special_tokens=False))
