"""Budgets in this process's memory (the default ledger of serving.rate_limits): each replica counts its own.

The same steps as the Redis script (serving.redis_rate_limits), under one lock.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from serving.rate_limits import (DAY_SECONDS, LEASE_SECONDS, Budget, Ledger, Limits, Refusal, Snapshot, check,
                                  snapshot_of)


class MemoryLedger(Ledger):
    """Budgets in this process (the default): each replica counts its own."""

    def __init__(self, *, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}

    async def reserve(self, budget: Budget, *, tokens: int, lease: str) -> tuple[Refusal | None, Snapshot]:
        with self._lock:
            state = self._states.setdefault(budget.owner, _State())
            return state.reserve(budget.limits, tokens=tokens, lease=lease, now=self._clock())

    async def release(self, budget: Budget, *, lease: str, unused_tokens: int, day: int,
                      refund_request: bool) -> None:
        with self._lock:
            state = self._states.get(budget.owner)
            if state is not None:
                state.release(budget.limits, lease=lease, unused_tokens=unused_tokens, day=day,
                              refund_request=refund_request, now=self._clock())

    async def peek(self, budget: Budget) -> Snapshot:
        with self._lock:
            state = self._states.get(budget.owner) or _State()
            return state.snapshot(budget.limits, self._clock())


def _level(level: float | None, at: float, capacity: int, now: float) -> float:
    """A token bucket's content at `now`: full when never used, refilled at capacity/60 a second."""
    if level is None:
        return float(capacity)
    return min(float(capacity), level + (now - at) * capacity / 60.0)


@dataclasses.dataclass(slots=True)
class _State:
    """One budget's buckets in memory (the same steps as the Redis script, `redis_rate_limits`)."""

    requests: float | None = None  # None: full
    requests_at: float = 0.0
    tokens: float | None = None
    tokens_at: float = 0.0
    day: int = 0
    day_used: int = 0
    leases: dict[str, float] = dataclasses.field(default_factory=dict)  # lease → expiry

    def _refill(self, limits: Limits, now: float) -> None:
        if limits.rpm is not None:
            self.requests, self.requests_at = _level(self.requests, self.requests_at, limits.rpm, now), now
        if limits.tpm is not None:
            self.tokens, self.tokens_at = _level(self.tokens, self.tokens_at, limits.tpm, now), now
        if self.day != int(now // DAY_SECONDS):
            self.day, self.day_used = int(now // DAY_SECONDS), 0
        self.leases = {lease: expiry for lease, expiry in self.leases.items() if expiry > now}

    def reserve(self, limits: Limits, *, tokens: int, lease: str, now: float) -> tuple[Refusal | None, Snapshot]:
        self._refill(limits, now)
        refusal = check(limits, tokens=tokens, requests=self.requests, tokens_level=self.tokens,
                         day_used=self.day_used, num_leases=len(self.leases))
        if refusal is None:
            if limits.rpm is not None:
                self.requests -= 1
            if limits.tpm is not None:
                self.tokens -= tokens
            self.day_used += tokens
            if limits.max_parallel is not None:
                self.leases[lease] = now + LEASE_SECONDS
        return refusal, self.snapshot(limits, now)

    def release(self, limits: Limits, *, lease: str, unused_tokens: int, day: int, refund_request: bool,
                now: float) -> None:
        self._refill(limits, now)
        if limits.tpm is not None:
            self.tokens = min(float(limits.tpm), self.tokens + unused_tokens)
        if self.day == day:
            self.day_used = max(0, self.day_used - unused_tokens)
        if refund_request and limits.rpm is not None:
            self.requests = min(float(limits.rpm), self.requests + 1)
        self.leases.pop(lease, None)

    def snapshot(self, limits: Limits, now: float) -> Snapshot:
        return snapshot_of(limits, requests=_level(self.requests, self.requests_at, limits.rpm or 0, now),
                           tokens=_level(self.tokens, self.tokens_at, limits.tpm or 0, now),
                           day_used=self.day_used if self.day == int(now // DAY_SECONDS) else 0, now=now)
