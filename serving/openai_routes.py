"""OpenAI's endpoints: /v1/models (and /v1/models/{id}), /v1/chat/completions, /v1/completions, /v1/embeddings.

A body goes: msgspec decodes it into a Struct (types, unknown fields) →
`engine.openai_format` checks it as OpenAI would and turns it into prompt
token ids and SamplingParams → admission (429 when the queue is full) →
the engine → a response Struct, or server-sent events when `stream` is set.
The request's `model` picks one of the served models (ServerState.model).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

import msgspec
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar import Request, get, post
from litestar.response import ServerSentEvent

from engine.openai_embeddings import (check_dimensions, embeddings_response, input_token_ids,
                                      parse_embeddings_request)
from engine.openai_format import (Endpoint, ParsedRequest, TokenTexts, chat_completion, parse_request,
                                  prompt_token_ids, sampling_params, text_completion)
from serving.errors import ERROR_RESPONSES, RequestError, error_body
from serving.generation import (SSE_HEADERS, check_engine_accepts, embed_inputs, final_outputs,
                                stream_requests, unless_disconnected)
from serving.openai_stream import ChunkWriter
from serving.schemas import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion,
                             CompletionRequest, EmbeddingList, EmbeddingsRequest, ModelCard, ModelList)
from serving.state import Admission, ServedModel, ServerState

# The content type is set here because Litestar prefers the handler's media type
# (JSON, from the return annotation) to the one ServerSentEvent carries.


@get("/v1/models", summary="The models this server serves", responses=ERROR_RESPONSES)
async def list_models(server: NamedDependency[ServerState]) -> ModelList:
    return ModelList(object="list", data=[_card(model) for model in server.models.values()])


@get("/v1/models/{model_id:str}", summary="One served model", responses=ERROR_RESPONSES)
async def retrieve_model(model_id: FromPath[str], server: NamedDependency[ServerState]) -> ModelCard:
    return _card(server.model(model_id))


def _card(model: ServedModel) -> ModelCard:
    # `created`: when this server loaded the model.
    return ModelCard(id=model.name, object="model", created=model.created, owned_by="balansis",
                     max_model_len=model.max_model_len)


# status_code: Litestar answers a POST with 201 unless told; OpenAI answers 200.
@post("/v1/chat/completions", summary="Chat completion (OpenAI); SSE when stream is true",
      status_code=200, responses=ERROR_RESPONSES)
async def chat_completions(request: Request, data: JSONBody[ChatCompletionRequest],
                           server: NamedDependency[ServerState]) -> ChatCompletion | ServerSentEvent:
    return await _complete(request, server, Endpoint.CHAT, data)


@post("/v1/completions", summary="Text completion (OpenAI); SSE when stream is true",
      status_code=200, responses=ERROR_RESPONSES)
async def completions(request: Request, data: JSONBody[CompletionRequest],
                      server: NamedDependency[ServerState]) -> Completion | ServerSentEvent:
    return await _complete(request, server, Endpoint.COMPLETIONS, data)


@post("/v1/embeddings", summary="Embeddings (OpenAI), from an embedding model or a chat model's hidden states",
      status_code=200, responses=ERROR_RESPONSES)
async def embeddings(request: Request, data: JSONBody[EmbeddingsRequest],
                     server: NamedDependency[ServerState]) -> EmbeddingList:
    parsed = parse_embeddings_request(msgspec.to_builtins(data))
    model = server.model(parsed.model, embed=True)
    embedder = model.ready_embedder().embedder
    check_dimensions(parsed, embedder.dimensions)
    # Tokenising many inputs takes a while: off the event loop.
    token_ids = await asyncio.to_thread(input_token_ids, parsed, embedder)
    vectors = await embed_inputs(request, server.metrics, model, token_ids)
    body = embeddings_response(vectors, request=parsed, model=model.name,
                               num_prompt_tokens=sum(map(len, token_ids)))
    return msgspec.convert(body, EmbeddingList)


async def _complete(http_request: Request, server: ServerState, endpoint: Endpoint,
                    data: msgspec.Struct) -> Any:
    request = parse_request(endpoint, msgspec.to_builtins(data))
    model = server.model(request.model, generate=True)
    core = model.engine_core
    vocab_size = core.loaded.config.vocab_size
    # Tokenising a long prompt (or rendering a chat template) takes a while:
    # off the event loop, so other streams and the probes keep going.
    prompts = await asyncio.to_thread(prompt_token_ids, request, core.tokenizer, vocab_size=vocab_size)
    params = [sampling_params(request, num_prompt_tokens=len(ids), max_model_len=core.max_model_len,
                              vocab_size=vocab_size) for ids in prompts]
    check_engine_accepts(core, prompts, params, param=request.prompt_param)
    prefix = "chatcmpl" if endpoint is Endpoint.CHAT else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    token_text = TokenTexts(core.tokenizer)
    # Echo returns the prompt as sent; token id prompts as their text.
    prompt_texts = [p if isinstance(p, str) else core.tokenizer.decode(p, skip_special_tokens=False)
                    for p in request.prompts] if request.echo else [""] * len(prompts)
    num_seqs = sum(p.n for p in params)
    if request.stream:
        admission = model.admit(num_seqs)  # a 429 now, before the 200 of the stream; released by it
        writer = ChunkWriter(request, response_id=response_id, created=created, model=model.name,
                             token_text=token_text, prompt_texts=prompt_texts)
        events = _events(server, model, request, writer, response_id, prompts, params, admission)
        return ServerSentEvent(events, headers=SSE_HEADERS)
    with model.admitted(num_seqs):
        finals = await unless_disconnected(
            http_request, final_outputs(model, server.metrics, response_id, prompts, params))
    if endpoint is Endpoint.CHAT:
        body = chat_completion(finals[0], request=request, response_id=response_id, created=created,
                               model=model.name, token_text=token_text)
        return msgspec.convert(body, ChatCompletion)
    body = text_completion(finals, request=request, prompt_texts=prompt_texts, response_id=response_id,
                           created=created, model=model.name, token_text=token_text)
    return msgspec.convert(body, Completion)


async def _events(server: ServerState, model: ServedModel, request: ParsedRequest, writer: ChunkWriter,
                  response_id: str, prompts, params, admission: Admission) -> AsyncIterator[str]:
    """The SSE data lines of a streamed request, ending in [DONE].

    An error after the stream started cannot change the status code any
    more; it goes out as an error event (OpenAI's error body), then [DONE].
    """
    chunk_type = ChatCompletionChunk if request.endpoint is Endpoint.CHAT else Completion
    finals = [None] * len(prompts)
    try:
        with admission:
            stream = stream_requests(model, server.metrics, response_id, prompts, params)
            try:
                async for index, output in stream:
                    finals[index] = output
                    for chunk in writer.chunks(index, output):
                        yield _encode(chunk, chunk_type)
            finally:
                await stream.aclose()
        if request.include_usage:
            yield _encode(writer.usage_chunk(finals), chunk_type)
    except RequestError as e:
        yield msgspec.json.encode(error_body(e.message, status_code=e.status_code, code=e.code,
                                             param=e.param)).decode()
    yield "[DONE]"


def _encode(chunk: dict, chunk_type: type) -> str:
    return msgspec.json.encode(msgspec.convert(chunk, chunk_type)).decode()
