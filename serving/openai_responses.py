"""Engine outputs → OpenAI response Structs (serving.schemas), for whole responses and stream chunks.

    chat_completion(output, request=..., response_id=..., created=..., model=..., token_text=...)
    text_completion(outputs, request=..., prompt_texts=..., ...)    # one output per prompt

Used by the server (with `serving.openai_stream` for the streamed chunks)
and by `balansis run-batch`. The Structs are encoded once, by whoever
sends them.
"""

from __future__ import annotations

import math
from typing import Sequence

from engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from serving import schemas
from serving.openai_requests import ParsedRequest

# JSON has no -inf; vLLM reports impossible tokens at this log-probability too.
MIN_REPORTED_LOGPROB = -9999.0


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
                    model: str, token_text: TokenTexts) -> schemas.ChatCompletion:
    """A finished chat request as OpenAI's `chat.completion` object."""
    choices = [schemas.ChatChoice(
        index=c.index, message=schemas.AssistantMessage(role="assistant", content=c.text),
        logprobs=None if request.num_logprobs is None else schemas.ChatLogprobs(
            content=[chat_token_logprob(lp, token_text) for lp in c.logprobs or ()]),
        finish_reason=c.finish_reason, stability=stability(c)) for c in output.outputs]
    return schemas.ChatCompletion(id=response_id, object="chat.completion", created=created, model=model,
                                  choices=choices, usage=usage([output]))


def text_completion(outputs: Sequence[RequestOutput], *, request: ParsedRequest, prompt_texts: Sequence[str],
                    response_id: str, created: int, model: str, token_text: TokenTexts) -> schemas.Completion:
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
                entries = prompt_entries(output)
            if not request.is_prompt_only:
                entries += [(lp.token_id, lp) for lp in c.logprobs or ()]
            choices.append(schemas.CompletionChoice(
                index=prompt_index * len(output.outputs) + c.index, text=text,
                logprobs=None if request.num_logprobs is None else completion_logprobs(entries, token_text),
                finish_reason="length" if request.is_prompt_only else c.finish_reason,
                stability=None if request.is_prompt_only else stability(c)))
    return schemas.Completion(id=response_id, object="text_completion", created=created, model=model,
                              choices=choices, usage=usage(outputs, is_prompt_only=request.is_prompt_only))


def prompt_entries(output: RequestOutput) -> list[tuple[int, TokenLogprobs | None]]:
    """Echo's (token id, logprobs) of the prompt; its first token has nothing before it to predict it."""
    return [(output.prompt_ids[0], None)] + [(lp.token_id, lp) for lp in output.prompt_logprobs or ()]


def stability(choice: CompletionOutput) -> schemas.Stability | None:
    """Our extension field on a choice (engine.outputs.Stability); None before any token."""
    if choice.stability is None:
        return None
    return schemas.Stability(score=choice.stability.score,
                             first_fragile_token=choice.stability.first_fragile_token)


def usage(outputs: Sequence[RequestOutput], *, is_prompt_only: bool = False) -> schemas.Usage:
    """OpenAI's usage object; completion tokens count every choice's tokens."""
    prompt_tokens = sum(len(o.prompt_ids) for o in outputs)
    completion_tokens = 0 if is_prompt_only else sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return schemas.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=schemas.PromptTokensDetails(
                             cached_tokens=sum(o.num_cached_tokens for o in outputs)))


def chat_token_logprob(lp: TokenLogprobs, token_text: TokenTexts) -> schemas.ChatTokenLogprob:
    """One entry of a chat choice's logprobs.content."""
    return schemas.ChatTokenLogprob(
        token=token_text(lp.token_id), logprob=_finite(lp.logprob), bytes=token_text.bytes_of(lp.token_id),
        top_logprobs=[schemas.TopLogprob(token=token_text(i), logprob=_finite(v), bytes=token_text.bytes_of(i))
                      for i, v in lp.top])


def completion_logprobs(entries: Sequence[tuple[int, TokenLogprobs | None]], token_text: TokenTexts, *,
                        offset: int = 0) -> schemas.CompletionLogprobs:
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
    return schemas.CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                                      text_offset=text_offset)


def _finite(logprob: float) -> float:
    return max(logprob, MIN_REPORTED_LOGPROB) if not math.isnan(logprob) else MIN_REPORTED_LOGPROB
