"""What the app's handlers share: the served models (once loaded), settings, metrics, admission.

`ServerState` is built by the factory and handed to handlers through
dependency injection; nothing lives in module globals. The models load
(and warm up) one after another in a thread started at app start-up, so
/health answers at once and /ready turns 200 only when every model can
serve.

One server serves several models, routed by the request's `model` field:
a decoder (LLMEngine) serves completions, chat and embeddings (pooled from
its hidden states); an encoder (an Embedder) serves embeddings only. A
request without `model` goes to the first model that can serve it, the
first encoder for embeddings.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Sequence

import anyio.to_thread
import jax
import msgspec

from engine.async_embedder import AsyncEmbedder
from engine.async_engine import AsyncEngine
from engine.embedder import Embedder
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, ModelInfo
from engine.sampling import SamplingParams
from engine.startup import StartupPhases
from model.numerics import Precision
from model.pooling import PoolingMode
from serving import database
from serving.api_keys import PRECISION_LEVELS, KeyStore
from serving.auth import ANONYMOUS, Authenticator, FailureLimit, Principal, principal_of
from serving.errors import RequestError
from serving.jwt_auth import JwtSettings, JwtVerifier
from serving.rate_limits import RateLimiter, ledger_for
from serving.usage import UsageMeter
from serving.usage_store import UsageStore
from serving.request_limits import RequestLimits
from serving.response_cache import ResponseCache
from serving.metrics import ServingMetrics

log = logging.getLogger("balansis.serving")


@dataclasses.dataclass(frozen=True, slots=True)
class ServeConfig:
    """Server settings; `balansis serve` flags map onto these one to one."""

    api_keys: tuple[str, ...] = ()  # static admin keys; empty (and not require_auth): no authentication
    require_auth: bool = False  # authenticate with the stored keys (serving.api_keys) too
    database_url: str | None = None  # the key store's (serving.database); None: the default SQLite file
    redis_url: str | None = None  # rate-limit budgets shared by replicas (serving.rate_limits); None: in memory
    # Whole responses of deterministic requests (serving.response_cache), in Redis when redis_url is set.
    response_cache: bool = False
    response_cache_ttl: float = 3600.0
    jwt: JwtSettings = JwtSettings()  # bearer JWTs (serving.jwt_auth); off unless a key source is given
    # Precision levels requests may ask for (serving.auth.Principal.check_precision); a key narrows them.
    allowed_precisions: tuple[str, ...] = PRECISION_LEVELS
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins allowed to call the API ("*": any)
    log_requests: bool = True  # an access-log line per request (serving.http_observer)
    log_prompts: bool = False  # keep prompts and outputs in the usage records (serving.usage)
    # Refused credentials per client address and minute before its requests get 429s; None: no limit.
    max_auth_failures_per_minute: int | None = 10
    # Per model: sequences (embedding requests for an encoder) admitted beyond
    # what runs at once; more get a 429.
    max_queue: int = 256
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    max_body_bytes: int = 16 * 2**20
    limits: RequestLimits = RequestLimits()  # the operator's bounds on one request (serving.request_limits)

    def __post_init__(self):
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if not self.allowed_precisions or any(p not in PRECISION_LEVELS for p in self.allowed_precisions):
            raise ValueError(f"allowed_precisions must be some of {list(PRECISION_LEVELS)}, "
                             f"got {list(self.allowed_precisions)}")
        if self.response_cache_ttl <= 0:
            raise ValueError(f"response_cache_ttl must be positive, got {self.response_cache_ttl}")
        if self.max_auth_failures_per_minute is not None and self.max_auth_failures_per_minute < 1:
            raise ValueError(f"max_auth_failures_per_minute must be None or at least 1, "
                             f"got {self.max_auth_failures_per_minute}")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model to serve: its name, how to load it, and what it is."""

    name: str  # what clients send as `model` and responses carry
    # An LLMEngine for a decoder, an Embedder for an encoder, timing its phases in the StartupPhases.
    load: Callable[[StartupPhases], LLMEngine | Embedder]
    is_encoder: bool = False  # embeddings only
    embedding_pooling: PoolingMode = PoolingMode.LAST  # how a decoder pools its embeddings


class ServedModel:
    """One model of the server: loaded or not, its engines, its admission counts."""

    def __init__(self, spec: ModelSpec, server: ServerState):
        self.spec = spec
        self.name = spec.name
        self._server = server
        self.engine: AsyncEngine | None = None  # decoders: set once loaded and warmed up
        self.embedder: AsyncEmbedder | None = None  # every model, once loaded
        self.load_error: Exception | None = None
        self.created = 0  # when it finished loading (Unix seconds)
        self.num_in_flight_seqs = 0  # admitted sequences (encoders: embedding requests) not yet finished
        self.startup = StartupPhases(spec.name)  # how long each phase of its start took

    @property
    def can_generate(self) -> bool:
        return not self.spec.is_encoder

    def load(self) -> None:
        loaded = self.spec.load(self.startup)
        if isinstance(loaded, LLMEngine):
            self.engine = AsyncEngine(loaded)
            embedder = Embedder.for_decoder(loaded.loaded, pooling=self.spec.embedding_pooling,
                                            max_length=loaded.max_model_len)
            detail = f"{loaded.num_blocks} KV blocks of {loaded.config.block_size} tokens"
        else:
            embedder = loaded
            detail = f"{embedder.dimensions}-dimensional embeddings"
        self.embedder = AsyncEmbedder(embedder)
        self.created = int(time.time())
        self.startup.ready(detail)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown(timeout=10)
        if self.embedder is not None:
            self.embedder.shutdown(timeout=10)

    @property
    def is_ready(self) -> bool:
        return self.embedder is not None and (self.engine is None or self.engine.is_running)

    @property
    def has_failed(self) -> bool:
        """Failed to load, or its engine thread has stopped."""
        return self.load_error is not None or (self.engine is not None and not self.engine.is_running)

    def stats(self) -> EngineStats | None:
        return self.engine.stats if self.engine is not None else None

    # -- what handlers ask ---------------------------------------------------------
    def _check_loaded(self) -> None:
        """A 503 saying why requests cannot be served now."""
        if self._server.is_draining:
            raise RequestError("the server is shutting down", status_code=503)
        if self.embedder is None:
            reason = "failed to load" if self.load_error else "is still loading"
            raise RequestError(f"the model '{self.name}' {reason}", status_code=503)
        if self.engine is not None and not self.engine.is_running:
            raise RequestError(f"the engine of '{self.name}' has stopped", status_code=503)

    def ready_engine(self) -> AsyncEngine:
        self._check_loaded()
        assert self.engine is not None, "routing sends only decoders here"
        return self.engine

    @property
    def engine_core(self) -> LLMEngine:
        """The decoder's engine, for the request checks and prompt-dependent defaults
        (LLMEngine.check_request, .info); requests go through `ready_engine`."""
        return self.ready_engine().engine

    def precision_of(self, params: SamplingParams) -> str:
        """The level a request with `params` runs at: its own, else the engine's default."""
        return Precision(params.precision).value if params.precision is not None else self.engine_core.config.precision

    def ready_embedder(self) -> AsyncEmbedder:
        self._check_loaded()
        return self.embedder

    @property
    def info(self) -> ModelInfo:
        """Tokenizer, vocabulary size and maximum length (of a decoder's engine, or an encoder's input)."""
        if self.can_generate:
            return self.engine_core.info
        return self.ready_embedder().embedder.info

    def _capacity(self) -> int:
        if self.can_generate:
            return self.engine_core.config.max_num_seqs + self._server.config.max_queue
        self._check_loaded()
        return 1 + self._server.config.max_queue  # one request embeds while the rest wait

    def check_capacity(self, num_seqs: int) -> None:
        """A 429 (or a 400 for a request larger than the whole queue) unless `num_seqs` fit now."""
        limit = self._capacity()
        if num_seqs > limit:
            raise RequestError(f"the request needs {num_seqs} sequences (n × prompts); this server admits "
                               f"at most {limit}", status_code=400, code="invalid_value", param="n")
        if self.num_in_flight_seqs + num_seqs > limit:
            raise RequestError(f"the server is at capacity for '{self.name}' ({self.num_in_flight_seqs} "
                               f"admitted, at most {limit}); retry later", status_code=429,
                               headers={"Retry-After": "1"})

    def admit(self, num_seqs: int) -> "Admission":
        """Admit `num_seqs` sequences now, or raise a 429 when the queue is full.

        A stream admits in its handler, before the response starts, and hands
        the Admission to its response (serving.generation.AdmittedStream),
        which releases it when the response ends, however it ends: checking in
        the handler and admitting in the body would let concurrent streams all
        pass the check, then fail inside a 200 response. An embedding request
        counts as one.
        """
        self.check_capacity(num_seqs)
        self.num_in_flight_seqs += num_seqs
        self._server.num_admitted_requests += 1
        return Admission(self, num_seqs)

    def _release(self, num_seqs: int) -> None:
        self.num_in_flight_seqs -= num_seqs
        self._server.num_admitted_requests -= 1


class ServerState:
    def __init__(self, config: ServeConfig, models: Sequence[ModelSpec], *,
                 on_load_failure: Callable[[Exception], None] | None = None):
        if not models:
            raise ValueError("a server needs at least one model")
        names = [spec.name for spec in models]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must differ, got {names}")
        self.config = config
        self.models = {spec.name: ServedModel(spec, self) for spec in models}
        self._on_load_failure = on_load_failure
        self.is_draining = False
        self.num_admitted_requests = 0  # requests admitted and not yet done (what a drain waits for)
        self.metrics = ServingMetrics(stats=self.stats, startup=self.startup_seconds)
        self._loader: threading.Thread | None = None
        database_engine = _database(config)
        self.key_store = KeyStore(database_engine) if database_engine is not None else None
        self.usage_store = (UsageStore(database_engine, on_dropped=self.metrics.usage_records_dropped.inc)
                            if database_engine is not None else None)
        self.auth_failure_limit = (None if config.max_auth_failures_per_minute is None
                                   else FailureLimit(config.max_auth_failures_per_minute))
        self.rate_limiter = RateLimiter(
            ledger_for(config.redis_url), on_refusal=lambda limit: self.metrics.rate_limited.labels(limit).inc(),
            on_unavailable=self.metrics.rate_limits_unavailable.inc)
        self.response_cache = (ResponseCache(ttl_seconds=config.response_cache_ttl, redis_url=config.redis_url)
                               if config.response_cache else None)
        self.authenticator = Authenticator(static_keys=config.api_keys, store=self.key_store,
                                           required=config.require_auth,
                                           jwt=JwtVerifier(config.jwt) if config.jwt.is_on else None)

    # -- loading ---------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="balansis-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        for model in self.models.values():
            try:
                model.load()
            except Exception as e:  # any failure to load is fatal for the server
                log.error("cannot load the model %s: %s", model.name, e)
                model.load_error = e
                if self._on_load_failure is not None:
                    self._on_load_failure(e)
                return

    def shutdown(self) -> None:
        for model in self.models.values():
            model.shutdown()

    async def close_connections(self) -> None:
        await self.rate_limiter.close()
        if self.response_cache is not None:
            await self.response_cache.close()
        if self.usage_store is not None:  # what is queued is written first
            await anyio.to_thread.run_sync(self.usage_store.close)

    def record_usage(self, row: dict) -> None:
        """Queue a request's usage record (serving.usage_store); counted as dropped without a database."""
        if self.usage_store is None:
            self.metrics.usage_records_dropped.inc()
        else:
            self.usage_store.submit(row)

    def check_precision(self, request, model: "ServedModel", params: SamplingParams, *, param: str) -> None:
        """A 403 unless the level `params` runs at (the model's default when unset) is one this server
        and the caller's key allow (`param`: the body field that names it)."""
        level = model.precision_of(params)
        if level not in self.config.allowed_precisions:
            allowed = ", ".join(self.config.allowed_precisions)
            raise RequestError(f"this server does not run the {level!r} precision level (it allows {allowed})",
                               status_code=403, code="precision_not_allowed", param=param)
        principal_of(request).check_precision(level, param=param)

    def meter(self, model: "ServedModel", *, params: SamplingParams | None = None, is_stream: bool = False,
              num_prompts: int = 1, is_prompt_only: bool = False,
              prompt: Callable[[], object] | None = None) -> UsageMeter:
        """A usage meter for a request to `model` (serving.usage); `prompt()` gives what the request asked
        (a string or JSON-able value), called only with --log-prompts."""
        precision = None if params is None else model.precision_of(params)
        text = None
        if self.config.log_prompts and prompt is not None:
            value = prompt()
            text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        return UsageMeter(model=model.name, is_stream=is_stream, num_prompts=num_prompts, params=params,
                          precision=precision, is_prompt_only=is_prompt_only, prompt=text)

    # -- what handlers ask -------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return not self.is_draining and all(m.is_ready for m in self.models.values())

    @property
    def load_error(self) -> Exception | None:
        return next((m.load_error for m in self.models.values() if m.load_error is not None), None)

    def startup_seconds(self) -> list[tuple[str, dict[str, float]]]:
        """Per model, the seconds of each start-up phase it has finished (engine.startup)."""
        return [(name, model.startup.seconds) for name, model in self.models.items()]

    def stats(self) -> list[tuple[str, EngineStats]]:
        return [(m.name, s) for m in self.models.values() if (s := m.stats()) is not None]

    def model_for(self, request, name: str | None, *, generate: bool = False, embed: bool = False) -> ServedModel:
        """`model` for a request that runs a model: as its caller may use it, and named in its usage
        record even when it is refused before it runs."""
        model = self.model(name, generate=generate, embed=embed, principal=principal_of(request))
        request.state.model_name = model.name
        return model

    def model(self, name: str | None, *, generate: bool = False, embed: bool = False,
              principal: Principal = ANONYMOUS) -> ServedModel:
        """The model a request names (None: the first that serves it and `principal` may use), or a
        404; a 403 when `principal`'s key may not use it.

        `generate`: the request completes or chats, which encoders cannot.
        `embed`: the request asks for embeddings, which a decoder served across
        several processes cannot give (they would run on process 0 alone).
        """
        if self.is_draining:
            raise RequestError("the server is shutting down", status_code=503)
        if name is None:
            models = [m for m in self.models.values() if not principal.models or m.name in principal.models]
            if generate:
                models = [m for m in models if m.can_generate]
            else:  # embeddings: an embedding model before a chat model
                models.sort(key=lambda m: m.can_generate)
            if not models:
                raise RequestError("this server has no model that generates text; it serves embeddings only",
                                   status_code=404, code="model_not_found", param="model")
            return models[0]
        model = self.models.get(name)
        if model is None:
            served = ", ".join(f"'{n}'" for n in self.models)
            raise RequestError(f"the model '{name}' does not exist; this server serves {served}",
                               status_code=404, code="model_not_found", param="model")
        principal.check_model(model.name)
        if generate and not model.can_generate:
            raise RequestError(f"'{name}' is an embedding model; it serves /v1/embeddings only",
                               status_code=404, code="model_not_supported", param="model")
        if embed and model.can_generate and jax.process_count() > 1:
            raise RequestError(f"'{model.name}' is served across {jax.process_count()} processes, which serves "
                               f"completions and chat only, not embeddings",
                               status_code=404, code="model_not_supported", param="model")
        return model


def _database(config: ServeConfig):
    """The server's database (stored keys, usage records); without it (unreachable, unwritable) the
    server still serves when it needs no stored keys, and refuses to start when it does."""
    try:
        return database.connect(config.database_url)
    except Exception as e:
        if config.require_auth:
            raise
        log.warning("no database (%s): stored API keys, /admin/keys and usage records are unavailable", e)
        return None


class Admission:
    """Sequences admitted for one request; `release` gives them back (once, however often called)."""

    def __init__(self, model: ServedModel, num_seqs: int):
        self._model = model
        self._num_seqs = num_seqs
        self._is_released = False

    def release(self) -> None:
        if self._is_released:
            return
        self._is_released = True
        self._model._release(self._num_seqs)
