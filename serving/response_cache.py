"""`--response-cache`: whole responses of deterministic requests, kept for `--response-cache-ttl` seconds.

Only what would come out the same again is kept: non-streamed chat and
completions whose every choice is greedy (temperature 0) or seeded (the
sampler's keys derive from the seed and the position, whatever else is in
the batch). The key hashes the served model (its name and when it was
loaded, so a restart with other weights misses), the route, the precision
level the request runs at, and the body without the fields that cannot
change the output (`user`, `metadata`, `store`, `service_tier`). At
`standard` a greedy row's logits can move by ~1e-6 with its batch, so a
near tie could go the other way on a fresh run; at `high` and `ultra` a
hit is exactly what a fresh run gives.

In Redis (`--redis-url`), so replicas share it, else in this process's
memory (the newest `MEMORY_ENTRIES` responses). A hit answers at once with a
fresh `id` and `created` and the header `x-balansis-cache: hit`; it costs
its caller one request of its rate limit and no tokens. Redis errors are
misses (logged): the cache never fails a request.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time

import msgspec

log = logging.getLogger("balansis.serving")

MEMORY_ENTRIES = 1024
_IRRELEVANT_FIELDS = ("user", "metadata", "store", "service_tier")


class ResponseCache:
    def __init__(self, *, ttl_seconds: float, redis_url: str | None = None, namespace: str = "balansis:response"):
        if ttl_seconds <= 0:
            raise ValueError(f"the response cache's TTL must be positive, got {ttl_seconds}")
        self._ttl = ttl_seconds
        self._namespace = namespace
        self._redis = None
        if redis_url is not None:
            import redis.asyncio

            self._redis = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._memory: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(*, model: str, loaded_at: int, route: str, precision: str, body: msgspec.Struct) -> str:
        """The cache key of a request (its body a decoded request Struct)."""
        fields = {f: None for f in _IRRELEVANT_FIELDS if hasattr(body, f)}
        canonical = msgspec.json.encode(msgspec.structs.replace(body, **fields) if fields else body)
        digest = hashlib.sha256()
        for part in (model, str(loaded_at), route, precision):
            digest.update(part.encode() + b"\0")
        digest.update(canonical)
        return digest.hexdigest()

    async def get(self, key: str) -> bytes | None:
        if self._redis is not None:
            try:
                return await self._redis.get(f"{self._namespace}:{key}")
            except Exception as e:  # the cache never fails a request
                log.warning("response cache: lookup failed: %s", e)
                return None
        with self._lock:
            entry = self._memory.get(key)
            if entry is None or entry[0] < time.monotonic():
                self._memory.pop(key, None)
                return None
            self._memory.move_to_end(key)
            return entry[1]

    async def put(self, key: str, value: bytes) -> None:
        if self._redis is not None:
            try:
                await self._redis.set(f"{self._namespace}:{key}", value, ex=max(1, round(self._ttl)))
            except Exception as e:
                log.warning("response cache: store failed: %s", e)
            return
        with self._lock:
            self._memory[key] = (time.monotonic() + self._ttl, value)
            self._memory.move_to_end(key)
            while len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
