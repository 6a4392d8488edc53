"""A sequence's output text as it grows: incremental detokenisation plus stop strings.

Stop strings may span token boundaries, so the check runs on the text, and
a stream must hold back the last `len(longest stop) - 1` characters until
it is clear they do not start a stop string.
"""

from __future__ import annotations

from checkpoints.tokenizer import Tokenizer
from engine.detokenizer import IncrementalDetokenizer
from engine.sampling import SamplingParams


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self.is_final = False

    def append(self, token_id: int, *, check_stops: bool = True) -> str | None:
        """Add a generated token; return the stop string it completed, if any (the text is then cut).

        `check_stops` False (before min_tokens) lets stop strings pass.
        """
        piece = self._detokenizer.push(token_id)
        if not piece or not check_stops:
            self.text += piece
            return None
        search_from = max(0, len(self.text) - self._hold)
        self.text += piece
        for stop in self._stops:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[:at + len(stop) if self._include_stop else at]
                self.is_final = True
                return stop
        return None

    def finish(self) -> None:
        self.is_final = True

    @property
    def stream_text(self) -> str:
        """Text that is safe to send now: all of it once final, else all but a possible stop prefix."""
        if self.is_final or not self._hold:
            return self.text
        return self.text[:max(0, len(self.text) - self._hold)]
