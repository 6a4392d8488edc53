"""msgspec Structs for every request and response body of the server.

Request bodies forbid unknown fields (OpenAI answers an unknown argument
with a 400, and so do we) and declare the OpenAI fields we do not implement
(`tools`, `response_format`, …) so that `serving.openai_requests` can refuse
them by name instead of dropping them. Values are typed here; the rules
that cross fields (max_tokens against the context, logprobs ranges, …)
live in `serving.openai_requests` (completions and chat) and
`serving.openai_embeddings`. The server and `balansis run-batch` decode
bodies into these same Structs (serving.errors.decode_body).

Response Structs mirror OpenAI's objects field for field; `null` fields are
written, as OpenAI writes them. Responses and stream chunks are built as
these Structs and encoded once.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    """A request body: unknown fields are a 400."""


# -- requests: OpenAI -----------------------------------------------------------------


class ContentPart(_Body):
    type: str
    text: str | None = None
    image_url: Any = None  # refused: text only
    input_audio: Any = None
    file: Any = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # Refused when set (serving.openai_requests): no tool calling yet.
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class SamplingFields(_Body):
    """Fields of both endpoints; the ones after `user` are vLLM's extras."""

    model: str | None = None
    max_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    top_k: int | None = None
    precision: str | None = None  # ours: standard, high or ultra (model.numerics.Precision)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    parallel_tool_calls: bool | None = None
    # Refused unless they ask for nothing (serving.openai_requests).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None
    verbosity: str | None = None


class CompletionRequest(SamplingFields):
    # A string, a list of strings, a list of token ids or a list of them; msgspec
    # takes one list type in a union, so serving.openai_requests checks the items.
    prompt: str | list[Any] | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None  # refused unless empty
    best_of: int | None = None  # refused unless equal to n


class EmbeddingsRequest(_Body):
    """OpenAI's embeddings request; `serving.openai_embeddings` checks `input`'s four forms."""

    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: cut over-long inputs (-1: at the model's maximum)


class TokenizeRequest(_Body):
    """`prompt` for text, or `messages` for a chat rendered with the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None


class DetokenizeRequest(_Body):
    tokens: list[int]
    model: str | None = None


# -- requests: the seed API -----------------------------------------------------------


class SeedGenerateRequest(_Body):
    prompt: str
    max_length: int = 100  # tokens to generate
    temperature: float = 0.7
    top_p: float = 0.9
    act_precision: str | None = None  # None: the server's default level


class SeedChatRequest(_Body):
    messages: list[ChatMessage]
    model: str | None = None
    stream: bool = False
    max_length: int | None = None
    temperature: float = 0.7
    top_p: float = 0.9
    act_precision: str | None = None  # None: the server's default level


class SeedEmbeddingsRequest(_Body):
    input: str | list[str]
    model: str | None = None
    act_normalization: bool = True  # unit-length vectors; false: the pooled vectors as they are
    truncate: bool = False  # cut over-long inputs at the model's maximum instead of refusing them
    act_precision: str | None = None  # None: the server's default level


# -- responses: OpenAI ----------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class Stability(msgspec.Struct):
    """Ours: the fraction of a choice's tokens whose decision margin beat twice the LM head's
    rounding bound, and the index of the first that did not (null: none)."""

    score: float
    first_fragile_token: int | None


class ChatChoice(msgspec.Struct, omit_defaults=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stability: Stability | None = None  # an extension field; absent before any token


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, omit_defaults=True):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stability: Stability | None = None  # on the chunk that finishes the choice


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    # Present (null until the last chunk) only with stream_options.include_usage.
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, omit_defaults=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stability: Stability | None = None  # an extension field, as on chat choices


class Completion(msgspec.Struct, omit_defaults=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    # Absent from stream chunks unless stream_options.include_usage asks for it.
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelCard]


class Embedding(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# -- responses: operations and the seed API -------------------------------------------


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class VersionResponse(msgspec.Struct):
    version: str
    jax: str
    backend: str


class StatusResponse(msgspec.Struct):
    status: str


class SeedGenerateResponse(msgspec.Struct):
    generated_text: str
    tokens_generated: int
    inference_time: float  # seconds, arrival to last token
    act_stability_score: float | None  # see Stability; null only without a generated token


class SeedChatResponse(msgspec.Struct):
    model: str
    message: AssistantMessage
    tokens_generated: int
    inference_time: float
    act_stability_score: float | None
    finish_reason: str | None


class SeedChatDelta(msgspec.Struct):
    """One event of a streamed seed chat; the last event is a SeedChatResponse."""

    delta: str


class SeedEmbeddingsResponse(msgspec.Struct):
    model: str
    embeddings: list[list[float]]
    dimensions: int
    tokens: int  # tokens of all inputs
    inference_time: float  # seconds, arrival to response


class SeedModel(msgspec.Struct):
    name: str
    type: Literal["chat", "embedding"]  # chat models embed too
    max_model_len: int
    precision_levels: list[str]


class SeedModelList(msgspec.Struct):
    models: list[SeedModel]


# -- the admin API (/admin/keys) -------------------------------------------------------------------

class CreateKeyRequest(_Body):
    name: str
    user_id: str | None = None  # default: the name
    role: Literal["admin", "user"] = "user"
    tier: Literal["free", "pro", "enterprise"] = "free"
    models: list[str] = msgspec.field(default_factory=list)  # empty: every model
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    max_parallel: int | None = None
    # Precision levels it may ask for; empty: every level the server allows.
    precisions: list[Literal["standard", "high", "ultra"]] = msgspec.field(default_factory=list)
    expires_in: str | None = None  # a duration: 30d, 12h, 90m, 45s


class KeyRecord(msgspec.Struct):
    prefix: str
    name: str
    user_id: str
    role: str
    tier: str
    models: list[str]
    rpm: int | None
    tpm: int | None
    tokens_per_day: int | None
    max_parallel: int | None
    precisions: list[str]
    created_at: float  # seconds since the epoch
    expires_at: float | None
    revoked_at: float | None


class CreatedKey(msgspec.Struct):
    key: str  # the plaintext, shown this once
    record: KeyRecord


class KeyList(msgspec.Struct):
    object: Literal["list"]
    data: list[KeyRecord]


class UsageTotals(msgspec.Struct):
    """Requests by status, and tokens, of the usage records a query matched."""

    requests: int
    ok: int
    error: int
    aborted: int
    rejected: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageDay(UsageTotals):
    date: str  # a UTC day, 2026-12-05


class UsageReport(msgspec.Struct):
    object: Literal["usage"]
    since: float | None  # the query's bounds, seconds since the epoch (None: unbounded)
    until: float | None
    totals: UsageTotals
    days: list[UsageDay]  # oldest first; days without requests are left out


class Quantiles(msgspec.Struct):
    """Milliseconds; None without a sample."""

    p50: float | None
    p90: float | None
    p99: float | None


class ModelStats(msgspec.Struct):
    model: str
    state: Literal["loading", "loaded", "failed"]
    requests: int  # since the report's `since`, from the usage records
    ok: int
    error: int
    aborted: int
    rejected: int
    tokens: int  # prompt and completion
    e2e_ms: Quantiles  # request to response end, of the requests that finished ok
    ttft_ms: Quantiles
    num_running: int | None  # now, from the engine (None: an embedding model, or still loading)
    num_waiting: int | None
    kv_cache_usage: float | None  # 0 to 1


class StatsReport(msgspec.Struct):
    object: Literal["stats"]
    since: float
    models: list[ModelStats]
