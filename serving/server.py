"""`balansis serve`: the app under uvicorn, with a graceful drain on SIGTERM.

    balansis serve --model chat.gguf --model all-MiniLM-L6-v2/ --served-model-name chat --served-model-name minilm

Each --model is a decoder (GGUF file or HF folder: completions, chat and
embeddings) or a BERT sentence-transformers folder (embeddings only);
requests choose one by their `model` field.

Start-up: the port opens at once (/health answers, /ready says 503) while
the models load and warm up in a thread; a model that fails to load ends
the process with exit code 2.

SIGTERM (or Ctrl-C): /ready and every new request answer 503, requests in
flight run to completion for up to --drain-timeout seconds, then uvicorn
shuts down and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import jax
import uvicorn

from engine.engine_args import add_engine_arguments, engine_config_from_args, parse_memory
from engine.startup import StartupPhases
from model.pooling import PoolingMode
from serving import logs
from serving.api_keys import PRECISION_LEVELS
from serving.jwt_auth import JwtSettings
from serving.request_limits import RequestLimits
from serving.state import ModelSpec, ServeConfig, ServerState

log = logging.getLogger("balansis.serving")
_DEFAULTS = ServeConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="GGUF file, HF safetensors folder, or BERT sentence-transformers folder "
                             "(embeddings only); repeat to serve several models (default: "
                             "SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 in a container (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--served-model-name", action="append", default=None,
                        help="the model name clients send and responses carry, once per --model in the "
                             "same order (default: the file or folder name; SmolLM2-135M-Instruct for the "
                             "default model)")
    parser.add_argument("--embedding-pooling", choices=("last", "mean"), default="last",
                        help="how chat (decoder) models pool /v1/embeddings: the last token's or the mean "
                             "hidden state, then L2-normalised (default: %(default)s; encoders pool as "
                             "their folder says)")
    parser.add_argument("--api-key", action="append", default=None,
                        help="accept this bearer key as an admin key (repeatable); default: $BALANSIS_API_KEY")
    parser.add_argument("--require-auth", action="store_true",
                        help="require a key on every route but /health, /ready, /metrics and /docs: a stored "
                             "one (`balansis keys create`) or an --api-key; on whenever --api-key is given")
    jwt = parser.add_argument_group("JWT bearer tokens (one key source; exp and sub required)")
    jwt.add_argument("--jwt-secret", default=None,
                     help="HS256 secret of at least 32 bytes (default: $BALANSIS_JWT_SECRET)")
    jwt.add_argument("--jwt-public-key", default=None, metavar="FILE", help="PEM public key for RS256/ES256")
    jwt.add_argument("--jwt-jwks-url", default=None, metavar="URL", help="a JWKS of RS256/ES256 keys")
    jwt.add_argument("--jwt-issuer", default=None, help="the iss tokens must carry")
    jwt.add_argument("--jwt-audience", default=None, help="the aud tokens must carry")
    parser.add_argument("--max-auth-failures-per-minute", type=int, default=_DEFAULTS.max_auth_failures_per_minute,
                        help="refused credentials per client address in a minute before it gets 429s "
                             "(0: no limit; default: %(default)s)")
    parser.add_argument("--allowed-origins", nargs="+", default=(), metavar="ORIGIN",
                        help="CORS: browser origins that may call the API, e.g. https://app.example.com "
                             "('*': any; default: none)")
    parser.add_argument("--database-url", default=None,
                        help="the database of stored keys and usage records: sqlite:///PATH or postgresql://… "
                             "(default: $BALANSIS_DATABASE_URL, else ~/.local/share/balansis/balansis.db)")
    parser.add_argument("--allowed-precision", nargs="+", choices=PRECISION_LEVELS, default=None,
                        metavar="LEVEL",
                        help="the precision levels requests may ask for (standard, high, ultra); others get a "
                             "403; a key's own list narrows it further (default: all)")
    parser.add_argument("--redis-url", default=None,
                        help="keep the rate limits' budgets in Redis (redis://HOST:6379/0), shared by every "
                             "replica that names it (default: $BALANSIS_REDIS_URL, else this process's memory)")
    parser.add_argument("--response-cache", action="store_true",
                        help="answer repeated deterministic requests (not streamed; greedy or seeded) from a cache "
                             "of whole responses: in Redis with --redis-url, else in memory (default: off)")
    parser.add_argument("--response-cache-ttl", type=float, default=_DEFAULTS.response_cache_ttl,
                        help="seconds a cached response is kept (default: %(default)s)")
    limits = parser.add_argument_group("what one request may ask for")
    limits.add_argument("--max-body-size", type=_size, default=_DEFAULTS.max_body_bytes,
                        help="largest request body, e.g. 16MiB (default: 16MiB); more is a 413")
    limits.add_argument("--max-prompt-tokens", type=_positive, default=None,
                        help="longest prompt in tokens (default: the model's context)")
    limits.add_argument("--max-completion-tokens", type=_positive, default=None,
                        help="most new tokens a choice (max_tokens; an unset one is lowered to it; default: "
                             "the context)")
    limits.add_argument("--max-n", type=_positive, default=_DEFAULTS.limits.max_n,
                        help="most choices a request (n; default: %(default)s)")
    limits.add_argument("--max-logprobs", type=int, default=_DEFAULTS.limits.max_logprobs,
                        help="most alternatives a token for logprobs (default and most: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=_DEFAULTS.max_queue,
                        help="per model: sequences admitted beyond --max-num-seqs (embedding requests, "
                             "for an embedding model) before new requests get a 429 (default: %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=_DEFAULTS.drain_timeout,
                        help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("json", "text"), default=None,
                        help="one JSON object per line, or text (default: json when stdout is not a terminal)")
    parser.add_argument("--no-access-log", action="store_true", help="do not log each HTTP request")
    parser.add_argument("--log-prompts", action="store_true",
                        help="keep each request's prompt and output in its usage record (default: tokens and "
                             "timings only; prompts and outputs are never in the logs)")
    add_engine_arguments(parser)
    # A server warms up before it says it is ready: no compile while serving.
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip compiling every bucketed program at start (faster start, slower "
                             "first requests)")
    parser.set_defaults(warmup=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _size(text: str) -> int:
    value = parse_memory(text)
    if isinstance(value, float):
        raise argparse.ArgumentTypeError(f"a size such as 16MiB or 1000000, got {text!r}")
    return value


def serve_command(args: argparse.Namespace) -> int:
    if jax.process_index() != 0:
        return _follow(args)
    keys = args.api_key or []  # BALANSIS_API_KEY and the other variables arrive as flags (environment_flags)
    jwt = JwtSettings(secret=args.jwt_secret or None,
                      public_key_file=args.jwt_public_key, jwks_url=args.jwt_jwks_url, issuer=args.jwt_issuer,
                      audience=args.jwt_audience)
    config = ServeConfig(api_keys=tuple(keys), require_auth=args.require_auth, database_url=args.database_url,
                         redis_url=args.redis_url or None,
                         jwt=jwt, allowed_origins=tuple(args.allowed_origins), log_requests=not args.no_access_log,
                         log_prompts=args.log_prompts, response_cache=args.response_cache,
                         response_cache_ttl=args.response_cache_ttl,
                         allowed_precisions=tuple(args.allowed_precision or PRECISION_LEVELS),
                         max_auth_failures_per_minute=args.max_auth_failures_per_minute or None,
                         max_queue=args.max_queue, drain_timeout=args.drain_timeout,
                         max_body_bytes=args.max_body_size,
                         limits=RequestLimits(max_prompt_tokens=args.max_prompt_tokens,
                                              max_completion_tokens=args.max_completion_tokens,
                                              max_n=args.max_n, max_logprobs=args.max_logprobs))
    if args.precision not in config.allowed_precisions:
        raise ValueError(f"--precision {args.precision} is not among --allowed-precision "
                         f"{' '.join(config.allowed_precisions)}: requests that name no level would all be refused")
    models = model_specs(args)
    logs.configure(level=args.log_level, log_format=args.log_format)
    server: _DrainingServer | None = None

    def on_load_failure(error: Exception) -> None:
        server.exit_code = 2
        server.should_exit = True

    state = ServerState(config, models, on_load_failure=on_load_failure)
    from serving.app import create_app

    # Logging stays as logs.configure set it (log_config=None); the access log is ours.
    uvicorn_config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_config=None,
                                    log_level=args.log_level, access_log=False,
                                    timeout_graceful_shutdown=5, lifespan="on")
    server = _DrainingServer(uvicorn_config, state)
    server.run()
    return server.exit_code


def _follow(args: argparse.Namespace) -> int:
    """A process other than 0 of a multi-host server: load the model onto the global mesh,
    then make every compiled call process 0 makes (engine.distributed), until it stops."""
    specs = model_specs(args)
    if len(specs) != 1 or specs[0].is_encoder:
        raise ValueError("a server across several processes serves one decoder model")
    logs.configure(level=args.log_level, log_format=args.log_format)
    engine = specs[0].load(StartupPhases(specs[0].name))
    logging.getLogger(__name__).info("process %d follows process 0", jax.process_index())
    engine.runner.follow()
    return 0


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """One ModelSpec per --model (the default model when none), named by --served-model-name.

    Paths are checked now, before the port opens; the weights load later.
    """
    from pathlib import Path

    from checkpoints.encoder_dir import is_encoder_folder
    from checkpoints.errors import CheckpointError
    from checkpoints.loader import model_name_for

    paths = args.model or [None]
    names = args.served_model_name
    if names is not None and len(names) != len(paths):
        raise ValueError(f"give --served-model-name once per --model: {len(paths)} models, {len(names)} names")
    for path in paths:
        if path is not None and not Path(path).exists():
            raise CheckpointError(f"{path}: no such file or folder")
    names = names or [model_name_for(path) for path in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"served model names must differ, got {names}; set them with --served-model-name")
    engine_config = engine_config_from_args(args)
    pooling = PoolingMode(args.embedding_pooling)
    specs = []
    for path, name in zip(paths, names):
        if path is not None and is_encoder_folder(Path(path)):
            specs.append(ModelSpec(name, load=_encoder_loader(path), is_encoder=True))
        else:
            specs.append(ModelSpec(name, load=_decoder_loader(path, engine_config), embedding_pooling=pooling))
    return specs


def _decoder_loader(path, engine_config):
    def load(startup: StartupPhases):
        from checkpoints.loader import load_model
        from engine.llm_engine import LLMEngine

        with startup.phase("load"):
            loaded = load_model(path, dtype=engine_config.weight_dtype(), mesh=engine_config.mesh())
        return LLMEngine(loaded, engine_config, startup=startup)

    return load


def _encoder_loader(path):
    def load(startup: StartupPhases):
        from checkpoints.encoder_dir import load_encoder
        from engine.embedder import Embedder

        with startup.phase("load"):
            return Embedder.for_encoder(load_encoder(path))

    return load


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains instead of stopping."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._is_draining = False
        self._drain_task: asyncio.Future | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: it re-raises the signal after shutdown, which would
        # end the process with 128 + SIGTERM instead of 0.
        if self._is_draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._is_draining = True
        self.state.is_draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())  # a reference keeps the task alive

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.state.config.drain_timeout
        log.info("draining: %d requests in flight", self.state.num_admitted_requests)
        while self.state.num_admitted_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.num_admitted_requests:
            log.warning("drain timeout: %d requests still in flight", self.state.num_admitted_requests)
        self.should_exit = True
