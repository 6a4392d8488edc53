"""A bounded soak: many concurrent streams, clients that leave mid-stream, keys over their limits.

    python -m bench.soak                          # 200 streams for 120 s, with auth + limits, then without
    python -m bench.soak --streams 50 --seconds 30

`balansis serve` on the default model, run twice with the same load: once
with authentication, stored keys and their rate limits (most keys with
limits they never reach, so every request takes the reservation and refund
path; two keys with 20 requests a minute that they exceed), once open.
Each of `--streams` clients sends streamed chat completions back to back,
each with its own X-Request-ID; a quarter of them leave after their first
chunk. Checked afterwards: every stream that was not left ended with
`[DONE]` and no error; the engine went back to no running sequences and no
KV blocks in use; every request id sent has its usage record (the server is
stopped first, so its queue is written) with the status its client saw.
Reported: the server's RSS after warm-up and at the end, outcomes, time to
first token and end-to-end latency (p50/p99) with and without auth, and the
auth + limits path's own cost per request measured in-process (a stored
key's check and a reservation with its refund, p50/p99). Results go to
`bench/results/soak-<UTC timestamp>.json`; a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

from bench import servers
from bench.results_file import RESULTS_DIR, write_report
from bench.throughput import machine_info, source_revision

ADMIN_KEY = "soak-admin"
MODEL = "soak"
MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def _client(http: httpx.AsyncClient, keys: list[str], deadline: float, drop_fraction: float,
                  max_tokens: int, results: list[dict]) -> None:
    rng = random.Random()
    while time.monotonic() < deadline:
        request_id = f"soak-{uuid.uuid4().hex}"
        headers = {"X-Request-ID": request_id}
        if keys:
            headers["Authorization"] = f"Bearer {rng.choice(keys)}"
        leaves = rng.random() < drop_fraction
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
        result = {"request_id": request_id, "leaves": leaves, "outcome": "error", "ttft_s": None}
        started = time.perf_counter()
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                if response.status_code == 429:  # a key's limit (type requests/tokens) or a full queue
                    kind = json.loads(await response.aread())["error"]["type"]
                    result["outcome"] = "queue_full" if kind == "rate_limit_error" else "rate_limited"
                elif response.status_code != 200:
                    result["outcome"] = f"http_{response.status_code}"
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if result["ttft_s"] is None:
                            result["ttft_s"] = time.perf_counter() - started
                            if leaves:
                                result["outcome"] = "left"
                                break
                        if line == "data: [DONE]":
                            result["outcome"] = "done" if result["outcome"] != "stream_error" else "stream_error"
                        elif '"error"' in line[:20]:
                            result["outcome"] = "stream_error"
        except httpx.HTTPError as e:
            result["outcome"] = f"transport: {type(e).__name__}"
        result["e2e_s"] = time.perf_counter() - started
        results.append(result)


def _admin_key(server: servers.Server, **fields) -> str:
    response = httpx.post(server.base_url + "/admin/keys", json={"name": "soak", **fields},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    response.raise_for_status()
    return response.json()["key"]


def soak(args: argparse.Namespace, *, with_auth: bool, folder: Path) -> dict:
    database = folder / f"soak-{'auth' if with_auth else 'open'}.db"
    extra = ["--database-url", f"sqlite:///{database}", "--served-model-name", MODEL, "--max-queue", "1024",
             "--max-completion-tokens", str(args.max_tokens)]
    if with_auth:
        extra += ["--api-key", ADMIN_KEY, "--require-auth", "--max-auth-failures-per-minute", "0"]
    server = servers.start("balansis", max_streams=args.max_num_seqs, extra_args=tuple(extra), model=MODEL,
                           log_path=folder / f"server-{'auth' if with_auth else 'open'}.log")
    try:
        keys: list[str] = []
        if with_auth:
            keys = [_admin_key(server, tier="enterprise", rpm=1_000_000, tpm=100_000_000) for _ in range(6)]
            keys += [_admin_key(server, tier="free", rpm=20) for _ in range(2)]  # these go over their limit
        warm = httpx.post(server.api_url + "/chat/completions", json={"model": MODEL, "messages": MESSAGES,
                                                                       "max_tokens": 4},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"} if with_auth else {}, timeout=300)
        warm.raise_for_status()
        rss_start = _rss_bytes(server.process.pid)
        results: list[dict] = []

        async def run_clients():
            limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as http:
                deadline = time.monotonic() + args.seconds
                await asyncio.gather(*(_client(http, keys, deadline, args.drop_fraction, args.max_tokens, results)
                                       for _ in range(args.streams)))

        started = time.perf_counter()
        asyncio.run(run_clients())
        wall_s = time.perf_counter() - started
        # The engine lets go of everything: no running sequence, no KV block in use.
        metrics_text, settle_deadline = "", time.monotonic() + 60
        while time.monotonic() < settle_deadline:
            metrics_text = httpx.get(server.base_url + "/metrics", timeout=30).text
            if _metric(metrics_text, "balansis:num_requests_running") == 0 and \
                    _metric(metrics_text, "balansis:kv_cache_usage_perc") == 0:
                break
            time.sleep(0.5)
        rss_end = _rss_bytes(server.process.pid)
        running = _metric(metrics_text, "balansis:num_requests_running")
        kv_usage = _metric(metrics_text, "balansis:kv_cache_usage_perc")
        dropped_rows = _metric(metrics_text, "balansis:usage_records_dropped_total")
    finally:
        exit_code = server.stop()  # SIGTERM: the usage queue is written before the process ends
    return {"with_auth": with_auth, "wall_s": wall_s, "exit_code": exit_code, "rss_start_bytes": rss_start,
            "rss_end_bytes": rss_end, "running_after": running, "kv_cache_usage_after": kv_usage,
            "usage_records_dropped": dropped_rows, **_outcomes(results), **_rows_check(database, results)}


def _outcomes(results: list[dict]) -> dict:
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    done = [r for r in results if r["outcome"] == "done"]
    ttft = [r["ttft_s"] * 1000 for r in results if r["ttft_s"] is not None]
    e2e = [r["e2e_s"] * 1000 for r in done]

    def q(values, p):
        return float(np.percentile(values, p)) if values else None

    lost = [r for r in results if not r["leaves"] and r["outcome"] not in ("done", "rate_limited")]
    return {"requests": len(results), "outcomes": outcomes, "lost_responses": len(lost),
            "ttft_p50_ms": q(ttft, 50), "ttft_p99_ms": q(ttft, 99), "e2e_p50_ms": q(e2e, 50),
            "e2e_p99_ms": q(e2e, 99)}


def _rows_check(database: Path, results: list[dict]) -> dict:
    import sqlite3

    with sqlite3.connect(database) as connection:
        rows = dict(connection.execute("SELECT request_id, status FROM usage_records"))
    expected = {"done": "ok", "rate_limited": "rejected", "queue_full": "rejected"}
    missing = [r["request_id"] for r in results if r["request_id"] not in rows]
    mismatched = [r["request_id"] for r in results
                  if r["outcome"] in expected and rows.get(r["request_id"]) not in (None, expected[r["outcome"]])]
    left = [rows.get(r["request_id"]) for r in results if r["outcome"] == "left"]
    return {"usage_rows_missing": len(missing), "usage_rows_status_mismatched": len(mismatched),
            "left_rows_by_status": {s: left.count(s) for s in set(left)}}


def guard_cost(iterations: int = 5000) -> dict:
    """The auth + limits path alone, in-process: a stored key's check (cached, as on every request
    after its first) and a reservation with its refund, on the in-memory ledger."""
    from serving import database
    from serving.api_keys import KeyStore, Tier
    from serving.auth import Authenticator
    from serving.memory_rate_limits import MemoryLedger
    from serving.rate_limits import RateLimiter

    with tempfile.TemporaryDirectory() as folder:
        store = KeyStore(database.connect(f"sqlite:///{folder}/keys.db"))
        key, _ = store.create(name="bench", actor="bench", tier=Tier.ENTERPRISE, rpm=10**9, tpm=10**12)
        authenticator = Authenticator(store=store, required=True)
        limiter = RateLimiter(MemoryLedger())

        async def one() -> float:
            started = time.perf_counter()
            principal = authenticator.authenticate(f"Bearer {key}")
            reservation = await limiter.reserve(principal.budget, tokens=100)
            await reservation.release(used_tokens=40)
            return time.perf_counter() - started

        async def many() -> list[float]:
            return [await one() for _ in range(iterations)]

        seconds = asyncio.run(many())
    micros = np.array(seconds) * 1e6
    return {"iterations": iterations, "p50_us": float(np.percentile(micros, 50)),
            "p99_us": float(np.percentile(micros, 99))}


def table(runs: list[dict]) -> str:
    lines = ["| run | requests | done | left | rate-limited | lost | TTFT p50 / p99 ms | e2e p50 / p99 ms | "
             "RSS start → end MiB | running, KV after | usage rows missing |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        o = r["outcomes"]
        lines.append(
            f"| {'auth + limits' if r['with_auth'] else 'open'} | {r['requests']} | {o.get('done', 0)} | "
            f"{o.get('left', 0)} | {o.get('rate_limited', 0)} | {r['lost_responses']} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['e2e_p50_ms']:.0f} / {r['e2e_p99_ms']:.0f} | "
            f"{r['rss_start_bytes'] / 2**20:.0f} → {r['rss_end_bytes'] / 2**20:.0f} | "
            f"{r['running_after']:g}, {r['kv_cache_usage_after']:g} | {r['usage_rows_missing']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    load_average_before, source = os.getloadavg(), source_revision()
    with tempfile.TemporaryDirectory() as folder:
        runs = [soak(args, with_auth=True, folder=Path(folder)), soak(args, with_auth=False, folder=Path(folder))]
    report = {"benchmark": "soak", "source": source, "machine": machine_info(),
              "load_average_before": load_average_before, "streams": args.streams, "seconds": args.seconds,
              "drop_fraction": args.drop_fraction, "max_tokens": args.max_tokens, "runs": runs,
              "guard_cost": guard_cost(), "load_average_after": os.getloadavg()}
    path = write_report("soak", report, args.results_dir)
    print(f"{args.streams} concurrent streams for {args.seconds} s, {args.drop_fraction:.0%} leaving after their "
          f"first chunk:\n")
    print(table(runs))
    cost = report["guard_cost"]
    print(f"\nAuth + limits in-process (a stored key's check, a reservation and its refund): "
          f"p50 {cost['p50_us']:.0f} µs, p99 {cost['p99_us']:.0f} µs")
    print(f"\n{path}")
    return 0 if all(r["lost_responses"] == 0 and r["usage_rows_missing"] == 0 for r in runs) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=200, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long each run sends")
    parser.add_argument("--drop-fraction", type=float, default=0.25, help="clients that leave after a chunk")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per completion")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the server's sequences at once")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
