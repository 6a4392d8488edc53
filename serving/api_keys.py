"""API keys in the database: created, listed, revoked, verified; every change audited.

A key is `sk-` + 32 random bytes (url-safe base64). Only its SHA-256 is
stored, with a short display prefix (the key's first 12 characters) that
people see and revoke by; the plaintext is returned once, by `create`. A key
carries its owner (`user_id`), role (`admin` or `user`), tier (`free`, `pro`,
`enterprise`), the models it may use (empty: all), the precision levels it may
ask for (empty: all the server allows), optional per-key limits overriding its
tier's, an expiry and a revocation time.

`verify` runs on every authenticated request, so it keeps what it read for a
few seconds (`CACHE_SECONDS`); a revocation through this store clears that at
once, and another replica's revocation is seen within those seconds.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import secrets
import threading
import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from model.numerics import Precision
from serving.database import API_KEYS, AUDIT_LOG

KEY_PREFIX = "sk-"
DISPLAY_LENGTH = 12  # "sk-" and 9 characters of the random part
CACHE_SECONDS = 5.0
PRECISION_LEVELS = tuple(p.value for p in Precision)
_DRAWS = 4  # fresh keys tried when a display prefix is taken, before the error is the caller's


class Role(enum.Enum):
    ADMIN = "admin"
    USER = "user"


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key's record (never its plaintext)."""

    prefix: str
    name: str
    user_id: str
    role: Role
    tier: Tier
    models: tuple[str, ...] = ()  # empty: every model
    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    max_parallel: int | None = None
    precisions: tuple[str, ...] = ()  # empty: every level the server allows
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None

    def is_valid(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def as_json(self) -> dict:
        """For the admin API, the CLI and the audit rows: enums by value."""
        out = dataclasses.asdict(self)
        out.update(role=self.role.value, tier=self.tier.value, models=list(self.models),
                   precisions=list(self.precisions))
        return out


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _record(row) -> ApiKey:
    return ApiKey(prefix=row.prefix, name=row.name, user_id=row.user_id, role=Role(row.role), tier=Tier(row.tier),
                  models=tuple(row.models or ()), rpm=row.rpm, tpm=row.tpm, tokens_per_day=row.tokens_per_day,
                  max_parallel=row.max_parallel, precisions=tuple(row.precisions or ()), created_at=row.created_at,
                  expires_at=row.expires_at, revoked_at=row.revoked_at)


class KeyStore:
    def __init__(self, engine: Engine, *, clock=time.time):
        self._engine = engine
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}  # key hash → (read at, record)
        self._lock = threading.Lock()

    def create(self, *, name: str, actor: str, user_id: str | None = None, role: Role = Role.USER,
               tier: Tier = Tier.FREE, models: tuple[str, ...] = (), rpm: int | None = None,
               tpm: int | None = None, tokens_per_day: int | None = None, max_parallel: int | None = None,
               precisions: tuple[str, ...] = (), expires_in: float | None = None) -> tuple[str, ApiKey]:
        """A new key: (its plaintext, shown once, and its record). Raises ValueError for bad fields."""
        name = name.strip()
        if not name:
            raise ValueError("name must not be empty")
        for field, value in (("rpm", rpm), ("tpm", tpm), ("tokens_per_day", tokens_per_day),
                             ("max_parallel", max_parallel)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field} must be a whole number of at least 1, got {value!r}")
        if expires_in is not None and not expires_in > 0:
            raise ValueError(f"expires_in must be a positive number of seconds, got {expires_in!r}")
        if any(not m or not isinstance(m, str) for m in models):
            raise ValueError("models must be non-empty model names")
        unknown = [p for p in precisions if p not in PRECISION_LEVELS]
        if unknown:
            raise ValueError(f"precisions must be among {list(PRECISION_LEVELS)}, got {unknown}")
        now = self._clock()
        for attempt in range(_DRAWS):  # a display prefix already taken (about 1 in 2**54): draw again
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            record = ApiKey(prefix=key[:DISPLAY_LENGTH], name=name, user_id=user_id or name, role=Role(role),
                            tier=Tier(tier), models=tuple(models), rpm=rpm, tpm=tpm,
                            tokens_per_day=tokens_per_day, max_parallel=max_parallel,
                            precisions=tuple(dict.fromkeys(precisions)), created_at=now,
                            expires_at=None if expires_in is None else now + expires_in)
            values = record.as_json() | {"key_hash": hash_key(key)}
            try:
                with self._engine.begin() as connection:
                    connection.execute(API_KEYS.insert().values(**values))
                    self._audit(connection, actor, "key.create", record.prefix, None, record.as_json(), now)
            except sa.exc.IntegrityError:
                if attempt == _DRAWS - 1:
                    raise
                continue
            return key, record
        raise AssertionError("unreachable")

    def list(self) -> list[ApiKey]:
        with self._engine.connect() as connection:
            rows = connection.execute(sa.select(API_KEYS).order_by(API_KEYS.c.created_at))
            return [_record(row) for row in rows]

    def get(self, prefix: str) -> ApiKey | None:
        with self._engine.connect() as connection:
            row = connection.execute(sa.select(API_KEYS).where(API_KEYS.c.prefix == prefix)).first()
        return None if row is None else _record(row)

    def revoke(self, prefix: str, *, actor: str) -> ApiKey | None:
        """Revoke the key with this display prefix; its record after, or None when there is none.
        Revoking a revoked key changes nothing (and writes no audit row)."""
        now = self._clock()
        with self._engine.begin() as connection:
            row = connection.execute(sa.select(API_KEYS).where(API_KEYS.c.prefix == prefix)).first()
            if row is None:
                return None
            before = _record(row)
            if before.revoked_at is not None:
                return before
            connection.execute(API_KEYS.update().where(API_KEYS.c.prefix == prefix).values(revoked_at=now))
            after = dataclasses.replace(before, revoked_at=now)
            self._audit(connection, actor, "key.revoke", prefix, before.as_json(), after.as_json(), now)
        with self._lock:
            self._cache = {h: entry for h, entry in self._cache.items()
                           if entry[1] is None or entry[1].prefix != prefix}
        return after

    def verify(self, key: str) -> ApiKey | None:
        """The record of a valid (known, unexpired, unrevoked) key, else None."""
        if not key.startswith(KEY_PREFIX):
            return None
        digest, now = hash_key(key), self._clock()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is None or now - cached[0] > CACHE_SECONDS:
            with self._engine.connect() as connection:
                row = connection.execute(sa.select(API_KEYS).where(API_KEYS.c.key_hash == digest)).first()
            cached = (now, None if row is None else _record(row))
            with self._lock:
                if len(self._cache) > 10_000:  # bounded: unknown keys sent in bulk must not grow it
                    self._cache.clear()
                self._cache[digest] = cached
        record = cached[1]
        return record if record is not None and record.is_valid(now) else None

    def audit_log(self) -> list[dict]:
        with self._engine.connect() as connection:
            rows = connection.execute(sa.select(AUDIT_LOG).order_by(AUDIT_LOG.c.id))
            return [dict(row._mapping) for row in rows]

    @staticmethod
    def _audit(connection, actor: str, action: str, obj: str, before, after, at: float) -> None:
        connection.execute(AUDIT_LOG.insert().values(at=at, actor=actor, action=action, object=obj,
                                                     before=before, after=after))


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s' → seconds. Raises ValueError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit() or int(text[:-1]) < 1:
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h, 90m or 45s")
    return int(text[:-1]) * units[text[-1]]
