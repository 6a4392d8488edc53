"""OpenAI chat and completions bodies (decoded Structs) → prompt token ids and SamplingParams.

Shared by the server and `balansis run-batch`. One request goes:

    request = parse_chat(body)        # or parse_completion(body): the Struct checked as OpenAI would
    prompts = prompt_token_ids(request, engine.info.tokenizer)   # chat template for messages
    params = sampling_params(request, prompts[0], engine)        # defaults that depend on the prompt,
                                                                 # then the engine's own check
    ... the engine runs it; serving.openai_responses builds the answer ...

msgspec has checked the types and refused unknown fields already
(serving.schemas); what is left here are the rules across fields. Every
problem is a `RequestError` naming the parameter, like OpenAI's 400s.
Fields that would change the output and are not implemented (tools,
response_format, …) are errors, never ignored; fields that change nothing
here (user, metadata, store, …) are accepted. Besides OpenAI's fields,
vLLM's sampling extras are accepted (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens`, `include_stop_str_in_output`), and ours: `precision`
(`standard`, `high` or `ultra`; the server's default when absent).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import msgspec

from engine.outputs import RequestRejected
from engine.sampling import SamplingParams
from serving.errors import RequestError, rejected
from serving.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

if TYPE_CHECKING:
    from checkpoints.tokenizer import Tokenizer
    from engine.llm_engine import LLMEngine

# OpenAI's legacy completions default; chat defaults to what fits, at most this.
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 4096


class Endpoint(enum.Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class ParsedRequest:
    """A checked chat or completions body; what is left to resolve depends on the prompt."""

    endpoint: Endpoint
    model: str | None  # as asked; responses carry the served model's name
    messages: tuple[Mapping[str, str], ...] | None  # chat
    prompts: tuple[str | tuple[int, ...], ...]  # completions: text or token ids, one or more
    sampling: Mapping[str, Any]  # SamplingParams keywords taken from the body as given
    max_tokens: int | None  # None: the endpoint's default
    max_tokens_param: str  # the body field it came from, for error messages
    num_logprobs: int | None  # alternatives per token when logprobs are asked for
    echo: bool  # completions: the prompt goes in front of the text
    stream: bool
    include_usage: bool  # stream_options.include_usage
    add_generation_prompt: bool = True  # chat: open an assistant turn after the messages
    continue_final_message: bool = False  # chat: extend the last message instead

    @property
    def is_prompt_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated."""
        return self.echo and self.max_tokens == 0

    @property
    def prompt_param(self) -> str:
        return "messages" if self.endpoint is Endpoint.CHAT else "prompt"


# Body fields passed to SamplingParams under their own name: every field the two share
# but the ones resolved here (max_tokens against the context, logit_bias's string keys).
_SAMPLING_FIELDS = tuple(
    name for name in SamplingFields.__struct_fields__
    if name in {f.name for f in dataclasses.fields(SamplingParams)} and name not in ("max_tokens", "logit_bias"))
# Fields of either body, for naming the parameter behind a SamplingParams error.
_BODY_FIELDS = frozenset(ChatCompletionRequest.__struct_fields__) | frozenset(CompletionRequest.__struct_fields__)
# Known fields we do not implement, with the values that ask for nothing.
CHAT_UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,)}
COMPLETION_UNSUPPORTED: dict[str, tuple] = {"suffix": (None, ""), "best_of": (None,)}
ROLES = {"system", "developer", "user", "assistant"}
MESSAGE_FIELDS = ("role", "content", "name")  # the rest of ChatMessage (tool calls, …) is refused


def parse_chat(body: ChatCompletionRequest) -> ParsedRequest:
    """Check a chat body; raises RequestError naming the first problem."""
    _refuse_unsupported(body, CHAT_UNSUPPORTED)
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(getattr(body, max_tokens_param), max_tokens_param, least=1)
    messages = _messages(body.messages)
    if body.logprobs:
        num_logprobs = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise RequestError("top_logprobs needs logprobs to be true", param="top_logprobs")
    else:
        num_logprobs = None
    add_generation_prompt = body.add_generation_prompt is not False
    continue_final_message = bool(body.continue_final_message)
    if continue_final_message and body.add_generation_prompt:
        raise RequestError("continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")
    return ParsedRequest(
        endpoint=Endpoint.CHAT, model=body.model, messages=messages, prompts=(), sampling=_sampling(body),
        max_tokens=max_tokens, max_tokens_param=max_tokens_param, num_logprobs=num_logprobs, echo=False,
        stream=bool(body.stream), include_usage=_include_usage(body),
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message)


def parse_completion(body: CompletionRequest) -> ParsedRequest:
    """Check a completions body; raises RequestError naming the first problem."""
    if body.best_of is not None and body.best_of == (body.n or 1):
        body = msgspec.structs.replace(body, best_of=None)  # best_of == n picks every choice: nothing to do
    _refuse_unsupported(body, COMPLETION_UNSUPPORTED)
    echo = bool(body.echo)
    max_tokens = _max_tokens(body.max_tokens, "max_tokens", least=0 if echo else 1)  # echo with 0: prompt only
    return ParsedRequest(
        endpoint=Endpoint.COMPLETIONS, model=body.model, messages=None,
        prompts=text_or_token_inputs(body.prompt, param="prompt"), sampling=_sampling(body),
        max_tokens=max_tokens, max_tokens_param="max_tokens", num_logprobs=body.logprobs, echo=echo,
        stream=bool(body.stream), include_usage=_include_usage(body))


def prompt_token_ids(request: ParsedRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each prompt: the chat template applied to the messages, or the prompts encoded."""
    if request.messages is None:
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in request.prompts]
    try:
        return [tokenizer.encode_chat(request.messages, add_generation_prompt=request.add_generation_prompt,
                                      continue_final_message=request.continue_final_message)]
    except Exception as e:  # a template may raise anything (jinja errors, a missing template)
        raise RequestError(f"cannot apply the chat template: {e}", param="messages") from None


def sampling_params(request: ParsedRequest, prompt_ids: Sequence[int], engine: LLMEngine) -> SamplingParams:
    """The request's SamplingParams for this prompt, checked by the engine (LLMEngine.check_request).

    An unset max_tokens is 16 for completions (OpenAI's) and, for chat, what
    the context has room for, at most DEFAULT_CHAT_MAX_TOKENS.
    """
    max_tokens = request.max_tokens
    if max_tokens is None:
        default = DEFAULT_CHAT_MAX_TOKENS if request.endpoint is Endpoint.CHAT else DEFAULT_COMPLETION_MAX_TOKENS
        # At least 1: a prompt that fills the context is the engine check's to refuse.
        max_tokens = max(1, min(default, engine.info.max_model_len - len(prompt_ids)))
    elif request.is_prompt_only:
        max_tokens = 1  # the engine generates at least one token; responses drop it
    wants_prompt_logprobs = request.echo and request.num_logprobs is not None
    try:
        params = SamplingParams(**request.sampling, max_tokens=max_tokens, logprobs=request.num_logprobs,
                                prompt_logprobs=request.num_logprobs if wants_prompt_logprobs else None)
    except (TypeError, ValueError) as e:
        field = str(e).split(" ", 1)[0]
        param = {"max_tokens": request.max_tokens_param, "prompt_logprobs": "logprobs",
                 "logprobs": "top_logprobs" if request.endpoint is Endpoint.CHAT else "logprobs"}.get(field, field)
        raise RequestError(str(e), param=param if param in _BODY_FIELDS else None) from None
    try:
        engine.check_request(list(prompt_ids), params, max_tokens_name=request.max_tokens_param)
    except RequestRejected as e:
        raise rejected(e, prompt_param=request.prompt_param, max_tokens_param=request.max_tokens_param) from None
    return params


def text_or_token_inputs(value, *, param: str) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's four input forms (completions' `prompt`, embeddings' `input`): a string,
    a list of strings, a list of token ids, or a list of token id lists; never empty."""
    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return (value,)
    if is_ids(value):
        return (tuple(value),)
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return tuple(value)
    if isinstance(value, list) and value and all(is_ids(p) for p in value):
        return tuple(tuple(p) for p in value)
    raise RequestError(f"{param} must be a string, a list of strings, a list of token ids or a list of "
                       "token id lists", param=param,
                       code="missing_required_parameter" if value is None else "invalid_value")


# -- body parts -------------------------------------------------------------------


def _refuse_unsupported(body: SamplingFields, unsupported: Mapping[str, tuple]) -> None:
    for name, neutral in unsupported.items():
        if getattr(body, name) not in neutral:
            raise RequestError(f"{name} is not supported", param=name, code="unsupported_parameter")


def _sampling(body: SamplingFields) -> dict[str, Any]:
    sampling = {name: value for name in _SAMPLING_FIELDS if (value := getattr(body, name)) is not None}
    if sampling.get("top_k") in (0, -1):
        del sampling["top_k"]  # vLLM's spelling of "no top-k"
    if body.logit_bias is not None:
        sampling["logit_bias"] = _logit_bias(body.logit_bias)
    return sampling


def _max_tokens(value: int | None, param: str, *, least: int) -> int | None:
    if value is not None and value < least:
        raise RequestError(f"{param} must be an integer of at least {least}, got {value!r}", param=param)
    return value


def _include_usage(body: SamplingFields) -> bool:
    if body.stream_options is not None and not body.stream:
        # OpenAI's answer too: options of a stream that is not there are a mistake.
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    return bool(body.stream_options and body.stream_options.include_usage)


def _logit_bias(value: Mapping[str, float]) -> dict[int, float]:
    # JSON object keys are strings: OpenAI sends {"50256": -100}.
    bias = {}
    for key, v in value.items():
        try:
            token_id = int(key)
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        bias[token_id] = v
    return bias


def _messages(value: list[ChatMessage] | None) -> tuple[dict[str, str], ...]:
    if not value:
        raise RequestError("messages must be a non-empty list", param="messages",
                           code="missing_required_parameter" if value is None else "invalid_value")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise RequestError(f"{where}.role must be one of {sorted(ROLES)}, got {m.role!r}", param=f"{where}.role")
        for key in m.__struct_fields__:
            if key not in MESSAGE_FIELDS and getattr(m, key) is not None:
                raise RequestError(f"{where}.{key} is not supported", param=f"{where}.{key}",
                                   code="unsupported_parameter")
        message = {"role": "system" if m.role == "developer" else m.role,
                   "content": _content(m.content, f"{where}.content")}
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    return tuple(messages)


def _content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if part.type != "text" or part.text is None:
                raise RequestError(f"{where}: only text parts are supported", param=where,
                                   code="unsupported_parameter")
            texts.append(part.text)
        return "\n".join(texts)  # vLLM joins text parts the same way
    raise RequestError(f"{where} must be a string or a list of text parts", param=where)
