"""Rate limits and quotas per caller: requests and tokens per minute, tokens per day, requests at once.

A caller's budget is its stored key's (`key:PREFIX`) or, for a JWT, its
user's (`user:SUB`); static `--api-key`s and callers without authentication
have none. Its limits are its tier's (`TIER_LIMITS`) with the key's own
overrides on top.

- Requests and tokens per minute are token buckets, as OpenAI's limits are:
  a full bucket holds the per-minute limit and refills continuously at
  limit/60 a second, so a burst of the whole limit is allowed, and a refused
  request learns exactly when it would fit (`Retry-After`, `retry-after-ms`).
- Tokens per day is a quota for the UTC day (it resets at midnight).
- Requests at once (`max_parallel`) are leases that end with the request.

A generating request reserves, at admission, every token it may use
(prompt + `max_tokens` per choice, or the rest of the context when unset);
when it ends, however it ends, the unused part goes back to the minute's
bucket and the day's quota (`Reservation.release`). Every check and every
change of one reservation happens at once (under a lock in memory, in one
Lua script in Redis), so concurrent requests can never together overshoot a
limit, and a refused request takes nothing.

Why not the `limits` library (which the refused-credentials limit uses):
its strategies take a cost per hit but give nothing back — no refund of the
unused reservation, and no way to take from the minute's bucket and the
day's quota together or not at all — so a refusal by the second limit would
still have spent the first.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import uuid

from serving.api_keys import ApiKey, Tier
from serving.errors import RequestError

log = logging.getLogger("balansis.serving")

DAY_SECONDS = 86_400
# A lease (max_parallel) that was never released — its process died — expires after this.
LEASE_SECONDS = 3_600


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """None: no limit of that kind."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute (prompt + completion)
    tokens_per_day: int | None = None  # per UTC day
    max_parallel: int | None = None  # requests in progress at once

    @property
    def is_unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.tokens_per_day is None and self.max_parallel is None


TIER_LIMITS = {
    Tier.FREE: Limits(rpm=60, tokens_per_day=10_000),
    Tier.PRO: Limits(rpm=600, tokens_per_day=100_000),
    Tier.ENTERPRISE: Limits(),
}


def limits_for(tier: Tier, key: ApiKey | None = None) -> Limits:
    """The tier's limits, with a stored key's own overrides."""
    base = TIER_LIMITS[tier]
    if key is None:
        return base
    return Limits(rpm=key.rpm or base.rpm, tpm=key.tpm or base.tpm,
                  tokens_per_day=key.tokens_per_day or base.tokens_per_day,
                  max_parallel=key.max_parallel or base.max_parallel)


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """Whose limits (a stable id shared by every replica) and what they are."""

    owner: str  # "key:sk-AbCdEfGhI" or "user:alice"
    limits: Limits


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A budget's state after a request took its share (or as it stands, for other routes)."""

    limits: Limits
    requests_remaining: float = 0.0
    requests_reset: float = 0.0  # seconds until the requests bucket is full again
    tokens_remaining: float = 0.0
    tokens_reset: float = 0.0
    day_remaining: int = 0
    day_reset: float = 0.0  # seconds until UTC midnight
    day: int = 0  # the UTC day (days since the epoch) by the ledger's clock

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers; the tokens ones follow the per-minute limit, else the daily
        quota, which also has headers of its own (`…-tokens-day`)."""
        out: dict[str, str] = {}
        limits = self.limits
        if limits.rpm is not None:
            out |= _triple("requests", limits.rpm, self.requests_remaining, self.requests_reset)
        if limits.tpm is not None:
            out |= _triple("tokens", limits.tpm, self.tokens_remaining, self.tokens_reset)
        elif limits.tokens_per_day is not None:
            out |= _triple("tokens", limits.tokens_per_day, self.day_remaining, self.day_reset)
        if limits.tokens_per_day is not None:
            out |= _triple("tokens-day", limits.tokens_per_day, self.day_remaining, self.day_reset)
        return out


def _triple(name: str, limit: int, remaining: float, reset: float) -> dict[str, str]:
    return {f"x-ratelimit-limit-{name}": str(limit), f"x-ratelimit-remaining-{name}": str(max(0, int(remaining))),
            f"x-ratelimit-reset-{name}": duration(reset)}


def duration(seconds: float) -> str:
    """A duration as OpenAI's headers write it (Go's format): 20ms, 1s, 1.5s, 6m0s, 2h3m4s."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation was refused: which limit, and in how many seconds it would fit (None: never,
    or not before the day's quota resets)."""

    limit: str  # "requests", "tokens", "tokens_per_day", "max_parallel"
    retry_after: float | None
    needed: int = 1


class LedgerUnavailable(Exception):
    """The ledger cannot be reached (Redis is down)."""


class Ledger(abc.ABC):
    """Where budgets are kept: this process's memory, or Redis (shared by replicas)."""

    @abc.abstractmethod
    async def reserve(self, budget: Budget, *, tokens: int, lease: str) -> tuple[Refusal | None, Snapshot]:
        """Take one request, `tokens` tokens and a lease from `budget`, all or nothing."""

    @abc.abstractmethod
    async def release(self, budget: Budget, *, lease: str, unused_tokens: int, day: int,
                      refund_request: bool) -> None:
        """End a lease; give back `unused_tokens` (to the day's quota only if it is still `day`), and the
        request itself when it was refused later on (`refund_request`)."""

    @abc.abstractmethod
    async def peek(self, budget: Budget) -> Snapshot:
        """The budget as it stands."""

    async def close(self) -> None:
        """Let go of connections."""


def snapshot_of(limits: Limits, *, requests: float, tokens: float, day_used: int, now: float) -> Snapshot:
    """A budget's snapshot from its buckets' levels and the day's count at `now`."""
    return Snapshot(
        limits, requests_remaining=requests,
        requests_reset=(limits.rpm - requests) * 60.0 / limits.rpm if limits.rpm else 0.0,
        tokens_remaining=tokens, tokens_reset=(limits.tpm - tokens) * 60.0 / limits.tpm if limits.tpm else 0.0,
        day_remaining=max(0, (limits.tokens_per_day or 0) - day_used),
        day_reset=(now // DAY_SECONDS + 1) * DAY_SECONDS - now, day=int(now // DAY_SECONDS))


def check(limits: Limits, *, tokens: int, requests: float | None, tokens_level: float | None, day_used: int,
           num_leases: int) -> Refusal | None:
    """The first limit a request of `tokens` tokens would break, in the order a client should hear of
    them: what retrying cannot help (the day's quota, a request larger than the minute's tokens), then
    requests at once, requests, tokens."""
    if limits.tokens_per_day is not None and day_used + tokens > limits.tokens_per_day:
        return Refusal("tokens_per_day", None, tokens)
    if limits.tpm is not None and tokens > limits.tpm:
        return Refusal("tokens", None, tokens)  # larger than the whole bucket: it never fits
    if limits.max_parallel is not None and num_leases >= limits.max_parallel:
        return Refusal("max_parallel", 1.0)
    if limits.rpm is not None and requests < 1:
        return Refusal("requests", (1 - requests) * 60.0 / limits.rpm)
    if limits.tpm is not None and tokens_level < tokens:
        return Refusal("tokens", (tokens - tokens_level) * 60.0 / limits.tpm, tokens)
    return None


class Reservation:
    """What one request took from a budget; `release` gives back what it did not use, once."""

    def __init__(self, ledger: Ledger, budget: Budget, *, tokens: int, lease: str, snapshot: Snapshot):
        self._ledger, self.budget, self.tokens, self._lease = ledger, budget, tokens, lease
        self.snapshot = snapshot  # the budget just after this reservation (the response's headers)
        self._is_released = False

    async def release(self, *, used_tokens: int, refund_request: bool = False) -> None:
        """Give back `tokens - used_tokens`, and the request itself with `refund_request` (a request
        refused after it was reserved, by a full queue, costs nothing)."""
        if self._is_released:
            return
        self._is_released = True
        try:
            await self._ledger.release(self.budget, lease=self._lease,
                                       unused_tokens=max(0, self.tokens - used_tokens), day=self.snapshot.day,
                                       refund_request=refund_request)
        except LedgerUnavailable as e:
            log.warning("rate limits: cannot give back %d unused tokens: %s", self.tokens - used_tokens, e)


class RateLimiter:
    """The server's limits: reservations for generating requests, headers for every response.

    When the ledger cannot be reached (Redis down), requests are served without limits and a warning
    is logged (`on_unavailable` counts it): limits protect the service, they must not take it down —
    the choice Envoy's global rate limiting makes by default.
    """

    def __init__(self, ledger: Ledger, *, on_refusal=None, on_unavailable=None):
        """`on_refusal(limit)` is called for every refusal, `on_unavailable()` for every request served
        unlimited because the ledger could not be reached (the metrics' counters)."""
        self.ledger = ledger
        self._on_refusal = on_refusal
        self._on_unavailable = on_unavailable

    def _unavailable(self, error: Exception) -> None:
        log.warning("rate limits unavailable, serving without them: %s", error)
        if self._on_unavailable is not None:
            self._on_unavailable()

    async def reserve(self, budget: Budget | None, *, tokens: int) -> Reservation | None:
        """Reserve a request of `tokens` tokens, or raise the 429; None for a caller without limits."""
        if budget is None or budget.limits.is_unlimited:
            return None
        lease = uuid.uuid4().hex
        try:
            refusal, snapshot = await self.ledger.reserve(budget, tokens=tokens, lease=lease)
        except LedgerUnavailable as e:
            self._unavailable(e)
            return None
        if refusal is not None:
            if self._on_refusal is not None:
                self._on_refusal(refusal.limit)
            raise _error(refusal, budget.limits, snapshot)
        return Reservation(self.ledger, budget, tokens=tokens, lease=lease, snapshot=snapshot)

    async def peek(self, budget: Budget | None) -> Snapshot | None:
        if budget is None or budget.limits.is_unlimited:
            return None
        try:
            return await self.ledger.peek(budget)
        except LedgerUnavailable as e:
            self._unavailable(e)
            return None

    async def close(self) -> None:
        await self.ledger.close()


def _error(refusal: Refusal, limits: Limits, snapshot: Snapshot) -> RequestError:
    headers = snapshot.headers()
    if refusal.limit == "tokens_per_day":
        if refusal.needed > limits.tokens_per_day:
            message = (f"this request may use {refusal.needed} tokens (prompt + max_tokens per choice), more "
                       f"than the key's whole daily quota of {limits.tokens_per_day}; lower max_tokens")
        else:
            message = (f"this request may use {refusal.needed} tokens (prompt + max_tokens per choice) and "
                       f"{snapshot.day_remaining} of today's {limits.tokens_per_day} remain; the quota "
                       f"resets in {duration(snapshot.day_reset)} (00:00 UTC)")
        return RequestError(message, status_code=429, code="insufficient_quota", error_type="insufficient_quota",
                            headers=headers | {"x-should-retry": "false"})
    if refusal.retry_after is None:  # a request larger than the per-minute bucket
        return RequestError(f"request too large: it may use {refusal.needed} tokens (prompt + max_tokens per "
                            f"choice), more than the key's limit of {limits.tpm} tokens per minute; lower "
                            f"max_tokens", status_code=429, code="rate_limit_exceeded", error_type="tokens",
                            headers=headers | {"x-should-retry": "false"})
    wait_ms = max(1, math.ceil(refusal.retry_after * 1000))
    headers |= {"Retry-After": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)}
    if refusal.limit == "max_parallel":
        message = f"this key has {limits.max_parallel} requests in progress, its limit; retry when one ends"
        kind = "requests"
    elif refusal.limit == "requests":
        message = (f"rate limit reached: {limits.rpm} requests per minute; retry in {duration(wait_ms / 1000)}")
        kind = "requests"
    else:
        message = (f"rate limit reached: {limits.tpm} tokens per minute, and this request may use "
                   f"{refusal.needed}; retry in {duration(wait_ms / 1000)}")
        kind = "tokens"
    return RequestError(message, status_code=429, code="rate_limit_exceeded", error_type=kind, headers=headers)


def ledger_for(redis_url: str | None) -> Ledger:
    """Budgets in Redis when `redis_url` is given (replicas share them), else in this process.
    Redis is reached once now, so a wrong URL stops the server at start (ValueError)."""
    if redis_url is None:
        from serving.memory_rate_limits import MemoryLedger

        return MemoryLedger()
    from serving.redis_rate_limits import RedisLedger, check_reachable

    check_reachable(redis_url)
    return RedisLedger(redis_url)

