"""A live server on a free port, for tests through the official `openai` SDK.

The app runs under uvicorn in a thread of the test process, on the tiny
random model with SmolLM2's tokenizer (real text, fast steps). Tests that
need a process of their own (SIGTERM) start `balansis serve` instead.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from engine.llm_engine import EngineConfig, LLMEngine
from serving.app import create_app
from serving.state import ModelSpec, ServeConfig, ServerState

MODEL = "tiny"
# Small but real limits: 8 sequences at once, a 4 MiB KV cache (128 blocks of 16 tokens).
ENGINE_CONFIG = EngineConfig(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128,
                             kv_cache_memory=4 * 2**20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, processes, timeout: float = 300) -> bool:
    """Poll `url`/ready until it answers 200 while every process runs; False if one exits
    first or time runs out (for servers started as processes of their own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return True
        time.sleep(0.2)
    return False


class LiveServer:
    """uvicorn serving `create_app(state)` in a thread; `url` is the base URL."""

    def __init__(self, state: ServerState):
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(state)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, *, wait_ready: bool = True, timeout: float = 300) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(self.url + "/ready", timeout=5).status_code
                if status == 200 or not wait_ready:  # any answer: the port is open
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"the server did not {'become ready' if wait_ready else 'answer'} within {timeout} s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def start_server(loaded, *, engine_config: EngineConfig = ENGINE_CONFIG, wait_ready: bool = True,
                 **serve_config) -> LiveServer:
    state = ServerState(ServeConfig(**serve_config), [ModelSpec(MODEL, lambda startup: LLMEngine(loaded, engine_config, startup=startup))])
    return LiveServer(state).start(wait_ready=wait_ready)


@pytest.fixture(scope="session")
def live_server(tiny_loaded):
    """One shared server: no API keys, the default queue."""
    server = start_server(tiny_loaded)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_loaded, tmp_path_factory):
    """The tiny model as a folder `balansis serve --model` can load: weights, config, tokenizer
    (for tests that need a server process of its own)."""
    import os
    import shutil

    folder = tmp_path_factory.mktemp("tiny-served")
    for name in os.listdir(tiny_loaded.path):
        shutil.copy(tiny_loaded.path / name, folder / name)
    tiny_loaded.tokenizer._hf.save_pretrained(folder)
    return folder
