"""`balansis keys create | list | revoke` and `balansis db upgrade`: the key store from a shell.

    balansis keys create --name ci --tier pro --models SmolLM2-135M-Instruct --expires 30d
    balansis keys list
    balansis keys revoke sk-AbCdEfGhI
    balansis db upgrade --database-url postgresql://user@host/balansis

Every command takes `--database-url` (default: $BALANSIS_DATABASE_URL, else
the SQLite file under the user's data folder, as `balansis serve`). `create`
prints the key once; only its hash is stored. Changes are audited with the
actor "cli".
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

from serving import database
from serving.api_keys import KeyStore, Role, Tier, parse_duration


def _database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=None,
                        help="sqlite:///PATH or postgresql://… (default: $BALANSIS_DATABASE_URL, else "
                             "~/.local/share/balansis/balansis.db)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--user", default=None, help="its owner's user id (default: the name)")
    create.add_argument("--role", choices=[r.value for r in Role], default="user")
    create.add_argument("--tier", choices=[t.value for t in Tier], default="free")
    create.add_argument("--models", default="", help="comma-separated model names it may use (default: all)")
    create.add_argument("--precisions", default="",
                        help="comma-separated precision levels it may ask for: standard, high, ultra (default: all "
                             "the server allows)")
    for flag in ("--rpm", "--tpm", "--tokens-per-day", "--max-parallel"):
        create.add_argument(flag, type=_positive, default=None, help="override the tier's limit")
    create.add_argument("--expires", default=None, help="a duration such as 30d, 12h or 90m (default: never)")
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    _database_argument(create)
    listing = actions.add_parser("list", help="every key's record (prefixes, never the keys)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _database_argument(listing)
    revoke = actions.add_parser("revoke", help="revoke the key with this display prefix")
    revoke.add_argument("prefix")
    _database_argument(revoke)


def _connect(url: str | None, *, migrate: bool = True):
    import sqlalchemy

    try:
        return database.connect(url, migrate=migrate)
    except sqlalchemy.exc.SQLAlchemyError as e:  # unreachable, refused, not a database
        raise ValueError(f"cannot open the database: {getattr(e, 'orig', None) or e}") from None


def keys_command(args: argparse.Namespace) -> int:
    store = KeyStore(_connect(args.database_url))
    if args.action == "create":
        expires_in = None if args.expires is None else parse_duration(args.expires)
        key, record = store.create(
            name=args.name, actor="cli", user_id=args.user, role=Role(args.role), tier=Tier(args.tier),
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()), rpm=args.rpm, tpm=args.tpm,
            tokens_per_day=args.tokens_per_day, max_parallel=args.max_parallel, expires_in=expires_in,
            precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()))
        if args.json:
            print(json.dumps({"key": key, "record": record.as_json()}))
        else:
            print(key)
            print(f"(prefix {record.prefix}; shown once, only its hash is stored)")
        return 0
    if args.action == "list":
        for record in store.list():
            if args.json:
                print(json.dumps(record.as_json()))
                continue
            state = "revoked" if record.revoked_at else ("expired" if not record.is_valid(time.time()) else "active")
            expires = "never" if record.expires_at is None else _iso(record.expires_at)
            models = ",".join(record.models) or "all models"
            levels = ",".join(record.precisions) or "all levels"
            print(f"{record.prefix}  {state:7s}  {record.role.value:5s}  {record.tier.value:10s}  "
                  f"user={record.user_id}  name={record.name}  {models}  {levels}  expires {expires}")
        return 0
    record = store.revoke(args.prefix, actor="cli")
    if record is None:
        raise ValueError(f"no API key has the prefix {args.prefix!r}")
    print(f"revoked {record.prefix} ({record.name})")
    return 0


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    _database_argument(actions.add_parser("upgrade", help="apply the schema migrations the database lacks"))


def db_command(args: argparse.Namespace) -> int:
    before, after = database.upgrade(_connect(args.database_url, migrate=False))
    print(f"schema version {after}" + ("" if before == after else f" (was {before})"))
    return 0


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")
