"""Running engine and embedder requests for HTTP handlers: timing, outcomes, disconnects.

A completions body with several prompts is several engine requests; their
outputs are merged into one stream of `(prompt_index, RequestOutput)`.
Leaving a stream early (the client went away, or the handler failed)
cancels every request behind it, and `AsyncEngine` frees their KV blocks.
A streamed response holds its request's admission (`AdmittedStream`) and
gives it back when the response ends, however it ends; likewise its rate-limit
reservation (`Charge`), of which the tokens it did not use go back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Awaitable, Sequence, TypeVar

import anyio
import numpy as np
from litestar import Request
from litestar.response import ServerSentEvent

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.outputs import RequestOutput, RequestRejected
from engine.sampling import SamplingParams
from serving.errors import RequestError, rejected
from serving.auth import principal_of
from serving.metrics import ServingMetrics
from serving.rate_limits import RateLimiter, Reservation
from serving.state import Admission, ServedModel
from serving.usage import UsageMeter

T = TypeVar("T")

# Server-sent events: the media type (Litestar would otherwise use the
# handler's JSON one), and no caching or proxy buffering of the stream.
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class Charge:
    """One request's reservation from its caller's budget (None: nothing limits it) and its usage meter,
    whose tokens (prompt and generated, as the response's usage counts them) decide what goes back."""

    def __init__(self, reservation: Reservation | None, meter: UsageMeter):
        self.reservation = reservation
        self.meter = meter

    async def settle(self, *, refund_request: bool = False, is_free: bool = False) -> None:
        """Give back the tokens not used (and, with `refund_request`, the request: it was refused later,
        so it costs nothing; with `is_free`, every token: it was answered without the engine).
        Shielded: it runs even in a cancelled task (a client that left)."""
        if self.reservation is None:
            return
        used = 0 if refund_request or is_free else self.meter.total_tokens
        with anyio.CancelScope(shield=True):
            await self.reservation.release(used_tokens=used, refund_request=refund_request)


async def charge(request: Request, limiter: RateLimiter, *, tokens: int, meter: UsageMeter) -> Charge:
    """Start metering the request (its usage record reads the meter) and reserve `tokens` from the
    caller's budget (a 429 when it has not got them), before any queue. The response's rate-limit
    headers then say what is left."""
    request.state.usage = meter
    reservation = await limiter.reserve(principal_of(request).budget, tokens=tokens)
    if reservation is not None:
        add_headers(request, reservation.snapshot.headers())
    return Charge(reservation, meter)


def add_headers(request: Request, headers: dict[str, str]) -> None:
    """Headers for the response, whatever it turns out to be (serving.http_observer adds them)."""
    request.state.response_headers = {**getattr(request.state, "response_headers", {}), **headers}


async def admit(model: ServedModel, num_seqs: int, charge: Charge) -> Admission:
    """`model.admit`, giving the request back to the budget when the queue refuses it."""
    try:
        return model.admit(num_seqs)
    except RequestError:
        await charge.settle(refund_request=True)
        raise


class AdmittedStream(ServerSentEvent):
    """Server-sent events that hold an admission (and a charge) until the response ends.

    Released in a `finally` around the whole ASGI response, not in the
    events' generator: a client that leaves before the first byte never
    starts the generator, so its own `finally` would never run.
    """

    def __init__(self, events: AsyncIterator[str], *, admission: Admission, charge: Charge):
        super().__init__(events, headers=SSE_HEADERS)
        self._admission = admission
        self._charge = charge

    def to_asgi_response(self, *args, **kwargs):
        try:
            response = super().to_asgi_response(*args, **kwargs)
        except BaseException:
            self._admission.release()
            raise
        return _Releasing(response, self._admission, self._charge)


class _Releasing:
    """An ASGI response, then the admission's release and the charge's settlement."""

    def __init__(self, response, admission: Admission, charge: Charge):
        self._response = response
        self._admission = admission
        self._charge = charge

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._response(scope, receive, send)
        finally:
            self._admission.release()
            await self._charge.settle()


async def _tracked(engine: AsyncEngine, metrics: ServingMetrics, model: str, request_id: str,
                   prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
    """One engine request's outputs, timed; its outcome is counted however it ends."""
    tracker = metrics.tracker(model)
    last: RequestOutput | None = None
    outcome = "abort"  # unless it finishes or fails
    try:
        # aclosing: leaving early aborts the engine request now, not when the
        # generator happens to be collected.
        async with contextlib.aclosing(engine.generate(request_id, prompt_ids, params)) as outputs:
            async for output in outputs:
                tracker.observe(output)
                last = output
                if output.finished:
                    outcome = output.outputs[0].finish_reason or "stop"
                yield output
    except EngineDeadError as e:
        outcome = "error"
        raise RequestError(str(e), status_code=503) from None
    except ValueError as e:  # the engine refused the request (checked before, so rarely here)
        outcome = "error"
        raise RequestError(str(e), status_code=400) from None
    except RuntimeError as e:  # a failed engine step
        outcome = "error"
        raise RequestError(str(e), status_code=500, code="engine_error") from None
    finally:
        tracker.finish(last if outcome not in ("abort", "error") else None, outcome)


async def stream_requests(model: ServedModel, metrics: ServingMetrics, request_id: str,
                          prompts: Sequence[list[int]], params: Sequence[SamplingParams], meter: UsageMeter
                          ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of one engine request per prompt, as they come, tagged with the prompt's index; the
    request's usage meter sees every one."""
    async with contextlib.aclosing(_merged(model, metrics, request_id, prompts, params)) as outputs:
        async for index, output in outputs:
            meter.observe(index, output)
            yield index, output


async def _merged(model: ServedModel, metrics: ServingMetrics, request_id: str,
                  prompts: Sequence[list[int]], params: Sequence[SamplingParams]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    engine = model.ready_engine()
    streams = [_tracked(engine, metrics, model.name, f"{request_id}-{i}", ids, p)
               for i, (ids, p) in enumerate(zip(prompts, params))]
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()
        return
    merged: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await merged.put((index, output))
        except Exception as e:
            await merged.put(e)
        finally:
            await merged.put(done)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await merged.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_outputs(model: ServedModel, metrics: ServingMetrics, request_id: str,
                        prompts: Sequence[list[int]], params: Sequence[SamplingParams], meter: UsageMeter
                        ) -> list[RequestOutput]:
    """Each prompt's finished output, in prompt order."""
    finals: list[RequestOutput | None] = [None] * len(prompts)
    stream = stream_requests(model, metrics, request_id, prompts, params, meter)
    try:
        async for index, output in stream:
            finals[index] = output
    finally:
        await stream.aclose()
    return finals  # type: ignore[return-value]


async def embed_inputs(request: Request, metrics: ServingMetrics, model: ServedModel,
                       token_ids: Sequence[Sequence[int]], charge: Charge, *, normalize: bool | None = None
                       ) -> np.ndarray:
    """Vectors of checked inputs from the model's embedder (a 429 when its queue is full), counted;
    the charge is settled: its tokens used when the vectors came, given back otherwise."""
    started = time.time()
    try:
        embedder = model.ready_embedder()  # a 503 now (loading, draining) costs the caller nothing
    except RequestError:
        await charge.settle(refund_request=True)
        raise
    admission = await admit(model, 1, charge)
    outcome = "abort"  # unless it finishes or fails
    try:
        vectors = await unless_disconnected(request, embedder.embed(token_ids, normalize=normalize))
        outcome = "ok"
        charge.meter.embedded(sum(map(len, token_ids)))
        return vectors
    except RequestRejected as e:
        outcome = "error"
        raise rejected(e, prompt_param="input") from None
    except RuntimeError as e:  # the embedder stopped, or its batch failed
        outcome = "error"
        raise RequestError(str(e), status_code=503) from None
    finally:
        admission.release()
        await charge.settle()
        metrics.count_embeddings(model.name, started=started, outcome=outcome, num_inputs=len(token_ids),
                                 num_tokens=sum(map(len, token_ids)))


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves.

    Litestar watches for disconnects only while streaming; a non-streaming
    handler must listen itself. The body has been read, so the next ASGI
    message is the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
