"""Per-request sampling parameters: what a request asks for (the OpenAI and
vLLM fields), validated once when the request arrives.

The on-device sampler that honours them is `engine/sampler.py`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from model.numerics import Precision


# OpenAI's limit on returned alternatives per token (`top_logprobs`).
MAX_LOGPROBS = 20
# Temperatures below this are greedy: dividing logits by them overflows
# float32 (vLLM uses the same cut-off).
MIN_SAMPLING_TEMPERATURE = 1e-5
# Seeds feed `jax.random.key` as uint32.
NUM_SEEDS = 2**32


# The sampler computes in float32: a larger magnitude would become infinity there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _real(name: str, value, ok: Callable[[float], bool], expected: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or not ok(float(value))):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be {expected} and fit a float32 (|x| ≤ {FLOAT32_MAX:.4g}), got {value!r}")
    return float(value)


def checked_integer(name: str, value, ok: Callable[[int], bool], expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(int(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a boolean, got {value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request; the fields and defaults of OpenAI / vLLM.

    temperature 0 is greedy. `logit_bias` accepts a mapping {token id: bias}
    and is stored as sorted (id, bias) pairs, `stop` accepts a string or a
    list, so the dataclass stays hashable.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] | None = None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop: str | Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The numerics level (model.numerics.Precision or its name); None: the engine's default.
    precision: Precision | str | None = None

    def __post_init__(self):
        def store(name, value):  # frozen: normalised values go in through object
            object.__setattr__(self, name, value)

        store("n", checked_integer("n", self.n, lambda x: x >= 1, "at least 1"))
        store("max_tokens", checked_integer("max_tokens", self.max_tokens, lambda x: x >= 1, "at least 1"))
        store("min_tokens", checked_integer("min_tokens", self.min_tokens, lambda x: 0 <= x <= self.max_tokens,
                                     f"in [0, max_tokens={self.max_tokens}]"))
        store("temperature", _real("temperature", self.temperature, lambda x: x >= 0, ">= 0"))
        store("top_p", _real("top_p", self.top_p, lambda x: 0 < x <= 1, "in (0, 1]"))
        if self.top_k is not None:
            store("top_k", checked_integer("top_k", self.top_k, lambda x: x >= 1, "None or at least 1"))
        store("min_p", _real("min_p", self.min_p, lambda x: 0 <= x <= 1, "in [0, 1]"))
        for name in ("presence_penalty", "frequency_penalty"):
            store(name, _real(name, getattr(self, name), lambda x: -2 <= x <= 2, "in [-2, 2]"))
        store("repetition_penalty",
              _real("repetition_penalty", self.repetition_penalty, lambda x: x > 0, "> 0"))
        store("logit_bias", self._normalised_logit_bias())
        if self.seed is not None:
            store("seed", checked_integer("seed", self.seed, lambda x: 0 <= x < NUM_SEEDS, "in [0, 2**32)"))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                store(name, checked_integer(name, getattr(self, name), lambda x: 0 <= x <= MAX_LOGPROBS,
                                     f"None or in [0, {MAX_LOGPROBS}]"))
        # None is accepted for the lists too: OpenAI bodies send null for "none".
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        store("stop", stop)
        store("stop_token_ids", tuple(checked_integer("stop_token_ids", t, lambda x: x >= 0, "token ids >= 0")
                                      for t in self.stop_token_ids or ()))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            store(name, _flag(name, getattr(self, name)))
        if self.precision is not None:
            try:
                store("precision", Precision(self.precision))
            except ValueError:
                raise ValueError(f"precision must be one of {[p.value for p in Precision]}, "
                                 f"got {self.precision!r}") from None

    def _normalised_logit_bias(self) -> tuple[tuple[int, float], ...] | None:
        if self.logit_bias is None:
            return None
        # A mapping, or the stored pairs again (dataclasses.replace passes them back in).
        try:
            pairs = dict(self.logit_bias).items()
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}") from None
        return tuple(sorted(
            (checked_integer("logit_bias", token_id, lambda x: x >= 0, "keyed by token ids >= 0"),
             _real("logit_bias", bias, lambda x: -100 <= x <= 100, "valued in [-100, 100]"))
            for token_id, bias in pairs)) or None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the row's earlier tokens (any penalty is set)."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)

    def banned_token_ids(self, *, num_output_tokens: int,
                         eos_token_ids: Collection[int] = ()) -> tuple[int, ...]:
        """Ids that may not be drawn next: every id that would stop generation, until
        min_tokens tokens exist (EOS is no stop when ignore_eos is set)."""
        if num_output_tokens >= self.min_tokens:
            return ()
        eos = () if self.ignore_eos else tuple(eos_token_ids)
        return tuple(sorted(set(self.stop_token_ids) | set(eos)))
