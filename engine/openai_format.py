"""OpenAI request bodies → engine requests; engine outputs → OpenAI response objects.

Shared by `balansis run-batch` and the server. One request goes:

    request = parse_request(Endpoint.CHAT, body)            # checks the body
    prompts = prompt_token_ids(request, tokenizer, vocab_size=V)   # chat template for messages
    params = sampling_params(request, num_prompt_tokens=len(prompts[0]),
                             max_model_len=L, vocab_size=V)  # defaults that depend on the prompt
    ... the engine runs it ...
    chat_completion(output, request=request, ...)           # or text_completion(outputs, ...)

Every problem with a body is a `RequestError` naming the parameter, like
OpenAI's 400 responses. Fields that would change the output and are not
implemented (tools, response_format, …) are errors, never ignored; fields
that change nothing here (user, metadata, store, …) are accepted. Besides
OpenAI's fields, vLLM's sampling extras are accepted (`top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens`, `include_stop_str_in_output`), and ours: `precision`
(`standard`, `high` or `ultra`; the server's default when absent).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping, Sequence

from engine.llm_engine import RequestOutput
from engine.sampling import SamplingParams
from engine.sequence import TokenLogprobs

# OpenAI's legacy completions default; chat defaults to what fits, at most this.
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 4096
# JSON has no -inf; vLLM reports impossible tokens at this log-probability too.
MIN_REPORTED_LOGPROB = -9999.0


class Endpoint(enum.Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


class RequestError(ValueError):
    """A request we cannot serve, as OpenAI reports it: a message, the parameter at fault, a code."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value",
                 status_code: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status_code = message, param, code, status_code

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error object; a response body is {"error": this}."""
        return {"message": self.message, "type": "invalid_request_error" if self.status_code < 500
                else "server_error", "param": self.param, "code": self.code}


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


# Body fields passed to SamplingParams under the same name.
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                    "stop", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                    "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output", "precision")
_COMMON_FIELDS = frozenset(_SAMPLING_FIELDS + ("model", "max_tokens", "logit_bias", "logprobs", "stream",
                                                "stream_options", "user", "metadata", "store",
                                                "service_tier"))
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "parallel_tool_calls",
                                 "add_generation_prompt", "continue_final_message"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo"}
# Known fields we do not implement, with the values that ask for nothing.
_CHAT_UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,)}
_COMPLETION_UNSUPPORTED: dict[str, tuple] = {"suffix": (None, ""), "best_of": (None,)}
_ROLES = {"system", "developer", "user", "assistant"}


def parse_request(endpoint: Endpoint, body: Any) -> ParsedRequest:
    """Check an OpenAI body for `endpoint`; raises RequestError naming the first problem."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    is_chat = endpoint is Endpoint.CHAT
    known, unsupported = ((_CHAT_FIELDS, _CHAT_UNSUPPORTED) if is_chat
                          else (_COMPLETION_FIELDS, _COMPLETION_UNSUPPORTED))
    body = dict(body)
    if not is_chat and body.get("best_of") is not None and body["best_of"] == (body.get("n") or 1):
        del body["best_of"]  # best_of == n picks every choice: nothing to do
    for key, value in body.items():
        if key in unsupported:
            if value not in unsupported[key]:
                raise RequestError(f"{key} is not supported", param=key, code="unsupported_parameter")
        elif key not in known:
            raise RequestError(f"unrecognized request argument supplied: {key}", param=key,
                               code="unknown_parameter")

    sampling = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    if sampling.get("top_k") in (0, -1) and not isinstance(sampling["top_k"], bool):
        del sampling["top_k"]  # vLLM's spelling of "no top-k"
    if not isinstance(sampling.get("stop", ""), (str, list)):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if not isinstance(sampling.get("stop_token_ids", []), list):
        raise RequestError("stop_token_ids must be a list of token ids", param="stop_token_ids")
    if body.get("logit_bias") is not None:
        sampling["logit_bias"] = _logit_bias(body["logit_bias"])

    max_tokens_param = "max_tokens"
    if is_chat and body.get("max_completion_tokens") is not None:
        max_tokens_param = "max_completion_tokens"  # the newer name wins
    max_tokens = body.get(max_tokens_param)
    least = 0 if body.get("echo") is True else 1  # echo with 0: the prompt's logprobs only
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < least):
        raise RequestError(f"{max_tokens_param} must be an integer of at least {least}, got {max_tokens!r}",
                           param=max_tokens_param)

    if is_chat:
        messages, prompts = _messages(body.get("messages")), ()
        if _flag(body, "logprobs"):
            num_logprobs = body.get("top_logprobs") or 0
        elif body.get("top_logprobs") is not None:
            raise RequestError("top_logprobs needs logprobs to be true", param="top_logprobs")
        else:
            num_logprobs = None
    else:
        messages, prompts = None, text_or_token_inputs(body.get("prompt"), param="prompt")
        num_logprobs = body.get("logprobs")
    if num_logprobs is not None and (isinstance(num_logprobs, bool) or not isinstance(num_logprobs, int)):
        param = "top_logprobs" if is_chat else "logprobs"
        raise RequestError(f"{param} must be an integer, got {num_logprobs!r}", param=param)

    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):
        raise RequestError("stream_options must be an object", param="stream_options")
    if body.get("stream_options") is not None and not _flag(body, "stream"):
        # OpenAI's answer too: options of a stream that is not there are a mistake.
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    add_generation_prompt = body.get("add_generation_prompt")
    add_generation_prompt = True if add_generation_prompt is None else _flag(body, "add_generation_prompt")
    continue_final_message = _flag(body, "continue_final_message")
    if continue_final_message and add_generation_prompt and body.get("add_generation_prompt") is not None:
        raise RequestError("continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")
    if continue_final_message:
        add_generation_prompt = False
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    return ParsedRequest(
        endpoint=endpoint, model=model, messages=messages, prompts=prompts, sampling=sampling,
        max_tokens=max_tokens, max_tokens_param=max_tokens_param, num_logprobs=num_logprobs,
        echo=not is_chat and _flag(body, "echo"), stream=_flag(body, "stream"),
        include_usage=_flag(stream_options, "include_usage", prefix="stream_options."),
        add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)


def prompt_token_ids(request: ParsedRequest, tokenizer, *, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt: the chat template applied to the messages, or the prompts encoded."""
    if request.messages is not None:
        try:
            prompts = [tokenizer.encode_chat(request.messages,
                                             add_generation_prompt=request.add_generation_prompt,
                                             continue_final_message=request.continue_final_message)]
        except Exception as e:  # a template may raise anything (jinja errors, a missing template)
            raise RequestError(f"cannot apply the chat template: {e}", param="messages") from None
    else:
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in request.prompts]
    for ids in prompts:
        if not ids:
            raise RequestError("the prompt is empty", param=request.prompt_param)
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {vocab_size})", param=request.prompt_param)
    return prompts


def sampling_params(request: ParsedRequest, *, num_prompt_tokens: int, max_model_len: int,
                    vocab_size: int) -> SamplingParams:
    """The request's SamplingParams for a prompt of `num_prompt_tokens` tokens.

    An unset max_tokens is 16 for completions (OpenAI's) and, for chat, what
    the context has room for, at most DEFAULT_CHAT_MAX_TOKENS.
    """
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise RequestError(f"this model's maximum context length is {max_model_len} tokens; the prompt "
                           f"has {num_prompt_tokens}", param=request.prompt_param,
                           code="context_length_exceeded")
    max_tokens = request.max_tokens
    if max_tokens is None:
        default = DEFAULT_CHAT_MAX_TOKENS if request.endpoint is Endpoint.CHAT else DEFAULT_COMPLETION_MAX_TOKENS
        max_tokens = min(default, room)
    elif request.is_prompt_only:
        max_tokens = 1  # the engine generates at least one token; responses drop it
    elif max_tokens > room:
        raise RequestError(f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{num_prompt_tokens} and {request.max_tokens_param} asks for {max_tokens} more",
                           param=request.max_tokens_param, code="context_length_exceeded")
    for name, ids in (("logit_bias", [t for t, _ in request.sampling.get("logit_bias", {}).items()]),
                      ("stop_token_ids", request.sampling.get("stop_token_ids") or [])):
        if any(isinstance(t, int) and not 0 <= t < vocab_size for t in ids):
            raise RequestError(f"{name} token ids must be in [0, {vocab_size})", param=name)
    wants_prompt_logprobs = request.echo and request.num_logprobs is not None
    try:
        return SamplingParams(**request.sampling, max_tokens=max_tokens, logprobs=request.num_logprobs,
                              prompt_logprobs=request.num_logprobs if wants_prompt_logprobs else None)
    except (TypeError, ValueError) as e:
        field = str(e).split(" ", 1)[0]
        param = {"max_tokens": request.max_tokens_param, "prompt_logprobs": "logprobs",
                 "logprobs": "top_logprobs" if request.endpoint is Endpoint.CHAT else "logprobs"}.get(field, field)
        raise RequestError(str(e), param=param if param in _CHAT_FIELDS | _COMPLETION_FIELDS else None) from None


# -- responses --------------------------------------------------------------------


class TokenTexts:
    """Token id → its text and its raw bytes, cached, for logprobs (special tokens
    shown, as OpenAI does). A token that is part of a UTF-8 character has the
    text U+FFFD but its true bytes, so clients can join bytes into text."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def bytes_of(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._bytes[token_id] = list(self._tokenizer.token_bytes(token_id))
        return raw


def chat_completion(output: RequestOutput, *, request: ParsedRequest, response_id: str, created: int,
                    model: str, token_text: TokenTexts) -> dict[str, Any]:
    """A finished chat request as OpenAI's `chat.completion` object."""
    choices = [{
        "index": c.index,
        "message": {"role": "assistant", "content": c.text, "refusal": None},
        "logprobs": None if request.num_logprobs is None else {
            "content": [chat_token_logprob(lp, token_text) for lp in c.logprobs or ()], "refusal": None},
        "finish_reason": c.finish_reason,
        "stability": stability_info(c),
    } for c in output.outputs]
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage([output])}


def text_completion(outputs: Sequence[RequestOutput], *, request: ParsedRequest, prompt_texts: Sequence[str],
                    response_id: str, created: int, model: str,
                    token_text: TokenTexts) -> dict[str, Any]:
    """Finished completions requests (one per prompt) as OpenAI's `text_completion` object.

    Choice i of prompt p has index p·n + i, as OpenAI numbers them. With
    echo the prompt text and tokens come first; text_offset counts from the
    start of the returned text.
    """
    choices = []
    for prompt_index, (output, prompt_text) in enumerate(zip(outputs, prompt_texts)):
        for c in output.outputs:
            entries: list[tuple[int, TokenLogprobs | None]] = []
            text = "" if request.is_prompt_only else c.text
            if request.echo:
                text = prompt_text + text
                entries = [(output.prompt_ids[0], None)]
                entries += [(lp.token_id, lp) for lp in output.prompt_logprobs or ()]
            if not request.is_prompt_only:
                entries += [(lp.token_id, lp) for lp in c.logprobs or ()]
            choices.append({
                "text": text, "index": prompt_index * len(output.outputs) + c.index,
                "logprobs": None if request.num_logprobs is None else completion_logprobs(entries, token_text),
                "finish_reason": "length" if request.is_prompt_only else c.finish_reason,
                "stability": None if request.is_prompt_only else stability_info(c),
            })
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(outputs, is_prompt_only=request.is_prompt_only)}


def stability_info(choice) -> dict[str, Any] | None:
    """Our extension field on a choice: {"score", "first_fragile_token"} (engine.llm_engine.Stability)."""
    if choice.stability is None:
        return None
    return {"score": choice.stability.score, "first_fragile_token": choice.stability.first_fragile_token}


def usage(outputs: Sequence[RequestOutput], *, is_prompt_only: bool = False) -> dict[str, Any]:
    """OpenAI's usage object; completion tokens count every choice's tokens."""
    prompt_tokens = sum(len(o.prompt_ids) for o in outputs)
    completion_tokens = 0 if is_prompt_only else sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


def chat_token_logprob(lp: TokenLogprobs, token_text: TokenTexts) -> dict[str, Any]:
    """One entry of a chat choice's logprobs.content."""
    def entry(token_id, logprob):
        return {"token": token_text(token_id), "logprob": _finite(logprob), "bytes": token_text.bytes_of(token_id)}
    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}


def completion_logprobs(entries: Sequence[tuple[int, TokenLogprobs | None]], token_text, *,
                        offset: int = 0) -> dict[str, list]:
    """The completions logprobs object of (token id, logprobs) entries; offsets start at `offset`."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, lp in entries:
        text = token_text(token_id)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if lp is None:  # a prompt's first token has nothing before it to predict it
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(lp.logprob))
        top = {token_text(i): _finite(v) for i, v in lp.top}
        top.setdefault(text, _finite(lp.logprob))  # OpenAI: the sampled token is always there
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def _finite(logprob: float) -> float:
    return max(logprob, MIN_REPORTED_LOGPROB) if not math.isnan(logprob) else MIN_REPORTED_LOGPROB


# -- body parts -------------------------------------------------------------------


def _flag(body: Mapping, name: str, *, prefix: str = "") -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{prefix}{name} must be a boolean, got {value!r}", param=prefix + name)
    return bool(value)


def _logit_bias(value) -> dict[int, float]:
    # JSON object keys are strings: OpenAI sends {"50256": -100}.
    if not isinstance(value, Mapping):
        raise RequestError("logit_bias must map token ids to biases", param="logit_bias")
    bias = {}
    for key, v in value.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise RequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        bias[token_id] = v
    return bias


def _messages(value) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list", param="messages",
                           code="missing_required_parameter" if value is None else "invalid_value")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise RequestError(f"{where} must be an object", param=where)
        if m.get("role") not in _ROLES:
            raise RequestError(f"{where}.role must be one of {sorted(_ROLES)}, got {m.get('role')!r}",
                               param=f"{where}.role")
        for key, v in m.items():
            if key not in ("role", "content", "name") and v is not None:
                raise RequestError(f"{where}.{key} is not supported", param=f"{where}.{key}",
                                   code="unsupported_parameter")
        message = {"role": "system" if m["role"] == "developer" else m["role"],
                   "content": _content(m.get("content"), f"{where}.content")}
        if m.get("name") is not None:
            message["name"] = m["name"]
        messages.append(message)
    return tuple(messages)


def _content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}: only text parts are supported", param=where,
                                   code="unsupported_parameter")
            texts.append(part["text"])
        return "\n".join(texts)  # vLLM joins text parts the same way
    raise RequestError(f"{where} must be a string or a list of text parts", param=where)


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
