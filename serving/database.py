"""The server's database: API keys, their audit trail, and usage records (one row per request).

SQLite (WAL) is the embedded default, a file under the user's data folder;
`--database-url postgresql://…` uses PostgreSQL, so replicas share one store.
One schema for both, written with SQLAlchemy Core. Migrations are plain
versioned steps (`MIGRATIONS`): `upgrade` applies those a database has not
seen, at server start and by `balansis db upgrade`, under a lock so two
replicas starting together do not apply a step twice. Times are seconds since
the epoch (a float), the same in both engines.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

METADATA = sa.MetaData()

API_KEYS = sa.Table(
    "api_keys", METADATA,
    sa.Column("prefix", sa.String(32), primary_key=True),  # shown to people, used to revoke
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # SHA-256 of the whole key, hex
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("user_id", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("models", sa.JSON, nullable=False),  # allowed model names; empty: all
    sa.Column("rpm", sa.Integer), sa.Column("tpm", sa.Integer),  # per-key overrides of the tier
    sa.Column("tokens_per_day", sa.BigInteger), sa.Column("max_parallel", sa.Integer),
    sa.Column("precisions", sa.JSON),  # allowed precision levels; empty or NULL: all the server allows
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float), sa.Column("revoked_at", sa.Float),
)

AUDIT_LOG = sa.Table(
    "audit_log", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),  # a key prefix, "static key", or "cli"
    sa.Column("action", sa.String(32), nullable=False),  # key.create, key.revoke
    sa.Column("object", sa.String(200), nullable=False),
    sa.Column("before", sa.JSON), sa.Column("after", sa.JSON),
)

USAGE = sa.Table(
    "usage_records", METADATA,
    sa.Column("request_id", sa.String(128), primary_key=True),  # X-Request-ID: a retried write is stored once
    sa.Column("created_at", sa.Float, nullable=False, index=True),  # the request's arrival
    sa.Column("key_prefix", sa.String(32), index=True),  # a stored key's display prefix
    sa.Column("user_id", sa.String(200), index=True),
    sa.Column("model", sa.String(200), index=True),  # None: refused before a model was chosen
    sa.Column("endpoint", sa.String(64), nullable=False),  # the route, e.g. /v1/chat/completions
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # ok, error, aborted, rejected
    sa.Column("http_status", sa.Integer, nullable=False),
    sa.Column("finish_reason", sa.String(32)),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("queue_ms", sa.Float), sa.Column("ttft_ms", sa.Float),
    sa.Column("total_ms", sa.Float, nullable=False),
    sa.Column("temperature", sa.Float), sa.Column("top_p", sa.Float), sa.Column("precision", sa.String(16)),
    sa.Column("act_stability_score", sa.Float),
    sa.Column("prompt", sa.Text), sa.Column("output", sa.Text),  # only with --log-prompts
)

_VERSIONS = sa.Table("schema_version", METADATA, sa.Column("version", sa.Integer, nullable=False))


def _v1(connection: Connection) -> None:
    for table in (API_KEYS, AUDIT_LOG):
        table.create(connection, checkfirst=True)


def _v2(connection: Connection) -> None:
    USAGE.create(connection, checkfirst=True)


def _v3(connection: Connection) -> None:
    # v1 creates api_keys from the table as defined now: a database made since has the column.
    if "precisions" not in {c["name"] for c in sa.inspect(connection).get_columns("api_keys")}:
        connection.execute(sa.text("ALTER TABLE api_keys ADD COLUMN precisions JSON"))


# Step i brings a database from version i to i + 1. Append; never edit a step that has shipped.
MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_v1, _v2, _v3)
SCHEMA_VERSION = len(MIGRATIONS)


def default_database_url() -> str:
    """$BALANSIS_DATABASE_URL, else SQLite in the user's data folder."""
    if os.environ.get("BALANSIS_DATABASE_URL"):
        return os.environ["BALANSIS_DATABASE_URL"]
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "balansis"
    return f"sqlite:///{data / 'balansis.db'}"


def connect(url: str | None = None, *, migrate: bool = True) -> Engine:
    """An engine for `url` (default_database_url when None), its schema brought up to date
    (unless `migrate` is False).

    `postgresql://…` goes through psycopg 3; a SQLite file's folder is created and the
    file runs in WAL mode (readers never wait for the writer). Raises ValueError for a
    URL of another kind and sqlalchemy's errors for a database that cannot be reached.
    """
    url = url or default_database_url()
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        engine = sa.create_engine(parsed, pool_pre_ping=True)
    else:
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://…")
    if migrate:
        upgrade(engine)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def upgrade(engine: Engine) -> tuple[int, int]:
    """Apply the migrations the database has not seen; (version before, version after)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return _upgrade(engine)
    with open(Path(database).expanduser().with_suffix(".migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # SQLite: one process migrates, the others wait
        return _upgrade(engine)


def _upgrade(engine: Engine) -> tuple[int, int]:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # one replica migrates, the others wait
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(8311)"))
        _VERSIONS.create(connection, checkfirst=True)
        before = connection.execute(sa.select(sa.func.max(_VERSIONS.c.version))).scalar() or 0
        if before > SCHEMA_VERSION:
            raise RuntimeError(f"the database is at schema version {before}, newer than this server's "
                               f"{SCHEMA_VERSION}: upgrade balansis")
        for version in range(before, SCHEMA_VERSION):
            MIGRATIONS[version](connection)
            connection.execute(_VERSIONS.insert().values(version=version + 1))
    return before, SCHEMA_VERSION


def schema_version(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.max(_VERSIONS.c.version))).scalar() or 0
