"""Start-up phases of a model: how long each took, logged as it ends, and the compile's progress.

A served model goes through `load` (checkpoint and tokenizer read), `place`
(weights converted and put on the mesh, the KV pool allocated), `compile`
(every bucketed program, when warming up) and is `ready`: the whole of it.
`StartupPhases` times each, logs a line as each ends, and keeps the seconds
for the `balansis:startup_seconds` gauge; the compile reports each finished
program, drawn as a progress bar on a terminal and as a log line every tenth
of the way otherwise (a container's log stays readable).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("balansis.startup")

PHASES = ("load", "place", "compile", "ready")


class StartupPhases:
    """Seconds per phase of one model's start, in the order they ran (thread-safe to read)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._started = time.perf_counter()
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (one of PHASES) and log it when it ends."""
        if name not in PHASES:
            raise ValueError(f"a start-up phase is one of {PHASES}, got {name!r}")
        started = time.perf_counter()
        yield
        self._record(name, time.perf_counter() - started)

    def ready(self, detail: str = "") -> None:
        """The model serves: record the whole start as `ready`."""
        self._record("ready", time.perf_counter() - self._started, detail)

    def _record(self, name: str, seconds: float, detail: str = "") -> None:
        with self._lock:
            self._seconds[name] = seconds
        log.info("%s: %s in %.1f s%s", self.model_name, name, seconds, f" ({detail})" if detail else "")

    def compile_progress(self, total: int) -> CompileProgress:
        return CompileProgress(self.model_name, total)


class CompileProgress:
    """Counts compiled programs: a progress bar (tqdm) on a terminal, else a log line per tenth."""

    def __init__(self, model_name: str, total: int):
        self.model_name = model_name
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"{model_name}: compiling", unit="program", leave=False)
        else:
            log.info("%s: compiling %d programs", model_name, total)

    def advance(self) -> None:
        """One more program compiled (from any thread)."""
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(1)
                if self.done == self.total:
                    self._bar.close()
            elif self.done == self.total or self.done * 10 // self.total > (self.done - 1) * 10 // self.total:
                log.info("%s: compiled %d/%d programs", self.model_name, self.done, self.total)
