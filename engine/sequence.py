"""One sequence being generated: its tokens, progress and outcome.

A request with n > 1 choices is n sequences sharing a request id. The
scheduler and the block manager see only `seq_id`, token counts and
`num_computed_tokens`; everything else is the engine's bookkeeping.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools

from engine.outputs import TokenLogprobs
from engine.sampling import SamplingParams

_seq_ids = itertools.count()


def next_seq_id() -> int:
    return next(_seq_ids)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the maximum model length
    ABORT = "abort"  # cancelled by the caller


@dataclasses.dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    choice: int  # index among the request's n choices
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # resolved: unseeded requests get a random one at arrival
    arrival_time: float
    seq_id: int = dataclasses.field(default_factory=next_seq_id)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    output_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None  # positions 1.. of the prompt
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Decision stability (see engine.sampler.decision_stability): output tokens whose
    # margin beat twice the rounding bound, and the index of the first that did not.
    num_stable_tokens: int = 0
    first_fragile_index: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prompt_computed(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_ids)

    @property
    def uses_prefix_cache(self) -> bool:
        # Cached prompt blocks have no logits, so prompt logprobs need them all computed.
        return self.params.prompt_logprobs is None
