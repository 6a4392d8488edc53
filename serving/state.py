"""What the app's handlers share: the engine (once loaded), settings, metrics, admission.

`ServerState` is built by the factory and handed to handlers through
dependency injection; nothing lives in module globals. The model loads
(and warms up) in a thread started at app start-up, so /health answers at
once and /ready turns 200 only when requests can be served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Callable, Iterator

from engine.async_engine import AsyncEngine
from engine.llm_engine import EngineStats, LLMEngine
from serving.errors import ApiError
from serving.metrics import ServingMetrics

log = logging.getLogger("balansis.serving")

PRECISION_LEVELS = ("standard",)  # high and ultra come with the numerics work


@dataclasses.dataclass(frozen=True, slots=True)
class ServeConfig:
    """Server settings; `balansis serve` flags map onto these one to one."""

    model_name: str  # the name clients ask for and responses carry
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    # Sequences admitted beyond what the engine runs at once; more get a 429.
    max_queue: int = 256
    precision: str = "standard"
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    max_body_bytes: int = 16 * 2**20

    def __post_init__(self):
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.precision not in PRECISION_LEVELS:
            raise ValueError(f"precision {self.precision!r} is not available yet; levels: "
                             f"{', '.join(PRECISION_LEVELS)}")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")


class ServerState:
    def __init__(self, config: ServeConfig, load_engine: Callable[[], LLMEngine], *,
                 on_load_failure: Callable[[Exception], None] | None = None):
        self.config = config
        self._load_engine = load_engine
        self._on_load_failure = on_load_failure
        self.engine: AsyncEngine | None = None  # set once loaded and warmed up
        self.load_error: Exception | None = None
        self.is_draining = False
        self.num_in_flight_seqs = 0  # admitted sequences not yet finished
        self.num_admitted_requests = 0  # generation requests admitted and not yet done (what a drain waits for)
        self.metrics = ServingMetrics(model_name=config.model_name, stats=self.stats)
        self._loader: threading.Thread | None = None

    # -- loading ---------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="balansis-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            engine = self._load_engine()
        except Exception as e:  # any failure to load is fatal for the server
            log.error("cannot load the model: %s", e)
            self.load_error = e
            if self._on_load_failure is not None:
                self._on_load_failure(e)
            return
        self.engine = AsyncEngine(engine)
        log.info("model %s ready (%d KV blocks of %d tokens)", self.config.model_name,
                 engine.num_blocks, engine.config.block_size)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(timeout=10)

    # -- what handlers ask -------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_running and not self.is_draining

    def stats(self) -> EngineStats | None:
        return self.engine.stats if self.engine is not None else None

    def ready_engine(self) -> AsyncEngine:
        """The engine, or a 503 saying why requests cannot be served now."""
        if self.is_draining:
            raise ApiError("the server is shutting down", status_code=503)
        if self.engine is None:
            reason = "failed to load" if self.load_error else "is still loading"
            raise ApiError(f"the model {reason}", status_code=503)
        if not self.engine.is_running:
            raise ApiError("the engine has stopped", status_code=503)
        return self.engine

    @property
    def engine_core(self) -> LLMEngine:
        return self.ready_engine().engine

    def check_model(self, model: str | None) -> None:
        """A 404 for a model this server does not serve (no model: the served one)."""
        if model is not None and model != self.config.model_name:
            raise ApiError(f"the model '{model}' does not exist; this server serves "
                           f"'{self.config.model_name}'", status_code=404, code="model_not_found",
                           param="model")

    def check_capacity(self, num_seqs: int) -> None:
        """A 429 (or a 400 for a request larger than the whole queue) unless `num_seqs` fit now."""
        limit = self.engine_core.config.max_num_seqs + self.config.max_queue
        if num_seqs > limit:
            raise ApiError(f"the request needs {num_seqs} sequences (n × prompts); this server admits "
                           f"at most {limit}", status_code=400, code="invalid_value", param="n")
        if self.num_in_flight_seqs + num_seqs > limit:
            raise ApiError(f"the server is at capacity ({self.num_in_flight_seqs} sequences admitted, "
                           f"at most {limit}); retry later", status_code=429,
                           headers={"Retry-After": "1"})

    def admit(self, num_seqs: int) -> "Admission":
        """Admit `num_seqs` sequences now, or raise a 429 when the queue is full.

        A stream admits in its handler, before the response starts, and hands
        the Admission to its body, which releases it when it ends: checking in
        the handler and admitting in the body would let concurrent streams all
        pass the check, then fail inside a 200 response.
        """
        self.check_capacity(num_seqs)
        self.num_in_flight_seqs += num_seqs
        self.num_admitted_requests += 1
        return Admission(self, num_seqs)

    @contextlib.contextmanager
    def admitted(self, num_seqs: int) -> Iterator[None]:
        """Hold `num_seqs` sequences of admission for the `with` body, or raise a 429."""
        with self.admit(num_seqs):
            yield


class Admission:
    """Sequences admitted for one request; released once, by `release` or by leaving `with`."""

    def __init__(self, state: ServerState, num_seqs: int):
        self._state = state
        self._num_seqs = num_seqs
        self._is_released = False

    def release(self) -> None:
        if self._is_released:
            return
        self._is_released = True
        self._state.num_in_flight_seqs -= self._num_seqs
        self._state.num_admitted_requests -= 1

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *_) -> None:
        self.release()

    def __del__(self):
        # A stream whose body never started (the client left before the
        # first byte) never runs its `with`; dropping it releases the seats.
        self.release()
