"""Output text as tokens arrive: stop strings and what a stream may send early."""

from __future__ import annotations

from engine.sampling import SamplingParams
from engine.text_output import TextOutput


def _feed(tokenizer, text, params, *, check_from=0):
    output = TextOutput(tokenizer, tokenizer.encode("Say:"), params)
    streamed = []
    for i, token in enumerate(tokenizer.encode(text)):
        stop = output.append(token, check_stops=i >= check_from)
        streamed.append(output.stream_text)
        if stop is not None:
            return output, stop, streamed
    output.finish()
    return output, None, streamed


def test_stream_never_sends_a_stop_string_prefix(smollm2):
    tokenizer = smollm2.tokenizer
    output, stop, streamed = _feed(tokenizer, "alpha beta END gamma", SamplingParams(stop=["END"]))
    assert stop == "END" and output.text == "alpha beta "
    assert all(not s.endswith(("E", "EN")) for s in streamed)
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))  # only ever grows


def test_stop_strings_ignored_before_min_tokens(smollm2):
    tokenizer = smollm2.tokenizer
    n = len(tokenizer.encode("END one END"))
    output, stop, _ = _feed(tokenizer, "END one END two", SamplingParams(stop=["END"]), check_from=n - 1)
    assert stop == "END" and output.text == "END one "
