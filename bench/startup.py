"""Time to ready: `balansis serve` with its defaults, from an empty compilation cache, then again on it.

    python -m bench.startup                 # cold, then warm, on the default model
    python -m bench.startup --peers vllm    # and vLLM's CPU backend's time to ready, in the same run

Each start runs the server as a user would (default flags: the full warm-up) with its own
cache folder (XDG_CACHE_HOME: compiled programs, converted GGUF tokenizers), empty for the
cold start and kept for the warm one, and
measures spawn to /ready 200 at the client. The server's `balansis:startup_seconds` gauge
gives each phase (load, place, compile, ready), its log the number of programs compiled.
After ready, one chat completion per prompt length (short, 200 and 1000 tokens, and 64 at
once) checks that nothing compiles while serving: the server is started with
`JAX_LOG_COMPILES=1`, and any compile logged after ready is counted. Results go to
`bench/results/startup-<UTC timestamp>.json`; a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import servers
from bench.results_file import RESULTS_DIR, write_report

_COMPILING = re.compile(r"compiling (\d+) programs")
_COMPILE_LOG = "Finished XLA compilation"  # what JAX_LOG_COMPILES logs per compiled program


def _phases(base_url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'balansis:startup_seconds\{[^}]*phase="(\w+)"[^}]*\} ([0-9.e+-]+)', text)}


async def _requests_after_ready(server: servers.Server) -> None:
    """Shapes a user sends first: short and long prompts, one stream and many."""
    import openai

    async with openai.AsyncOpenAI(base_url=server.api_url, api_key="none", max_retries=0, timeout=600) as client:
        async def chat(words: int, max_tokens: int = 8):
            await client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "word " * words}],
                max_tokens=max_tokens, temperature=0)

        for words in (5, 200, 1000):
            await chat(words)
        await asyncio.gather(*(chat(5 + i) for i in range(64)))


def _start(name: str, log_path: Path, cache_dir: Path | None) -> dict:
    extra = ("--compilation-cache", str(cache_dir)) if name == "balansis" else ()
    os.environ["JAX_LOG_COMPILES"] = "1"
    server = servers.start(name, max_streams=64, extra_args=extra, log_path=log_path)
    try:
        result = {"system": name, "ready_s": server.ready_s}
        if name == "balansis":
            result["phases_s"] = _phases(server.base_url)
            log = log_path.read_text(errors="replace")
            found = _COMPILING.search(log)
            result["programs"] = int(found.group(1)) if found else None
            compiles_at_ready = log.count(_COMPILE_LOG)
            asyncio.run(_requests_after_ready(server))
            time.sleep(1)
            result["compiles_after_ready"] = log_path.read_text(errors="replace").count(_COMPILE_LOG) - compiles_at_ready
    finally:
        server.stop()
    return result


def main(args: argparse.Namespace) -> int:
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="balansis-startup-cache-"))
    # Every cache the server keeps (compiled programs, converted tokenizers) starts empty.
    os.environ["XDG_CACHE_HOME"] = str(cache_dir)
    runs = []
    try:
        for attempt in ("cold", "warm"):
            print(f"-- balansis, {attempt} cache", flush=True)
            run = _start("balansis", results_dir / f"startup-balansis-{attempt}.log", cache_dir)
            runs.append({"cache": attempt, **run})
        for peer in args.peers:
            if not servers.is_installed(peer):
                raise SystemExit(f"{peer} is not installed (see bench/servers.py)")
            print(f"-- {peer}", flush=True)
            runs.append({"cache": "its own", **_start(peer, results_dir / f"startup-{peer}.log", None)})
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    report = {"benchmark": "startup", "cpus": os.cpu_count(), "load_average": os.getloadavg(), "runs": runs}
    path = write_report("startup", report, results_dir=results_dir)
    print("| system | cache | ready s | load s | place s | compile s | programs | compiles after ready |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        phases = run.get("phases_s", {})

        def cell(key):
            return f"{phases[key]:.1f}" if key in phases else "–"

        print(f"| {run['system']} | {run['cache']} | {run['ready_s']:.1f} | {cell('load')} | {cell('place')} | "
              f"{cell('compile')} | {run.get('programs') or '–'} | {run.get('compiles_after_ready', '–')} |")
    print(f"\n{path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", nargs="*", choices=servers.PEERS, default=[],
                        help="also time these peers' start (default: none)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes (default: %(default)s)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
