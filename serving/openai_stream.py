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
from typing import Any, Sequence

from engine.llm_engine import CompletionOutput, RequestOutput
from engine.openai_format import (Endpoint, ParsedRequest, TokenTexts, chat_token_logprob,
                                  completion_logprobs, stability_info, usage)


@dataclasses.dataclass(slots=True)
class _Cursor:
    """How much of one choice has been sent."""

    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0  # completions logprobs: characters of token text sent so far
    is_started: bool = False
    is_finished: bool = False


class ChunkWriter:
    def __init__(self, request: ParsedRequest, *, response_id: str, created: int, model: str,
                 token_text: TokenTexts, prompt_texts: Sequence[str] = ()):
        self._request = request
        self._is_chat = request.endpoint is Endpoint.CHAT
        self._head = {"id": response_id, "object": "chat.completion.chunk" if self._is_chat else "text_completion",
                      "created": created, "model": model}
        self._token_text = token_text
        self._prompt_texts = prompt_texts
        self._cursors: dict[tuple[int, int], _Cursor] = {}

    def chunks(self, prompt_index: int, output: RequestOutput) -> list[dict[str, Any]]:
        """The chunks that bring the client up to date with `output`."""
        chunks = []
        for choice in output.outputs:
            cursor = self._cursors.setdefault((prompt_index, choice.index), _Cursor())
            if cursor.is_finished:
                continue
            if self._is_chat:
                parts = self._chat_parts(choice, cursor)
            else:
                parts = self._completion_parts(prompt_index, output, choice, cursor)
            chunks += [self._chunk(part) for part in parts]
        return chunks

    def usage_chunk(self, finals: Sequence[RequestOutput]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage(finals, is_prompt_only=self._request.is_prompt_only)}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._head, "choices": [choice]}
        if self._request.include_usage:
            chunk["usage"] = None
        return chunk

    def _chat_parts(self, choice: CompletionOutput, cursor: _Cursor) -> list[dict[str, Any]]:
        parts = []
        wants_logprobs = self._request.num_logprobs is not None
        if not cursor.is_started:
            cursor.is_started = True
            parts.append({"index": choice.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None})
        text = choice.text[cursor.num_chars:]
        new_logprobs = (choice.logprobs or [])[cursor.num_tokens:] if wants_logprobs else []
        if text or new_logprobs:
            entries = [chat_token_logprob(lp, self._token_text) for lp in new_logprobs]
            parts.append({"index": choice.index, "delta": {"content": text},
                          "logprobs": {"content": entries, "refusal": None} if wants_logprobs else None,
                          "finish_reason": None})
        cursor.num_chars, cursor.num_tokens = len(choice.text), len(choice.token_ids)
        if choice.finish_reason is not None:
            cursor.is_finished = True
            parts.append({"index": choice.index, "delta": {}, "logprobs": None,
                          "finish_reason": choice.finish_reason, "stability": stability_info(choice)})
        return parts

    def _completion_parts(self, prompt_index: int, output: RequestOutput, choice: CompletionOutput,
                          cursor: _Cursor) -> list[dict[str, Any]]:
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
                entries = [(output.prompt_ids[0], None)]
                entries += [(lp.token_id, lp) for lp in output.prompt_logprobs or ()]
        if not request.is_prompt_only:
            text += choice.text[cursor.num_chars:]
            entries += [(lp.token_id, lp) for lp in (choice.logprobs or [])[cursor.num_tokens:]]
        cursor.num_chars, cursor.num_tokens = len(choice.text), len(choice.token_ids)
        parts = []
        if text or (wants_logprobs and entries):
            logprobs = None
            if wants_logprobs:
                logprobs = completion_logprobs(entries, self._token_text, offset=cursor.text_offset)
                cursor.text_offset += sum(len(t) for t in logprobs["tokens"])
            parts.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": None})
        if choice.finish_reason is not None or request.is_prompt_only:
            cursor.is_finished = True
            reason = "length" if request.is_prompt_only else choice.finish_reason
            parts.append({"index": index, "text": "", "logprobs": None, "finish_reason": reason,
                          "stability": None if request.is_prompt_only else stability_info(choice)})
        return parts
