"""Server-sent-event chunks of a streamed chat or completions request, as OpenAI sends them.

Chat: per choice, a first chunk with the assistant role and empty content,
then content deltas, then a chunk with an empty delta and the finish
reason. Completions: text deltas, then an empty text with the finish
reason. With `stream_options.include_usage` every chunk carries
`"usage": null` and one last chunk with no choices carries the usage.
Logprobs travel with the tokens they describe; text may lag tokens by a
held-back stop-string prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import msgspec

from engine.outputs import CompletionOutput, RequestOutput
from serving import schemas
from serving.openai_requests import Endpoint, ParsedRequest
from serving.openai_responses import (TokenTexts, chat_token_logprob, completion_logprobs, prompt_entries,
                                      stability, usage)

Chunk = schemas.ChatCompletionChunk | schemas.Completion


@dataclasses.dataclass(slots=True)
class _Cursor:
    """How much of one choice has been sent."""

    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0  # completions logprobs: characters of token text sent so far
    is_started: bool = False
    is_finished: bool = False


class ChunkWriter:
    """The chunks of one streamed request, as its outputs arrive; each is a Struct to encode once."""

    def __init__(self, request: ParsedRequest, *, response_id: str, created: int, model: str,
                 token_text: TokenTexts, prompt_texts: Sequence[str] = ()):
        self._request = request
        self._is_chat = request.endpoint is Endpoint.CHAT
        self._response_id, self._created, self._model = response_id, created, model
        # With include_usage every chunk says "usage": null until the last one.
        self._usage = None if request.include_usage else msgspec.UNSET
        self._token_text = token_text
        self._prompt_texts = prompt_texts
        self._cursors: dict[tuple[int, int], _Cursor] = {}

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[Chunk]:
        """The chunks that bring the client up to date with `output`."""
        chunks = []
        for choice in output.outputs:
            cursor = self._cursors.setdefault((prompt_index, choice.index), _Cursor())
            if cursor.is_finished:
                continue
            if self._is_chat:
                chunks += [self._chunk(part) for part in self._chat_parts(choice, cursor)]
            else:
                chunks += [self._chunk(part) for part in self._completion_parts(prompt_index, output, choice, cursor)]
        return chunks

    def usage_chunk(self, finals: Sequence[RequestOutput]) -> Chunk:
        return self._chunk(None, usage=usage(finals, is_prompt_only=self._request.is_prompt_only))

    def _chunk(self, choice: schemas.ChatChunkChoice | schemas.CompletionChoice | None, *,
               usage: schemas.Usage | None = None) -> Chunk:
        choices = [] if choice is None else [choice]
        if self._is_chat:
            return schemas.ChatCompletionChunk(id=self._response_id, object="chat.completion.chunk",
                                               created=self._created, model=self._model, choices=choices,
                                               usage=usage or self._usage)
        return schemas.Completion(id=self._response_id, object="text_completion", created=self._created,
                                  model=self._model, choices=choices, usage=usage or self._usage)

    def _chat_parts(self, choice: CompletionOutput, cursor: _Cursor) -> list[schemas.ChatChunkChoice]:
        parts = []
        wants_logprobs = self._request.num_logprobs is not None
        if not cursor.is_started:
            cursor.is_started = True
            parts.append(schemas.ChatChunkChoice(index=choice.index,
                                                 delta=schemas.ChatDelta(role="assistant", content=""),
                                                 logprobs=None, finish_reason=None))
        text = choice.text[cursor.num_chars:]
        new_logprobs = (choice.logprobs or [])[cursor.num_tokens:] if wants_logprobs else []
        if text or new_logprobs:
            entries = [chat_token_logprob(lp, self._token_text) for lp in new_logprobs]
            parts.append(schemas.ChatChunkChoice(
                index=choice.index, delta=schemas.ChatDelta(content=text),
                logprobs=schemas.ChatLogprobs(content=entries) if wants_logprobs else None, finish_reason=None))
        cursor.num_chars, cursor.num_tokens = len(choice.text), len(choice.token_ids)
        if choice.finish_reason is not None:
            cursor.is_finished = True
            parts.append(schemas.ChatChunkChoice(index=choice.index, delta=schemas.ChatDelta(), logprobs=None,
                                                 finish_reason=choice.finish_reason, stability=stability(choice)))
        return parts

    def _completion_parts(self, prompt_index: int, output: RequestOutput, choice: CompletionOutput,
                          cursor: _Cursor) -> list[schemas.CompletionChoice]:
        request = self._request
        index = prompt_index * len(output.outputs) + choice.index
        wants_logprobs = request.num_logprobs is not None
        text, entries = "", []
        if not cursor.is_started:
            # Echo waits for the first token: only then are the prompt's logprobs complete.
            if request.echo and not (choice.token_ids or choice.finish_reason):
                return []
            cursor.is_started = True
            if request.echo:
                text = self._prompt_texts[prompt_index]
                entries = prompt_entries(output)
        if not request.is_prompt_only:
            text += choice.text[cursor.num_chars:]
            entries += [(lp.token_id, lp) for lp in (choice.logprobs or [])[cursor.num_tokens:]]
        cursor.num_chars, cursor.num_tokens = len(choice.text), len(choice.token_ids)
        parts = []
        if text or (wants_logprobs and entries):
            logprobs = None
            if wants_logprobs:
                logprobs = completion_logprobs(entries, self._token_text, offset=cursor.text_offset)
                cursor.text_offset += sum(len(t) for t in logprobs.tokens)
            parts.append(schemas.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=None))
        if choice.finish_reason is not None or request.is_prompt_only:
            cursor.is_finished = True
            parts.append(schemas.CompletionChoice(
                index=index, text="", logprobs=None,
                finish_reason="length" if request.is_prompt_only else choice.finish_reason,
                stability=None if request.is_prompt_only else stability(choice)))
        return parts
