"""What the engine hands out: plain dataclasses, no JAX, so any layer can read them.

`RequestOutput` is a request's state after a step (cumulative text and
tokens of each choice); `EngineStats` a snapshot of the engine's load;
`ModelInfo` the facts of a loaded model that callers check requests
against; `RequestRejected` why the engine will not take a request.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from checkpoints.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities of one position under the raw model distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclasses.dataclass(frozen=True, slots=True)
class Stability:
    """How robust a choice's decisions were to rounding (see engine.sampler.decision_stability)."""

    score: float  # the fraction of its tokens whose decision margin beat twice the rounding bound
    first_fragile_token: int | None  # index of the first token that did not; None: none


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # "stop", "length", "abort"; None while running
    stop_reason: str | int | None
    stability: Stability | None = None  # None before the first token


@dataclasses.dataclass(slots=True)
class RequestOutput:
    """A request's state after a step: cumulative text and tokens of each choice."""

    request_id: str
    prompt_ids: list[int]
    prompt_logprobs: list[TokenLogprobs] | None
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float
    first_scheduled_time: float | None  # when its prompt first ran: the end of its queue time
    first_token_time: float | None
    num_cached_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load and counters, for metrics."""

    num_running: int  # sequences holding KV blocks
    num_waiting: int  # sequences queued for their prompt
    kv_cache_usage: float  # fraction of KV blocks referenced by a sequence
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found there
    num_prompt_tokens: int  # computed, over the engine's life
    num_generation_tokens: int
    num_preemptions: int
    num_kv_blocks: int  # the KV pool's size, in blocks
    kv_cache_bytes: int  # and in bytes (K and V, every layer, all devices)
    weight_bytes: int  # the model's weights, all devices


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    """A loaded model as the layers above see it: read-only facts, no weights."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int  # the longest sequence: prompt and output for a decoder, input for an encoder


class RejectedField(enum.Enum):
    """The part of a request the engine refused (callers map it onto their own parameter names)."""

    PROMPT = "prompt"  # empty, ids outside the vocabulary, or too long by itself
    MAX_TOKENS = "max_tokens"  # the prompt plus this many tokens exceed the context
    LOGIT_BIAS = "logit_bias"
    STOP_TOKEN_IDS = "stop_token_ids"


class RequestRejected(ValueError):
    """A request the engine cannot serve: which part, and whether it is the context length."""

    def __init__(self, message: str, *, field: RejectedField, is_context_length: bool = False):
        super().__init__(message)
        self.field = field
        self.is_context_length = is_context_length
