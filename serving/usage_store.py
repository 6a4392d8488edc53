"""Usage records in the server's database: written in batches off the request path, read by the admin API.

`submit` never blocks: rows go to a bounded queue that one writer thread
empties every `FLUSH_SECONDS` (or at `BATCH_ROWS`), in one transaction
per batch. A row whose request id is already stored is skipped (`ON
CONFLICT DO NOTHING`), so a retried write or a reused `X-Request-ID` is
stored once. When the database cannot take a batch (down, full, locked
past its timeout) the batch is dropped and counted (`on_dropped`, the
`balansis:usage_records_dropped_total` counter): requests are served
whatever the database does. So is a row that finds the queue full.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from serving.database import USAGE

log = logging.getLogger("balansis.serving")

FLUSH_SECONDS = 1.0
BATCH_ROWS = 500
MAX_PENDING = 20_000
STATUSES = ("ok", "error", "aborted", "rejected")


class UsageStore:
    def __init__(self, engine: Engine, *, on_dropped=None, flush_seconds: float = FLUSH_SECONDS,
                 max_pending: int = MAX_PENDING):
        """`on_dropped(n)`: n rows were lost (the queue was full, or the database refused them)."""
        self._engine = engine
        self._on_dropped = on_dropped
        self._flush_seconds = flush_seconds
        self._pending: queue.Queue[dict | None] = queue.Queue(maxsize=max_pending)
        self._idle = threading.Condition()
        self._num_unwritten = 0  # submitted and not yet written or dropped
        self._writer = threading.Thread(target=self._write_forever, name="balansis-usage", daemon=True)
        self._writer.start()

    # -- writing ----------------------------------------------------------------------
    def submit(self, row: dict) -> None:
        """Queue a row for the writer; never blocks (a full queue drops the row, counted)."""
        with self._idle:
            self._num_unwritten += 1
        try:
            self._pending.put_nowait(row)
        except queue.Full:
            self._done(1, dropped=True)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every row submitted so far is written or dropped; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._num_unwritten == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        self.flush(timeout)
        self._pending.put(None)
        self._writer.join(timeout)

    def _done(self, num_rows: int, *, dropped: bool) -> None:
        if dropped and self._on_dropped is not None:
            self._on_dropped(num_rows)
        with self._idle:
            self._num_unwritten -= num_rows
            self._idle.notify_all()

    def _write_forever(self) -> None:
        is_stopping = False
        while not is_stopping:
            batch: list[dict] = []
            deadline = time.monotonic() + self._flush_seconds
            while len(batch) < BATCH_ROWS:
                try:
                    row = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if row is None:
                    is_stopping = True
                    break
                batch.append(row)
            if batch:
                self._write(batch)

    def _write(self, batch: list[dict]) -> None:
        insert = (postgresql.insert if self._engine.dialect.name == "postgresql" else sqlite.insert)(USAGE)
        try:
            with self._engine.begin() as connection:
                connection.execute(insert.on_conflict_do_nothing(index_elements=["request_id"]), batch)
        except Exception as e:  # any failure of the database: the rows are lost, the server goes on
            log.warning("usage records: %d rows dropped, the database refused them: %s", len(batch), e)
            self._done(len(batch), dropped=True)
            return
        self._done(len(batch), dropped=False)

    # -- reading (the admin API) ------------------------------------------------------------
    def _where(self, *, key: str | None = None, user: str | None = None, model: str | None = None,
               since: float | None = None, until: float | None = None) -> list:
        conditions = []
        for column, value in ((USAGE.c.key_prefix, key), (USAGE.c.user_id, user), (USAGE.c.model, model)):
            if value is not None:
                conditions.append(column == value)
        if since is not None:
            conditions.append(USAGE.c.created_at >= since)
        if until is not None:
            conditions.append(USAGE.c.created_at < until)
        return conditions

    def rows(self, **filters) -> list[dict]:
        """Every row matching the filters (key, user, model, since, until), oldest first."""
        query = sa.select(USAGE).where(*self._where(**filters)).order_by(USAGE.c.created_at)
        with self._engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    def summary(self, **filters) -> tuple[dict, list[dict]]:
        """Totals of the matching rows, and the same per UTC day (oldest first)."""
        day = self._day()
        counts = [sa.func.count().label("requests"),
                  sa.func.coalesce(sa.func.sum(USAGE.c.prompt_tokens), 0).label("prompt_tokens"),
                  sa.func.coalesce(sa.func.sum(USAGE.c.completion_tokens), 0).label("completion_tokens"),
                  *[sa.func.coalesce(sa.func.sum(sa.case((USAGE.c.status == s, 1), else_=0)), 0).label(s)
                    for s in STATUSES]]
        where = self._where(**filters)
        with self._engine.connect() as connection:
            total = connection.execute(sa.select(*counts).where(*where)).one()._mapping
            days = connection.execute(sa.select(day.label("day"), *counts).where(*where)
                                      .group_by(day).order_by(day)).all()
        return _totals(total), [{"date": _date(row.day), **_totals(row._mapping)} for row in days]

    def _day(self):
        """The UTC day of a row, as days since the epoch (CAST truncates in SQLite, rounds in PostgreSQL)."""
        days = USAGE.c.created_at / 86_400
        if self._engine.dialect.name == "postgresql":
            return sa.cast(sa.func.floor(days), sa.Integer)
        return sa.cast(days, sa.Integer)

    def latencies(self, *, since: float) -> dict[str, dict[str, list]]:
        """Per model, since `since`: each request's status, total and first-token milliseconds, tokens."""
        query = (sa.select(USAGE.c.model, USAGE.c.status, USAGE.c.total_ms, USAGE.c.ttft_ms, USAGE.c.prompt_tokens,
                           USAGE.c.completion_tokens)
                 .where(USAGE.c.created_at >= since, USAGE.c.model.is_not(None)))
        out: dict[str, dict[str, list]] = {}
        with self._engine.connect() as connection:
            for row in connection.execute(query):
                columns = out.setdefault(row.model, {"status": [], "total_ms": [], "ttft_ms": [], "tokens": []})
                columns["status"].append(row.status)
                columns["total_ms"].append(row.total_ms)
                columns["ttft_ms"].append(row.ttft_ms)
                columns["tokens"].append(row.prompt_tokens + row.completion_tokens)
        return out


def _totals(row) -> dict:
    prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
    return {"requests": int(row["requests"]), **{s: int(row[s]) for s in STATUSES}, "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": prompt + completion}


def _date(day: int) -> str:
    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=int(day))).isoformat()
