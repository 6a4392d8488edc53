"""The key store (serving.api_keys, serving.database) on SQLite and on the real PostgreSQL, and
`balansis keys` / `balansis db` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sqlalchemy as sa

from serving import database
from serving.api_keys import (
    CACHE_SECONDS,
    KeyStore,
    Role,
    Tier,
    hash_key,
    parse_duration,
)
from serving.auth import Authenticator
from serving.errors import RequestError


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(database_url):
    clock = Clock()
    return KeyStore(database.connect(database_url), clock=clock), clock


def test_a_created_key_verifies_and_only_its_hash_is_stored(store, database_url):
    keys, _ = store
    key, record = keys.create(name="ci", actor="admin-1", tier=Tier.PRO, models=("tiny",), rpm=30)
    assert key.startswith("sk-") and len(key) == 3 + 43 and record.prefix == key[:12]
    assert keys.verify(key) == record
    assert (record.user_id, record.role, record.tier, record.models, record.rpm) == ("ci", Role.USER, Tier.PRO,
                                                                                     ("tiny",), 30)
    with database.connect(database_url).connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(sa.select(database.API_KEYS))]
    assert len(rows) == 1 and rows[0]["key_hash"] == hash_key(key)
    assert key not in json.dumps(rows)  # the plaintext is nowhere in the table
    assert keys.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert keys.verify("not-a-key") is None


def test_revoked_and_expired_keys_stop_verifying(store):
    keys, clock = store
    key, _ = keys.create(name="short", actor="cli", expires_in=parse_duration("90m"))
    other, _ = keys.create(name="other", actor="cli")
    assert keys.verify(key) is not None
    clock.now += 90 * 60
    assert keys.verify(key) is None  # expired, though still cached
    revoked = keys.revoke(keys.verify(other).prefix, actor="admin-1")
    assert revoked.revoked_at == clock.now
    assert keys.verify(other) is None  # this store's cache is cleared at once
    assert keys.revoke("sk-nothing", actor="cli") is None
    assert keys.revoke(revoked.prefix, actor="cli") == revoked  # again: unchanged


def test_a_revocation_by_another_replica_is_seen_within_the_cache_time(database_url):
    clock = Clock()
    here, there = (KeyStore(database.connect(database_url), clock=clock) for _ in range(2))
    key, record = here.create(name="shared", actor="cli")
    assert there.verify(key) is not None
    here.revoke(record.prefix, actor="cli")
    clock.now += CACHE_SECONDS + 0.1
    assert there.verify(key) is None


def test_every_change_writes_an_audit_row(store):
    keys, _ = store
    _, record = keys.create(name="audited", actor="sk-admin0001")
    keys.revoke(record.prefix, actor="static key")
    rows = keys.audit_log()
    assert [(r["actor"], r["action"], r["object"]) for r in rows] == [
        ("sk-admin0001", "key.create", record.prefix), ("static key", "key.revoke", record.prefix)]
    assert rows[0]["before"] is None and rows[0]["after"]["name"] == "audited"
    assert rows[1]["before"]["revoked_at"] is None and rows[1]["after"]["revoked_at"] is not None
    assert all("sk-" not in json.dumps(r["after"]).replace(record.prefix, "") for r in rows)


@pytest.mark.parametrize("fields, message", [
    (dict(name=" "), "name"), (dict(name="x", rpm=0), "rpm"), (dict(name="x", tpm=True), "tpm"),
    (dict(name="x", expires_in=-5), "expires_in"), (dict(name="x", models=("",)), "models")])
def test_bad_fields_are_refused(store, fields, message):
    keys, _ = store
    with pytest.raises(ValueError, match=message):
        keys.create(actor="cli", **fields)
    assert keys.list() == []


def test_migrations_apply_once_and_a_newer_schema_is_refused(database_url):
    engine = database.connect(database_url, migrate=False)
    assert database.upgrade(engine) == (0, database.SCHEMA_VERSION)
    assert database.upgrade(engine) == (database.SCHEMA_VERSION, database.SCHEMA_VERSION)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO schema_version (version) VALUES (99)"))
    with pytest.raises(RuntimeError, match="newer"):
        database.upgrade(engine)


def test_static_keys_are_admins_and_stored_keys_carry_their_record(store):
    keys, _ = store
    key, record = keys.create(name="user", actor="cli", models=("tiny",))
    auth = Authenticator(static_keys=("static-secret",), store=keys)
    assert auth.authenticate("Bearer static-secret").role is Role.ADMIN
    principal = auth.authenticate(f"Bearer {key}")
    assert (principal.role, principal.models, principal.key_prefix) == (Role.USER, ("tiny",), record.prefix)
    for header in (None, "", "Bearer ", "Basic static-secret", "Bearer static-secre", f"Bearer {key}x"):
        with pytest.raises(RequestError) as info:
            auth.authenticate(header)
        assert info.value.status_code == 401
    with pytest.raises(RequestError) as info:
        principal.check_model("other")
    assert info.value.status_code == 403
    with pytest.raises(RequestError) as info:
        principal.check_admin()
    assert info.value.status_code == 403


def _balansis(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, timeout=120)


def test_the_keys_command_creates_lists_and_revokes(database_url):
    url = ["--database-url", database_url]
    upgraded = _balansis("db", "upgrade", *url)
    assert upgraded.returncode == 0 and "schema version" in upgraded.stdout
    created = _balansis("keys", "create", "--name", "ci", "--tier", "pro", "--models", "a,b", "--rpm", "5",
                        "--expires", "30d", "--json", *url)
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    assert made["record"]["models"] == ["a", "b"] and made["record"]["expires_at"] is not None
    listed = _balansis("keys", "list", *url)
    assert made["record"]["prefix"] in listed.stdout and "active" in listed.stdout
    assert made["key"] not in listed.stdout  # never the key itself
    revoked = _balansis("keys", "revoke", made["record"]["prefix"], *url)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert "revoked" in _balansis("keys", "list", *url).stdout
    store = KeyStore(database.connect(database_url))
    assert store.verify(made["key"]) is None
    missing = _balansis("keys", "revoke", "sk-nothing", *url)
    assert missing.returncode == 2 and "no API key" in missing.stderr
    bad = _balansis("keys", "create", "--name", "x", "--expires", "soon", *url)
    assert bad.returncode == 2 and "duration" in bad.stderr


def test_an_unreachable_database_is_a_one_line_error():
    done = _balansis("keys", "list", "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert done.returncode == 2 and done.stderr.startswith("balansis: error: cannot open the database")
    assert "Traceback" not in done.stderr
