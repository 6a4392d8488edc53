"""Budgets in Redis (`--redis-url`), so replicas behind one load balancer share them.

The same steps as `memory_rate_limits._State`, as Lua scripts that Redis runs
atomically: a reservation checks and takes from every limit at once, or
takes nothing. Time is Redis's own (`TIME`), so replicas with drifting
clocks still agree. One hash per budget holds the two buckets and the day's
count; a sorted set holds its leases (`max_parallel`) with their expiry, so
a replica that dies holding some frees them after `LEASE_SECONDS`. Keys
expire two days after their last use.
"""

from __future__ import annotations

import functools

import redis
import redis.asyncio
from redis.exceptions import RedisError

from serving.rate_limits import (DAY_SECONDS, LEASE_SECONDS, Budget, Ledger, LedgerUnavailable, Limits, Refusal,
                                  Snapshot, snapshot_of)

# KEYS: the budget's hash, its leases. ARGV: rpm, tpm, tokens_per_day, max_parallel (0: none),
# then the operation's own.
_PRELUDE = """
local rpm, tpm, tpd, maxp = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local day = math.floor(now / %(day)d)
local s = redis.call('HMGET', KEYS[1], 'rl', 'rt', 'tl', 'tt', 'day', 'du')
local function level(l, at, cap)
  if cap <= 0 then return 0 end
  if not l then return cap end
  return math.min(cap, tonumber(l) + (now - tonumber(at)) * cap / 60)
end
local rl, tl = level(s[1], s[2], rpm), level(s[3], s[4], tpm)
local du = 0
if s[5] and tonumber(s[5]) == day then du = tonumber(s[6]) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local function f(x) return string.format('%%.17g', x) end
local function save()
  redis.call('HSET', KEYS[1], 'rl', f(rl), 'rt', f(now), 'tl', f(tl), 'tt', f(now), 'day', day, 'du', du)
  redis.call('EXPIRE', KEYS[1], 2 * %(day)d)
end
local function state(refusal, retry)
  return {refusal, f(retry), f(rl), f(tl), du, f(now)}
end
""" % {"day": DAY_SECONDS}

# ARGV[5]: tokens, ARGV[6]: lease. Returns state(refusal or '', seconds to wait or -1 for never).
_RESERVE = _PRELUDE + """
local tokens, lease = tonumber(ARGV[5]), ARGV[6]
if tpd > 0 and du + tokens > tpd then return state('tokens_per_day', -1) end
if tpm > 0 and tokens > tpm then return state('tokens', -1) end
if maxp > 0 and redis.call('ZCARD', KEYS[2]) >= maxp then return state('max_parallel', 1) end
if rpm > 0 and rl < 1 then return state('requests', (1 - rl) * 60 / rpm) end
if tpm > 0 and tl < tokens then return state('tokens', (tokens - tl) * 60 / tpm) end
rl, tl, du = rl - 1, tl - tokens, du + tokens
save()
if maxp > 0 then
  redis.call('ZADD', KEYS[2], now + %(lease)d, lease)
  redis.call('EXPIRE', KEYS[2], %(lease)d)
end
return state('', 0)
""" % {"lease": LEASE_SECONDS}

# ARGV[5]: unused tokens, ARGV[6]: lease, ARGV[7]: the reservation's day, ARGV[8]: '1' to refund the request.
_RELEASE = _PRELUDE + """
local unused = tonumber(ARGV[5])
tl = math.min(tpm, tl + unused)
if tonumber(ARGV[7]) == day then du = math.max(0, du - unused) end
if ARGV[8] == '1' then rl = math.min(rpm, rl + 1) end
save()
redis.call('ZREM', KEYS[2], ARGV[6])
return state('', 0)
"""

_PEEK = _PRELUDE + "return state('', 0)\n"


def check_reachable(url: str) -> None:
    """A ValueError unless Redis answers at `url` (the message leaves the URL out: it may hold a password)."""
    try:
        with redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5) as client:
            client.ping()
    except (RedisError, OSError, ValueError) as e:
        raise ValueError(f"cannot reach Redis (--redis-url): {e}") from None


def _reachable(method):
    """Redis's errors as LedgerUnavailable (the limiter serves without limits then)."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as e:
            raise LedgerUnavailable(f"Redis: {e}") from e

    return wrapper


class RedisLedger(Ledger):
    def __init__(self, url: str, *, namespace: str = "balansis:ratelimit"):
        self._client = redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._namespace = namespace
        self._reserve = self._client.register_script(_RESERVE)
        self._release = self._client.register_script(_RELEASE)
        self._peek = self._client.register_script(_PEEK)

    def _keys(self, budget: Budget) -> list[str]:
        # The owner inside braces (a Redis Cluster hash tag) puts both keys in one slot.
        owner = budget.owner.replace("{", "(").replace("}", ")")
        return [f"{self._namespace}:{{{owner}}}", f"{self._namespace}:{{{owner}}}:leases"]

    @staticmethod
    def _limits(limits: Limits) -> list[int]:
        return [limits.rpm or 0, limits.tpm or 0, limits.tokens_per_day or 0, limits.max_parallel or 0]

    @_reachable
    async def reserve(self, budget: Budget, *, tokens: int, lease: str) -> tuple[Refusal | None, Snapshot]:
        reply = await self._reserve(keys=self._keys(budget), args=[*self._limits(budget.limits), tokens, lease])
        refusal, retry = reply[0].decode(), float(reply[1])
        snapshot = _snapshot(budget.limits, reply)
        if not refusal:
            return None, snapshot
        return Refusal(refusal, None if retry < 0 else retry, 1 if refusal in ("requests", "max_parallel")
                       else tokens), snapshot

    @_reachable
    async def release(self, budget: Budget, *, lease: str, unused_tokens: int, day: int,
                      refund_request: bool) -> None:
        await self._release(keys=self._keys(budget), args=[*self._limits(budget.limits), unused_tokens, lease, day,
                                                           "1" if refund_request else "0"])

    @_reachable
    async def peek(self, budget: Budget) -> Snapshot:
        return _snapshot(budget.limits, await self._peek(keys=self._keys(budget),
                                                         args=self._limits(budget.limits)))

    async def close(self) -> None:
        await self._client.aclose()


def _snapshot(limits: Limits, reply) -> Snapshot:
    return snapshot_of(limits, requests=float(reply[2]), tokens=float(reply[3]), day_used=int(reply[4]),
                       now=float(reply[5]))
