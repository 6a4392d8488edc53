"""The limits that bound one request, set by the operator (`balansis serve` flags).

The engine already refuses what it cannot do (a prompt past the context,
more logprobs than MAX_LOGPROBS, more sequences than the queue holds);
these are the operator's tighter bounds on what one request may ask for:
prompt tokens, new tokens, choices (`n`) and logprobs. An unset `max_tokens`
is lowered to the bound instead of refused; everything else over a bound is
a 400 naming the field and the flag.
"""

from __future__ import annotations

import dataclasses

from engine.sampling import MAX_LOGPROBS, SamplingParams
from serving.errors import RequestError

DEFAULT_MAX_N = 16


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLimits:
    max_prompt_tokens: int | None = None  # None: the model's context bounds it
    max_completion_tokens: int | None = None  # None: the context bounds it
    max_n: int = DEFAULT_MAX_N
    max_logprobs: int = MAX_LOGPROBS

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}")

    def apply(self, params: SamplingParams, *, num_prompt_tokens: int, max_tokens_given: bool,
              prompt_param: str, max_tokens_param: str = "max_tokens", logprobs_param: str = "logprobs"
              ) -> SamplingParams:
        """`params` within these limits (an unset max_tokens lowered to the bound), or a 400."""
        if self.max_prompt_tokens is not None and num_prompt_tokens > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {num_prompt_tokens} tokens; this server takes at most "
                               f"{self.max_prompt_tokens} (--max-prompt-tokens)", param=prompt_param)
        if self.max_completion_tokens is not None and params.max_tokens > self.max_completion_tokens:
            if not max_tokens_given:
                params = dataclasses.replace(params, max_tokens=self.max_completion_tokens,
                                             min_tokens=min(params.min_tokens, self.max_completion_tokens))
            else:
                raise RequestError(f"{max_tokens_param} is {params.max_tokens}; this server generates at most "
                                   f"{self.max_completion_tokens} tokens a choice (--max-completion-tokens)",
                                   param=max_tokens_param)
        if params.n > self.max_n:
            raise RequestError(f"n is {params.n}; this server gives at most {self.max_n} choices a request "
                               f"(--max-n)", param="n")
        for asked in (params.logprobs, params.prompt_logprobs):
            if asked is not None and asked > self.max_logprobs:
                raise RequestError(f"{logprobs_param} is {asked}; this server returns at most {self.max_logprobs} "
                                   f"alternatives a token (--max-logprobs)", param=logprobs_param)
        return params
