"""What one request used, and its usage record: one row per request that runs or asks to run a model.

A `UsageMeter` follows a request from the moment its handler knows what it
asks for: the engine outputs it sees give the tokens (counted as the
response's `usage` counts them), the first token's time, the queue time,
the finish reason and the stability score. When the HTTP response has ended
(serving.http_observer), `usage_row` turns the meter, the caller and the
status into the row that `serving.usage_store` writes:

- `ok`: the response was sent whole;
- `aborted`: the client left first (HTTP 499, or a stream cut short);
- `rejected`: refused with a 4xx (a limit, a full queue, a bad request);
- `error`: a 5xx, or an engine failure reported inside a stream.

Prompts and outputs are kept only with `--log-prompts`.
"""

from __future__ import annotations

import time

import msgspec

from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

# The routes that run a model: each of their requests gets a row.
METERED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/v1/generate",
                            "/api/v1/chat", "/api/v1/embeddings"})


class UsageMeter:
    def __init__(self, *, model: str, is_stream: bool = False, num_prompts: int = 1,
                 params: SamplingParams | None = None, precision: str | None = None, is_prompt_only: bool = False,
                 prompt: str | None = None):
        """`params`: the first prompt's sampling parameters; `precision`: the level it runs at (the
        server's when the request names none). `is_prompt_only`: an echo of the prompt with max_tokens
        0 (no completion tokens counted). `prompt`: the request's prompt as text, to keep (only with
        --log-prompts)."""
        self.model = model
        self.is_stream = is_stream
        self._num_prompts = num_prompts
        self.params = params
        self.precision = precision
        self._is_prompt_only = is_prompt_only
        self.prompt = prompt
        self._outputs: dict[int, RequestOutput] = {}  # prompt index → its latest output
        self._embedded_tokens: int | None = None
        self._cached: tuple[int, int, str | None] | None = None  # a response cache hit's usage
        self._first_token_at: float | None = None
        self.has_failed = False  # an error reported inside a stream already started

    def observe(self, index: int, output: RequestOutput) -> None:
        self._outputs[index] = output
        if self._first_token_at is None and any(c.token_ids for c in output.outputs):
            self._first_token_at = time.time()

    def from_cache(self, *, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> None:
        """The request was answered from the response cache: the stored response's usage."""
        self._cached = (prompt_tokens, completion_tokens, finish_reason)

    def embedded(self, num_tokens: int) -> None:
        """An embeddings request's vectors came: its input tokens are used."""
        self._embedded_tokens = num_tokens

    @property
    def prompt_tokens(self) -> int:
        if self._cached is not None:
            return self._cached[0]
        if self._embedded_tokens is not None:
            return self._embedded_tokens
        return sum(len(o.prompt_ids) for o in self._outputs.values())

    @property
    def completion_tokens(self) -> int:
        if self._cached is not None:
            return self._cached[1]
        if self._is_prompt_only:
            return 0
        return sum(len(c.token_ids) for o in self._outputs.values() for c in o.outputs)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def is_finished(self) -> bool:
        if self._embedded_tokens is not None or self._cached is not None:
            return True
        return len(self._outputs) == self._num_prompts and all(o.finished for o in self._outputs.values())

    @property
    def finish_reason(self) -> str | None:
        """The first prompt's first choice's (as request_success_total counts a request)."""
        if self._cached is not None:
            return self._cached[2]
        first = self._outputs.get(0)
        return first.outputs[0].finish_reason if first is not None and first.outputs else None

    def _arrival(self) -> float | None:
        return min((o.arrival_time for o in self._outputs.values()), default=None)

    @property
    def queue_seconds(self) -> float | None:
        scheduled = [o.first_scheduled_time - o.arrival_time for o in self._outputs.values()
                     if o.first_scheduled_time is not None]
        return min(scheduled, default=None)

    @property
    def ttft_seconds(self) -> float | None:
        arrival = self._arrival()
        return None if arrival is None or self._first_token_at is None else self._first_token_at - arrival

    @property
    def stability_score(self) -> float | None:
        """The mean of the choices' scores (None: nothing generated)."""
        scores = [c.stability.score for o in self._outputs.values() for c in o.outputs if c.stability is not None]
        return sum(scores) / len(scores) if scores else None

    def output_texts(self) -> list[str]:
        return [c.text for _, o in sorted(self._outputs.items()) for c in o.outputs]


def status_of(http_status: int, meter: UsageMeter | None) -> str:
    if http_status == 499:
        return "aborted"
    if http_status >= 500:
        return "error"
    if http_status >= 400:
        return "rejected"
    if meter is not None and meter.has_failed:
        return "error"
    if meter is not None and not meter.is_finished:
        return "aborted"
    return "ok"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def usage_row(*, request_id: str, endpoint: str, http_status: int, created_at: float, seconds: float,
              user_id: str | None, key_prefix: str | None, model: str | None, meter: UsageMeter | None,
              log_prompts: bool) -> dict:
    """The usage record of a request whose response has ended. `model`: the model it named, once
    resolved; `meter`: None when it was refused before its handler knew what it asked for."""
    params = meter.params if meter is not None else None
    row = {
        "request_id": request_id, "created_at": created_at, "key_prefix": key_prefix, "user_id": user_id,
        "model": meter.model if meter is not None else model, "endpoint": endpoint,
        "stream": bool(meter is not None and meter.is_stream), "status": status_of(http_status, meter),
        "http_status": http_status, "finish_reason": meter.finish_reason if meter is not None else None,
        "prompt_tokens": meter.prompt_tokens if meter is not None else 0,
        "completion_tokens": meter.completion_tokens if meter is not None else 0,
        "queue_ms": _ms(meter.queue_seconds) if meter is not None else None,
        "ttft_ms": _ms(meter.ttft_seconds) if meter is not None else None, "total_ms": _ms(seconds),
        "temperature": params.temperature if params is not None else None,
        "top_p": params.top_p if params is not None else None,
        "precision": meter.precision if meter is not None else None,
        "act_stability_score": meter.stability_score if meter is not None else None,
        "prompt": None, "output": None,
    }
    if log_prompts and meter is not None:
        row["prompt"] = meter.prompt
        row["output"] = msgspec.json.encode(meter.output_texts()).decode() if meter.output_texts() else None
    return row
