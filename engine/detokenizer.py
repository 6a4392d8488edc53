"""Incremental detokenisation that never emits half a UTF-8 character.

A byte-level BPE token can end in the middle of a multi-byte character;
decoding it alone gives U+FFFD. We decode a short window of recent tokens
and hold text back while it ends in U+FFFD, releasing it once the next
token completes the character.
"""

from __future__ import annotations

from checkpoints.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, *,
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Start the window inside the prompt so tokenisers that drop a
        # leading space at the start of text decode the first token right.
        self._ids = list(prompt_ids[-4:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (maybe '')."""
        self._ids.append(token_id)
        def decode(ids):
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = decode(self._ids[self._prefix_offset:])
        if full_text.endswith(_REPLACEMENT) or len(full_text) <= len(prefix_text):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]
