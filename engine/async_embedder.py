"""An Embedder behind one worker thread, batching across requests.

Requests from the event loop queue up; when the worker gets free it takes
every waiting request that asks for the same normalisation (up to
`max_rows` inputs) and embeds them as one batch, so concurrent clients
share programs and padding instead of running one small batch each. One
worker per model also keeps its embeddings from competing with each other
for the CPU.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from typing import Sequence

import numpy as np

from engine.embedder import Embedder

log = logging.getLogger("balansis.embeddings")


@dataclasses.dataclass(slots=True)
class _Job:
    token_ids: Sequence[Sequence[int]]
    normalize: bool | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class AsyncEmbedder:
    def __init__(self, embedder: Embedder, *, max_rows: int = 256):
        self.embedder = embedder
        self.max_rows = max_rows
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wakeup = threading.Condition()
        self._is_stopped = False
        self._thread = threading.Thread(target=self._run, name="balansis-embed", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._is_stopped

    async def embed(self, token_ids: Sequence[Sequence[int]], *, normalize: bool | None = None) -> np.ndarray:
        """Vectors `[N, D]` of checked inputs (see Embedder.check), in order."""
        self.embedder.check(token_ids)
        loop = asyncio.get_running_loop()
        job = _Job(token_ids, normalize, loop.create_future(), loop)
        with self._wakeup:
            if self._is_stopped:
                raise RuntimeError("the embedder has stopped")
            self._jobs.append(job)
            self._wakeup.notify()
        return await job.future  # cancelled by a client that left: the worker skips it

    def shutdown(self, timeout: float | None = None) -> None:
        with self._wakeup:
            self._is_stopped = True
            self._wakeup.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._jobs and not self._is_stopped:
                    self._wakeup.wait()
                if self._is_stopped:
                    for job in self._jobs:
                        _settle(job, error=RuntimeError("the embedder has stopped"))
                    return
                batch = self._take_batch()
            if not batch:
                continue
            rows = [row for job in batch for row in job.token_ids]
            try:
                vectors = self.embedder.embed(rows, normalize=batch[0].normalize)
            except Exception as e:  # fail this batch's requests, keep serving
                log.exception("embedding a batch of %d inputs failed", len(rows))
                for job in batch:
                    _settle(job, error=e)
                continue
            start = 0
            for job in batch:
                _settle(job, result=vectors[start:start + len(job.token_ids)])
                start += len(job.token_ids)

    def _take_batch(self) -> list[_Job]:
        """The first waiting job, then later ones with the same normalisation while they fit."""
        first = self._jobs.popleft()
        batch, num_rows, kept = [first], len(first.token_ids), collections.deque()
        while self._jobs:
            job = self._jobs.popleft()
            if job.normalize == first.normalize and num_rows + len(job.token_ids) <= self.max_rows:
                batch.append(job)
                num_rows += len(job.token_ids)
            else:
                kept.append(job)
        self._jobs.extendleft(reversed(kept))
        return [job for job in batch if not job.future.cancelled()]


def _settle(job: _Job, *, result: np.ndarray | None = None, error: Exception | None = None) -> None:
    def settle() -> None:
        if job.future.done():  # cancelled meanwhile
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop has closed: nobody is waiting
        pass
