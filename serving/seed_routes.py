"""The seed API (the original BalansisLLM design), kept as thin adapters over the engine.

- POST /api/v1/generate: {prompt, max_length, temperature, top_p,
  act_precision} → {generated_text, tokens_generated, inference_time,
  act_stability_score}. The prompt is raw text (no chat template);
  max_length counts generated tokens.
- POST /api/v1/chat: {messages, model, stream, …} → the assistant's
  message; with stream, SSE events `{"delta": …}` then one final event with
  the whole response.
- POST /api/v1/embeddings: {input (a string or strings), model,
  act_normalization (default true: unit vectors), truncate} → {model,
  embeddings, dimensions, tokens, inference_time}.
- GET /models: the served models, their kind and precision levels.

`act_precision` picks the numerics level (standard, high, ultra; default:
the server's `--precision`) for generation; embeddings are computed at
standard for now (other levels get a 400). `act_stability_score` is the
fraction of generated tokens whose decision margin beat twice the LM
head's rounding bound (engine.sampler.decision_stability).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar import Request, get, post
from litestar.response import ServerSentEvent

from engine.outputs import CompletionOutput, RequestOutput, RequestRejected
from engine.sampling import SamplingParams
from serving.auth import principal_of
from serving.errors import ERROR_RESPONSES, RequestError, rejected
from serving.generation import (AdmittedStream, Charge, admit, charge, embed_inputs, final_outputs, stream_requests,
                                unless_disconnected)
from serving.openai_embeddings import input_token_ids, parse_embeddings_request
from serving.openai_requests import parse_chat, prompt_token_ids
from serving.schemas import (AssistantMessage, ChatCompletionRequest, EmbeddingsRequest, SeedChatDelta,
                             SeedChatRequest, SeedChatResponse, SeedEmbeddingsRequest, SeedEmbeddingsResponse,
                             SeedGenerateRequest, SeedGenerateResponse, SeedModel, SeedModelList)
from serving.state import ServedModel, ServerState

_DEFAULT_CHAT_MAX_LENGTH = 512


@get("/models", summary="Seed API: the served models", responses=ERROR_RESPONSES)
async def seed_models(request: Request, server: NamedDependency[ServerState]) -> SeedModelList:
    principal = principal_of(request)
    levels = [level for level in server.config.allowed_precisions
              if not principal.precisions or level in principal.precisions]
    return SeedModelList(models=[
        SeedModel(name=model.name, type="chat" if model.can_generate else "embedding",
                  max_model_len=model.info.max_model_len, precision_levels=levels)
        for model in server.models.values() if not principal.models or model.name in principal.models])


@post("/api/v1/generate", summary="Seed API: continue a raw-text prompt",
      status_code=200, responses=ERROR_RESPONSES)
async def seed_generate(request: Request, data: JSONBody[SeedGenerateRequest],
                        server: NamedDependency[ServerState]) -> SeedGenerateResponse:
    model = server.model_for(request, None, generate=True)
    prompt_ids = await asyncio.to_thread(model.info.tokenizer.encode, data.prompt)  # off the event loop
    params = _params(server, model, data, prompt_ids, data.max_length, prompt_param="prompt")
    server.check_precision(request, model, params, param="act_precision")
    output = await _generate(request, server, model, prompt_ids, params, prompt=lambda: data.prompt)
    choice = output.outputs[0]
    return SeedGenerateResponse(generated_text=choice.text, tokens_generated=len(choice.token_ids),
                                inference_time=round(time.time() - output.arrival_time, 6),
                                act_stability_score=_score(choice))


@post("/api/v1/chat", summary="Seed API: chat; SSE when stream is true",
      status_code=200, responses=ERROR_RESPONSES)
async def seed_chat(request: Request, data: JSONBody[SeedChatRequest],
                    server: NamedDependency[ServerState]) -> SeedChatResponse | ServerSentEvent:
    model = server.model_for(request, data.model, generate=True)
    info = model.info
    parsed = parse_chat(ChatCompletionRequest(messages=data.messages))
    prompt_ids = (await asyncio.to_thread(prompt_token_ids, parsed, info.tokenizer))[0]
    # Unset: what the context has room for, at most 512 (at least 1: a prompt that fills
    # the context is the engine check's to refuse).
    max_length = data.max_length
    if max_length is None:
        max_length = max(1, min(_DEFAULT_CHAT_MAX_LENGTH, info.max_model_len - len(prompt_ids)))
    params = _params(server, model, data, prompt_ids, max_length, prompt_param="messages")
    server.check_precision(request, model, params, param="act_precision")
    if data.stream:
        meter = server.meter(model, params=params, is_stream=True, prompt=lambda: data.messages)
        charged = await charge(request, server.rate_limiter, tokens=len(prompt_ids) + params.max_tokens,
                               meter=meter)
        admission = await admit(model, 1, charged)  # now, not when the body starts: see ServedModel.admit
        return AdmittedStream(_chat_events(server, model, prompt_ids, params, charged), admission=admission,
                              charge=charged)
    output = await _generate(request, server, model, prompt_ids, params, prompt=lambda: data.messages)
    return _chat_response(model, output)


@post("/api/v1/embeddings", summary="Seed API: embeddings, unit-length unless act_normalization is false",
      status_code=200, responses=ERROR_RESPONSES)
async def seed_embeddings(request: Request, data: JSONBody[SeedEmbeddingsRequest],
                          server: NamedDependency[ServerState]) -> SeedEmbeddingsResponse:
    started = time.time()
    if data.act_precision not in (None, "standard"):
        raise RequestError("embeddings are computed at the standard precision level for now",
                           param="act_precision", code="unsupported_parameter")
    parsed = parse_embeddings_request(EmbeddingsRequest(
        input=data.input, model=data.model, truncate_prompt_tokens=-1 if data.truncate else None))
    model = server.model_for(request, parsed.model, embed=True)
    embedder = model.ready_embedder().embedder
    token_ids = await asyncio.to_thread(input_token_ids, parsed, embedder)
    charged = await charge(request, server.rate_limiter, tokens=sum(map(len, token_ids)),
                           meter=server.meter(model, prompt=lambda: data.input))
    vectors = await embed_inputs(request, server.metrics, model, token_ids, charged,
                                 normalize=data.act_normalization)
    return SeedEmbeddingsResponse(model=model.name, embeddings=vectors.tolist(), dimensions=embedder.dimensions,
                                  tokens=sum(map(len, token_ids)),
                                  inference_time=round(time.time() - started, 6))


def _params(server: ServerState, model: ServedModel, data: SeedGenerateRequest | SeedChatRequest,
            prompt_ids: list[int], max_length: int, *, prompt_param: str) -> SamplingParams:
    """The request's SamplingParams, checked by the engine (LLMEngine.check_request)."""
    try:
        params = SamplingParams(max_tokens=max_length, temperature=data.temperature, top_p=data.top_p,
                                precision=data.act_precision)
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        param = {"max_tokens": "max_length", "precision": "act_precision"}.get(field, field)
        raise RequestError(f"{param} {rest}", param=param) from None  # the seed API's own names
    try:
        model.engine_core.check_request(prompt_ids, params, max_tokens_name="max_length")
    except RequestRejected as e:
        raise rejected(e, prompt_param=prompt_param, max_tokens_param="max_length") from None
    return server.config.limits.apply(params, num_prompt_tokens=len(prompt_ids),
                                      max_tokens_given=data.max_length is not None, prompt_param=prompt_param,
                                      max_tokens_param="max_length")


async def _generate(request: Request, server: ServerState, model: ServedModel, prompt_ids: list[int],
                    params: SamplingParams, *, prompt) -> RequestOutput:
    charged = await charge(request, server.rate_limiter, tokens=len(prompt_ids) + params.max_tokens,
                           meter=server.meter(model, params=params, prompt=prompt))
    admission = await admit(model, 1, charged)
    try:
        finals = await unless_disconnected(request, final_outputs(
            model, server.metrics, f"seed-{uuid.uuid4().hex}", [prompt_ids], [params], charged.meter))
    finally:
        admission.release()
        await charged.settle()
    return finals[0]


def _chat_response(model: ServedModel, output: RequestOutput) -> SeedChatResponse:
    choice = output.outputs[0]
    return SeedChatResponse(model=model.name,
                            message=AssistantMessage(role="assistant", content=choice.text),
                            tokens_generated=len(choice.token_ids),
                            inference_time=round(time.time() - output.arrival_time, 6),
                            act_stability_score=_score(choice), finish_reason=choice.finish_reason)


def _score(choice: CompletionOutput) -> float | None:
    """The seed API's act_stability_score: the choice's stability score (engine.outputs.Stability)."""
    return None if choice.stability is None else choice.stability.score


async def _chat_events(server: ServerState, model: ServedModel, prompt_ids: list[int],
                       params: SamplingParams, charged: Charge) -> AsyncIterator[str]:
    sent = 0
    try:
        stream = stream_requests(model, server.metrics, f"seed-{uuid.uuid4().hex}", [prompt_ids], [params],
                                 charged.meter)
        try:
            async for _, output in stream:
                text = output.outputs[0].text
                if len(text) > sent:
                    yield msgspec.json.encode(SeedChatDelta(delta=text[sent:])).decode()
                    sent = len(text)
                if output.finished:
                    yield msgspec.json.encode(_chat_response(model, output)).decode()
        finally:
            await stream.aclose()
    except RequestError as e:
        charged.meter.has_failed = True
        yield msgspec.json.encode(e.body()).decode()
    yield "[DONE]"
