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
import dataclasses
import queue
import threading
from typing import AsyncIterator

from engine.llm_engine import EngineStats, LLMEngine, RequestOutput
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
        self._thread = threading.Thread(target=self._run, name="balansis-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after each step that advances it.

        Raises ValueError (from the engine's checks) before the first output
        for a request the engine refuses. Leaving the loop early aborts it.
        """
        if not self.is_running:
            raise EngineDeadError("the engine has stopped")
        stream: asyncio.Queue = asyncio.Queue()
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
        while True:
            block = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    self._fail_all(EngineDeadError("the engine was shut down"))
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
                self._fail_all(RuntimeError(f"engine step failed: {e}"))
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
        except ValueError as e:
            _deliver((command.stream, command.loop), e)
            return
        self._streams[command.request_id] = (command.stream, command.loop)

    def _fail_all(self, error: Exception) -> None:
        for request_id, target in list(self._streams.items()):
            self.engine.abort_request(request_id)
            _deliver(target, error)
        self._streams.clear()


def _deliver(target: tuple[asyncio.Queue, asyncio.AbstractEventLoop], item) -> None:
    stream, loop = target
    try:
        loop.call_soon_threadsafe(stream.put_nowait, item)
    except RuntimeError:  # the caller's event loop has closed: nobody is listening
        pass
