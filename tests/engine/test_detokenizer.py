"""Incremental detokenisation: the pieces add up to the full text and never
contain a broken UTF-8 character."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Plain ASCII text, with punctuation; and numbers 12345.",
    "Naïve café — déjà vu in Zürich.",
    "Emoji need four bytes: 🙂🚀🎉 and CJK three: 日本語のテキスト",
    "  leading spaces and\nnew lines\ttabs",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_decoded_text(smollm2, text):
    tokenizer = smollm2.tokenizer
    prompt = tokenizer.encode("Say:")
    generated = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.push(token) for token in generated]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(generated)
    if any(ord(c) > 0xFFFF for c in text):
        assert "" in pieces  # a 4-byte character spans tokens and was held back
