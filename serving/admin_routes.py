"""The admin API (admin keys only; the app's guard checks the role): the stored API keys.

- POST /admin/keys: a new key; the plaintext is in this response only.
- GET /admin/keys: every key's record (never a plaintext or a hash).
- DELETE /admin/keys/{prefix}: revoke a key by its display prefix.

Each change writes an audit row naming the caller (serving.api_keys).
"""

from __future__ import annotations

import anyio.to_thread
from litestar import Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from serving.api_keys import ApiKey, KeyStore, Role, Tier, parse_duration
from serving.auth import principal_of
from serving.errors import ERROR_RESPONSES, RequestError
from serving.schemas import CreatedKey, CreateKeyRequest, KeyList, KeyRecord
from serving.state import ServerState


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
            tokens_per_day=data.tokens_per_day, max_parallel=data.max_parallel, expires_in=expires_in))
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


ROUTES = [create_key, list_keys, revoke_key]
