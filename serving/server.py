"""`balansis serve`: the app under uvicorn, with a graceful drain on SIGTERM.

Start-up: the port opens at once (/health answers, /ready says 503) while
the model loads and warms up in a thread; a model that fails to load ends
the process with exit code 2.

SIGTERM (or Ctrl-C): /ready and every new request answer 503, requests in
flight run to completion for up to --drain-timeout seconds, then uvicorn
shuts down and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

import uvicorn

from engine.engine_args import add_engine_arguments, engine_config_from_args
from serving.state import PRECISION_LEVELS, ServeConfig, ServerState

log = logging.getLogger("balansis.serving")
_DEFAULTS = ServeConfig(model_name="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="GGUF file or HF safetensors folder (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 in a container (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send and responses carry (default: the file or "
                             "folder name; SmolLM2-135M-Instruct for the default model)")
    parser.add_argument("--api-key", action="append", default=None,
                        help="accept this bearer key (repeatable); default: $BALANSIS_API_KEY, else no "
                             "authentication")
    parser.add_argument("--max-queue", type=int, default=_DEFAULTS.max_queue,
                        help="sequences admitted beyond --max-num-seqs before new requests get a 429 "
                             "(default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISION_LEVELS, default="standard",
                        help="numerics level (high and ultra come with the numerics work)")
    parser.add_argument("--drain-timeout", type=float, default=_DEFAULTS.drain_timeout,
                        help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--no-access-log", action="store_true", help="do not log each HTTP request")
    add_engine_arguments(parser)
    # A server warms up before it says it is ready: no compile while serving.
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip compiling every bucketed program at start (faster start, slower "
                             "first requests)")
    parser.set_defaults(warmup=True)


def serve_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from checkpoints.errors import CheckpointError
    from checkpoints.loader import load_model, model_name_for

    if args.model is not None and not Path(args.model).exists():
        raise CheckpointError(f"{args.model}: no such file or folder")
    keys = args.api_key if args.api_key is not None else (
        [os.environ["BALANSIS_API_KEY"]] if os.environ.get("BALANSIS_API_KEY") else [])
    config = ServeConfig(model_name=args.served_model_name or model_name_for(args.model),
                         api_keys=tuple(keys), max_queue=args.max_queue, precision=args.precision,
                         drain_timeout=args.drain_timeout)
    engine_config = engine_config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def load_engine():
        from engine.llm_engine import LLMEngine

        started = time.perf_counter()
        loaded = load_model(args.model)
        engine = LLMEngine(loaded, engine_config)
        log.info("loaded %s in %.1f s%s", config.model_name, time.perf_counter() - started,
                 " (warm-up included)" if engine_config.warmup else "")
        return engine

    server: _DrainingServer | None = None

    def on_load_failure(error: Exception) -> None:
        server.exit_code = 2
        server.should_exit = True

    state = ServerState(config, load_engine, on_load_failure=on_load_failure)
    from serving.app import create_app

    uvicorn_config = uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                    log_level=args.log_level, access_log=not args.no_access_log,
                                    timeout_graceful_shutdown=5, lifespan="on")
    server = _DrainingServer(uvicorn_config, state)
    server.run()
    return server.exit_code


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
