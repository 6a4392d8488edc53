"""`AsyncEngine`: the engine for an asyncio server.

Thread pipeline (shared/DESIGN.md, decision 3):

    event loop                          engine thread
    ----------                          -------------
    generate() ── commands queue ──►    add_request / abort_request
                                        step()  (XLA runs here, never on the loop)
    per-request asyncio.Queue  ◄──      call_soon_threadsafe(put_nowait, output)

The engine thread owns the `LLMEngine`; nothing else touches it. It sleeps
on the command queue when there is no work. A caller that stops iterating
(a client that disconnected) aborts its request, and the abort frees the
request's KV blocks at the next turn of the engine loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
from typing import AsyncIterator

from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.sampling import SamplingParams


@dataclasses.dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclasses.dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


_STOP = object()
log = logging.getLogger("balansis.engine")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        # Replaced (never mutated) by the engine thread after each turn, so
        # other threads read a consistent snapshot without a lock.
        self.stats: EngineStats = engine.stats()
        self._lock = threading.Lock()  # orders new requests against the thread stopping
        self._is_stopped = False
        self._thread = threading.Thread(target=self._run, name="balansis-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._is_stopped

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after each step that advances it.

        Raises ValueError (from the engine's checks) before the first output
        for a request the engine refuses. Leaving the loop early aborts it.
        """
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._is_stopped:
                raise EngineDeadError("the engine has stopped")
            self._commands.put(_Add(request_id, list(prompt_ids), params, stream, asyncio.get_running_loop()))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine thread; unfinished requests are aborted."""
        self._commands.put(_STOP)
        self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve_commands()
        except BaseException:  # a bug, not a bad request: say so, then fail what is waiting
            log.exception("the engine thread failed")
        finally:
            with self._lock:  # after this no request can be queued, so none is left unanswered
                self._is_stopped = True
            self._fail_all(EngineDeadError("the engine has stopped"))
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Add):
                    _deliver((command.stream, command.loop), EngineDeadError("the engine has stopped"))

    def _serve_commands(self) -> None:
        while True:
            block = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    return
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished_requests():
                self.stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed; its requests are aborted")
                self._fail_all(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            # Stats first: a client that has its answer sees it in the metrics.
            self.stats = self.engine.stats()
            for output in outputs:
                target = self._streams.get(output.request_id)
                if target is None:
                    continue
                _deliver(target, output)
                if output.finished:
                    del self._streams[output.request_id]

    def _handle(self, command) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._streams.pop(command.request_id, None)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_ids, command.params)
        except ValueError as e:  # the engine refuses the request
            _deliver((command.stream, command.loop), e)
            return
        except Exception as e:  # a bug: this request fails, the engine goes on
            log.exception("cannot add request %s", command.request_id)
            _deliver((command.stream, command.loop), RuntimeError(f"cannot add the request: {e}"))
            return
        self._streams[command.request_id] = (command.stream, command.loop)

    def _fail_all(self, error: Exception) -> None:
        streams, self._streams = self._streams, {}
        for request_id, target in streams.items():
            _deliver(target, error)
            with contextlib.suppress(Exception):  # the engine may be what failed
                self.engine.abort_request(request_id)


def _deliver(target: tuple[asyncio.Queue, asyncio.AbstractEventLoop], item) -> None:
    stream, loop = target
    try:
        loop.call_soon_threadsafe(stream.put_nowait, item)
    except RuntimeError:  # the caller's event loop has closed: nobody is listening
        pass
