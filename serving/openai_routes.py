"""OpenAI's endpoints: /v1/models (and /v1/models/{id}), /v1/chat/completions, /v1/completions, /v1/embeddings.

A body goes down and comes back up: msgspec decodes it into a Struct
(types, unknown fields) → `serving.openai_requests` checks it as OpenAI
would and turns it into prompt token ids and SamplingParams (the engine's
own check included) → admission (429 when the queue is full) → the engine
→ `serving.openai_responses` builds the response Struct, or
`serving.openai_stream` the server-sent events when `stream` is set; each
is encoded once. The request's `model` picks one of the served models
(ServerState.model).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar import Request, get, post
from litestar.response import ServerSentEvent

from serving.auth import principal_of
from serving.errors import ERROR_RESPONSES, RequestError
from serving.generation import (AdmittedStream, Charge, add_headers, admit, charge, embed_inputs, final_outputs,
                                stream_requests, unless_disconnected)
from serving.openai_embeddings import (check_dimensions, embeddings_response, input_token_ids,
                                       parse_embeddings_request)
from serving.openai_requests import (Endpoint, ParsedRequest, parse_chat, parse_completion, prompt_token_ids,
                                     sampling_params)
from serving.openai_responses import TokenTexts, chat_completion, text_completion
from serving.openai_stream import ChunkWriter
from serving.response_cache import ResponseCache
from serving.schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, EmbeddingList,
                             EmbeddingsRequest, ModelCard, ModelList)
from serving.state import ServedModel, ServerState


@get("/v1/models", summary="The models this server serves", responses=ERROR_RESPONSES)
async def list_models(request: Request, server: NamedDependency[ServerState]) -> ModelList:
    allowed = principal_of(request).models
    return ModelList(object="list", data=[_card(model) for model in server.models.values()
                                          if not allowed or model.name in allowed])


@get("/v1/models/{model_id:str}", summary="One served model", responses=ERROR_RESPONSES)
async def retrieve_model(request: Request, model_id: FromPath[str],
                         server: NamedDependency[ServerState]) -> ModelCard:
    return _card(server.model(model_id, principal=principal_of(request)))


def _card(model: ServedModel) -> ModelCard:
    # `created`: when this server loaded the model.
    return ModelCard(id=model.name, object="model", created=model.created, owned_by="balansis",
                     max_model_len=model.info.max_model_len)


# status_code: Litestar answers a POST with 201 unless told; OpenAI answers 200.
@post("/v1/chat/completions", summary="Chat completion (OpenAI); SSE when stream is true",
      status_code=200, responses=ERROR_RESPONSES)
async def chat_completions(request: Request, data: JSONBody[ChatCompletionRequest],
                           server: NamedDependency[ServerState]) -> ChatCompletion | ServerSentEvent:
    return await _complete(request, server, parse_chat(data), body=data)


@post("/v1/completions", summary="Text completion (OpenAI); SSE when stream is true",
      status_code=200, responses=ERROR_RESPONSES)
async def completions(request: Request, data: JSONBody[CompletionRequest],
                      server: NamedDependency[ServerState]) -> Completion | ServerSentEvent:
    return await _complete(request, server, parse_completion(data), body=data)


@post("/v1/embeddings", summary="Embeddings (OpenAI), from an embedding model or a chat model's hidden states",
      status_code=200, responses=ERROR_RESPONSES)
async def embeddings(request: Request, data: JSONBody[EmbeddingsRequest],
                     server: NamedDependency[ServerState]) -> EmbeddingList:
    parsed = parse_embeddings_request(data)
    model = server.model_for(request, parsed.model, embed=True)
    embedder = model.ready_embedder().embedder
    check_dimensions(parsed, embedder.dimensions)
    # Tokenising many inputs takes a while: off the event loop.
    token_ids = await asyncio.to_thread(input_token_ids, parsed, embedder)
    num_tokens = sum(map(len, token_ids))
    charged = await charge(request, server.rate_limiter, tokens=num_tokens,
                           meter=server.meter(model, prompt=lambda: data.input))
    vectors = await embed_inputs(request, server.metrics, model, token_ids, charged)
    return embeddings_response(vectors, request=parsed, model=model.name, num_prompt_tokens=num_tokens)


async def _complete(http_request: Request, server: ServerState, request: ParsedRequest, *,
                    body: ChatCompletionRequest | CompletionRequest) -> ChatCompletion | Completion | ServerSentEvent:
    model = server.model_for(http_request, request.model, generate=True)
    engine = model.engine_core
    tokenizer = engine.info.tokenizer
    # Tokenising a long prompt (or rendering a chat template) takes a while:
    # off the event loop, so other streams and the probes keep going.
    prompts = await asyncio.to_thread(prompt_token_ids, request, tokenizer)
    logprobs_param = "top_logprobs" if request.endpoint is Endpoint.CHAT else "logprobs"
    params = [server.config.limits.apply(sampling_params(request, ids, engine), num_prompt_tokens=len(ids),
                                         max_tokens_given=request.max_tokens is not None,
                                         prompt_param=request.prompt_param, max_tokens_param=request.max_tokens_param,
                                         logprobs_param=logprobs_param) for ids in prompts]
    server.check_precision(http_request, model, params[0], param="precision")
    prefix = "chatcmpl" if request.endpoint is Endpoint.CHAT else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    token_text = TokenTexts(tokenizer)
    # Echo returns the prompt as sent; token id prompts as their text.
    prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False)
                    for p in request.prompts] if request.echo else [""] * len(prompts)
    num_seqs = sum(p.n for p in params)
    writer = ChunkWriter(request, response_id=response_id, created=created, model=model.name,
                         token_text=token_text, prompt_texts=prompt_texts) if request.stream else None
    # Every token the request may use (each choice may reach max_tokens), reserved before any queue.
    meter = server.meter(model, params=params[0], is_stream=request.stream, num_prompts=len(prompts),
                         is_prompt_only=request.is_prompt_only,
                         prompt=lambda: request.messages if request.endpoint is Endpoint.CHAT else request.prompts)
    charged = await charge(http_request, server.rate_limiter, meter=meter,
                           tokens=sum(len(ids) + p.n * p.max_tokens for ids, p in zip(prompts, params)))
    cache_key = _cache_key(server, model, request, params, meter, body)
    if cache_key is not None:
        cached = await server.response_cache.get(cache_key)
        add_headers(http_request, {"x-balansis-cache": "miss" if cached is None else "hit"})
        if cached is not None:
            return await _from_cache(cached, request, charged, response_id=response_id, created=created)
    admission = await admit(model, num_seqs, charged)  # a 429 now, before the 200 of a stream
    if writer is not None:  # the stream releases the admission and settles the charge when it ends
        return AdmittedStream(_events(server, model, request, writer, response_id, prompts, params, charged),
                              admission=admission, charge=charged)
    try:
        finals = await unless_disconnected(
            http_request, final_outputs(model, server.metrics, response_id, prompts, params, charged.meter))
    finally:
        admission.release()
        await charged.settle()
    if request.endpoint is Endpoint.CHAT:
        response = chat_completion(finals[0], request=request, response_id=response_id, created=created,
                                   model=model.name, token_text=token_text)
    else:
        response = text_completion(finals, request=request, prompt_texts=prompt_texts, response_id=response_id,
                                   created=created, model=model.name, token_text=token_text)
    if cache_key is not None:
        await server.response_cache.put(cache_key, msgspec.json.encode(response))
    return response


def _cache_key(server: ServerState, model: ServedModel, request: ParsedRequest, params, meter,
               body: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The response cache's key for a request whose response would come out the same again (not
    streamed; every choice greedy or seeded), else None (serving.response_cache)."""
    if server.response_cache is None or request.stream or not all(p.is_greedy or p.seed is not None
                                                                   for p in params):
        return None
    return ResponseCache.key(model=model.name, loaded_at=model.created, route=request.endpoint.value,
                             precision=meter.precision, body=body)


async def _from_cache(cached: bytes, request: ParsedRequest, charged: Charge, *, response_id: str,
                      created: int) -> ChatCompletion | Completion:
    """A stored response under a fresh id; it costs its caller a request and no tokens."""
    kind = ChatCompletion if request.endpoint is Endpoint.CHAT else Completion
    response = msgspec.structs.replace(msgspec.json.decode(cached, type=kind), id=response_id, created=created)
    usage = response.usage
    charged.meter.from_cache(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                             finish_reason=response.choices[0].finish_reason if response.choices else None)
    await charged.settle(is_free=True)
    return response


async def _events(server: ServerState, model: ServedModel, request: ParsedRequest, writer: ChunkWriter,
                  response_id: str, prompts, params, charged: Charge) -> AsyncIterator[str]:
    """The SSE data lines of a streamed request, ending in [DONE].

    An error after the stream started cannot change the status code any
    more; it goes out as an error event (OpenAI's error body), then [DONE].
    """
    finals = [None] * len(prompts)
    encode = msgspec.json.encode
    try:
        stream = stream_requests(model, server.metrics, response_id, prompts, params, charged.meter)
        try:
            async for index, output in stream:
                finals[index] = output
                for chunk in writer.chunks(index, output):
                    yield encode(chunk).decode()
        finally:
            await stream.aclose()
        if request.include_usage:
            yield encode(writer.usage_chunk(finals)).decode()
    except RequestError as e:
        charged.meter.has_failed = True
        yield encode(e.body()).decode()
    yield "[DONE]"
