"""Constrained decoding: which tokens may come next, per sequence, as a packed bitmask.

A request's `Constraint` (engine.sampling) becomes a grammar of llguidance
(https://github.com/guidance-ai/llguidance: JSON schemas, regexes, Lark grammars; an Earley
parser over the tokenizer's byte trie, so it needs no compile pass per schema and no torch,
unlike xgrammar, which requires torch and triton). Each sequence gets a matcher; every step the
runner asks the matchers of the rows about to sample for their masks, filled in parallel into one
`int32 [rows, ceil(V / 32)]` array (bit i of word j: token 32j + i may come next) that travels to
the device with the step's other inputs, and the sampler sets the other tokens' logits to -inf.
After sampling, the token goes back to its matcher; a matcher that has nothing more to accept
finishes its sequence.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.numpy
import numpy as np

from engine.sampling import Constraint

# JSON is generated compact (no whitespace between tokens): shorter outputs, and a small model
# cannot pad an object with endless spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for `constraint`."""
    kind, value = constraint.kind, constraint.value
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be an object or a boolean")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        choices = json.loads(value)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    return llguidance.LLMatcher.grammar_from_lark(value)


class GrammarCompiler:
    """Matchers for one tokenizer and vocabulary (the model's, which may exceed the tokenizer's)."""

    def __init__(self, tokenizer_json: str, *, vocab_size: int, eos_token_id: int | None):
        self.vocab_size = vocab_size
        # ~1 s for a 50k vocabulary: once per engine.
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)
        self._executor = llguidance.LLExecutor()
        # A request is checked by the server and again as it is queued, and clients repeat their
        # schemas: each distinct constraint is translated and validated once.
        self._grammar_of = functools.lru_cache(maxsize=256)(grammar_text)
        self._error_of = functools.lru_cache(maxsize=256)(self._validate)

    def check(self, constraint: Constraint) -> None:
        """ValueError naming what the grammar library cannot take (an unsupported schema keyword,
        a bad regex), so a request is refused rather than run unconstrained."""
        error = self._error_of(constraint)
        if error is not None:
            raise ValueError(error)

    def _validate(self, constraint: Constraint) -> str | None:
        try:
            grammar = self._grammar_of(constraint)
        except ValueError as e:
            return str(e)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        return f"unsupported {constraint.kind.replace('_', ' ')}: {messages[0]}" if is_error else None

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self._tokenizer, self._grammar_of(constraint), log_level=0)

    def fill_masks(self, matchers: list[tuple[llguidance.LLMatcher, int]], num_rows: int) -> np.ndarray:
        """`int32 [num_rows, ceil(V / 32)]`: row k is its matcher's mask, every other row all ones."""
        masks = llguidance.numpy.allocate_token_bitmask(num_rows, self.vocab_size)
        if matchers:
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, matchers, masks)
        return masks
