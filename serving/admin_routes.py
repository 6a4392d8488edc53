"""The admin API (admin keys only; the app's guard checks the role): stored API keys, usage, statistics.

- POST /admin/keys: a new key; the plaintext is in this response only.
- GET /admin/keys: every key's record (never a plaintext or a hash).
- DELETE /admin/keys/{prefix}: revoke a key by its display prefix.
- GET /admin/usage?key=&user=&model=&since=&until=: the usage records' totals, and per UTC day.
- GET /admin/stats?since=: per model, requests, tokens and latency quantiles from the usage
  records (default: the last hour), and the engine's load now.

Each key change writes an audit row naming the caller (serving.api_keys).
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Annotated

import anyio.to_thread
from litestar import Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter

from serving.api_keys import ApiKey, KeyStore, Role, Tier, parse_duration
from serving.auth import principal_of
from serving.errors import ERROR_RESPONSES, RequestError
from serving.schemas import (CreatedKey, CreateKeyRequest, KeyList, KeyRecord, ModelStats, Quantiles, StatsReport,
                             UsageDay, UsageReport, UsageTotals)
from serving.state import ServerState
from serving.usage_store import UsageStore

_STATS_WINDOW_SECONDS = 3600


def _store(server: ServerState) -> KeyStore:
    if server.key_store is None:
        raise RequestError("this server has no key store (its database could not be opened at start)",
                           status_code=503, code="key_store_unavailable")
    return server.key_store


def key_record(record: ApiKey) -> KeyRecord:
    return KeyRecord(**record.as_json())


@post("/keys", summary="Admin: create an API key (the plaintext is shown once)", status_code=201,
      responses=ERROR_RESPONSES)
async def create_key(request: Request, data: JSONBody[CreateKeyRequest],
                     server: NamedDependency[ServerState]) -> CreatedKey:
    store = _store(server)
    try:
        expires_in = None if data.expires_in is None else parse_duration(data.expires_in)
    except ValueError as e:
        raise RequestError(str(e), param="expires_in") from None
    try:
        key, record = await anyio.to_thread.run_sync(lambda: store.create(
            name=data.name, actor=principal_of(request).actor, user_id=data.user_id, role=Role(data.role),
            tier=Tier(data.tier), models=tuple(data.models), rpm=data.rpm, tpm=data.tpm,
            tokens_per_day=data.tokens_per_day, max_parallel=data.max_parallel, precisions=tuple(data.precisions),
            expires_in=expires_in))
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split(" ", 1)[0]) from None
    return CreatedKey(key=key, record=key_record(record))


@get("/keys", summary="Admin: every stored API key", responses=ERROR_RESPONSES)
async def list_keys(server: NamedDependency[ServerState]) -> KeyList:
    records = await anyio.to_thread.run_sync(_store(server).list)
    return KeyList(object="list", data=[key_record(r) for r in records])


@delete("/keys/{prefix:str}", summary="Admin: revoke an API key by its display prefix", status_code=200,
        responses=ERROR_RESPONSES)
async def revoke_key(request: Request, prefix: FromPath[str], server: NamedDependency[ServerState]) -> KeyRecord:
    store = _store(server)
    record = await anyio.to_thread.run_sync(lambda: store.revoke(prefix, actor=principal_of(request).actor))
    if record is None:
        raise RequestError(f"no API key has the prefix {prefix!r}", status_code=404, code="key_not_found",
                           param="prefix")
    return key_record(record)


def _usage(server: ServerState) -> UsageStore:
    if server.usage_store is None:
        raise RequestError("this server has no usage store (its database could not be opened at start)",
                           status_code=503, code="usage_store_unavailable")
    return server.usage_store


def _instant(value: str | None, param: str) -> float | None:
    """Seconds since the epoch, or ISO 8601 (a date is its UTC midnight; a time without a zone is UTC)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise RequestError(f"{param} must be seconds since the epoch or an ISO 8601 date or time, got "
                               f"{value!r}", param=param) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    if not math.isfinite(seconds):
        raise RequestError(f"{param} must be a finite number of seconds, got {value!r}", param=param)
    return seconds


Filter = Annotated[str | None, Parameter(required=False, max_length=200)]


@get("/usage", summary="Admin: usage records' totals and per UTC day (filters: key, user, model, since, until)",
     responses=ERROR_RESPONSES)
async def usage(server: NamedDependency[ServerState], key: Filter = None, user: Filter = None,
                model: Filter = None, since: Filter = None, until: Filter = None) -> UsageReport:
    store = _usage(server)
    bounds = {"since": _instant(since, "since"), "until": _instant(until, "until")}
    totals, days = await anyio.to_thread.run_sync(lambda: store.summary(key=key, user=user, model=model, **bounds))
    return UsageReport(object="usage", **bounds, totals=UsageTotals(**totals),
                       days=[UsageDay(**day) for day in days])


@get("/stats", summary="Admin: per model, requests, tokens and latency since `since` (default: the last hour), "
     "and the engine's load now", responses=ERROR_RESPONSES)
async def stats(server: NamedDependency[ServerState], since: Filter = None) -> StatsReport:
    store = _usage(server)
    start = _instant(since, "since")
    start = time.time() - _STATS_WINDOW_SECONDS if start is None else start
    columns = await anyio.to_thread.run_sync(lambda: store.latencies(since=start))
    engines = dict(server.stats())
    models = []
    for name, served in server.models.items():
        rows = columns.get(name, {"status": [], "total_ms": [], "ttft_ms": [], "tokens": []})
        finished = [ms for ms, status in zip(rows["total_ms"], rows["status"]) if status == "ok"]
        engine = engines.get(name)
        state = "failed" if served.has_failed else "loaded" if served.is_ready else "loading"
        models.append(ModelStats(
            model=name, state=state, requests=len(rows["status"]),
            **{status: rows["status"].count(status) for status in ("ok", "error", "aborted", "rejected")},
            tokens=sum(rows["tokens"]), e2e_ms=_quantiles(finished),
            ttft_ms=_quantiles([ms for ms in rows["ttft_ms"] if ms is not None]),
            num_running=None if engine is None else engine.num_running,
            num_waiting=None if engine is None else engine.num_waiting,
            kv_cache_usage=None if engine is None else engine.kv_cache_usage))
    return StatsReport(object="stats", since=start, models=models)


def _quantiles(values: list[float]) -> Quantiles:
    """Nearest-rank quantiles."""
    if not values:
        return Quantiles(p50=None, p90=None, p99=None)
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return Quantiles(p50=rank(0.5), p90=rank(0.9), p99=rank(0.99))


ROUTES = [create_key, list_keys, revoke_key, usage, stats]
