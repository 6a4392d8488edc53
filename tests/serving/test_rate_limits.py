"""Budgets: token buckets per minute, the day's quota, leases; reservations all or nothing, refunds.

Each test runs on the in-memory ledger and on the real Redis (a namespace of its own).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from serving.errors import RequestError
from serving.memory_rate_limits import MemoryLedger
from serving.rate_limits import Budget, Limits, RateLimiter, duration


class Ledgers:
    """Ledgers that share one store (two Redis ledgers: two replicas), and `run`, which runs a test's
    scenario and closes them in the same event loop (a Redis client belongs to its loop)."""

    def __init__(self, make):
        self._make = make
        self._made = []

    def make(self):
        self._made.append(self._make())
        return self._made[-1]

    def run(self, coroutine):
        async def scenario():
            try:
                return await coroutine
            finally:
                for ledger in self._made:
                    await ledger.close()

        return asyncio.run(scenario())


@pytest.fixture(params=["memory", "redis"])
def ledgers(request):
    if request.param == "memory":
        shared = MemoryLedger()
        return Ledgers(lambda: shared)
    from serving.redis_rate_limits import RedisLedger

    url = request.getfixturevalue("redis_url")
    namespace = f"balansis-test-{uuid.uuid4().hex[:8]}"
    return Ledgers(lambda: RedisLedger(url, namespace=namespace))


def run(coroutine):
    return asyncio.run(coroutine)


def budget(**limits) -> Budget:
    return Budget(f"key:sk-{uuid.uuid4().hex[:9]}", Limits(**limits))


async def refused(limiter: RateLimiter, budget: Budget, tokens: int) -> RequestError:
    with pytest.raises(RequestError) as caught:
        await limiter.reserve(budget, tokens=tokens)
    return caught.value


def test_a_burst_of_the_whole_limit_then_a_wait_of_one_refill(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(rpm=3)

    async def scenario():
        for _ in range(3):
            await limiter.reserve(b, tokens=10)
        return await refused(limiter, b, 10)

    error = ledgers.run(scenario())
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.body()["error"]["type"] == "requests"
    wait_ms = int(error.headers["retry-after-ms"])
    assert 19_000 < wait_ms <= 20_000  # one request refills in 60/3 s
    assert error.headers["Retry-After"] == "20"
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"


def test_concurrent_reservations_admit_exactly_as_many_as_fit(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(tpm=1000)

    async def scenario():
        return await asyncio.gather(*(limiter.reserve(b, tokens=300) for _ in range(8)), return_exceptions=True)

    results = ledgers.run(scenario())
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert len(admitted) == 3
    errors = [r for r in results if isinstance(r, RequestError)]
    assert len(errors) == 5 and {e.body()["error"]["type"] for e in errors} == {"tokens"}


def test_a_refusal_takes_nothing_from_the_other_limits(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(rpm=2, tpm=100, tokens_per_day=1000)

    async def scenario():
        await limiter.reserve(b, tokens=90)
        await refused(limiter, b, 50)  # tokens refuse: the request and the day's tokens stay
        await refused(limiter, b, 50)
        return await limiter.peek(b)

    snapshot = ledgers.run(scenario())
    assert int(snapshot.requests_remaining) == 1
    assert snapshot.day_remaining == 910


def test_unused_tokens_go_back_to_the_minute_and_the_day(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(tpm=1000, tokens_per_day=5000)

    async def scenario():
        reservation = await limiter.reserve(b, tokens=800)
        assert reservation.snapshot.day_remaining == 4200
        await reservation.release(used_tokens=100)
        await reservation.release(used_tokens=0)  # once only
        return await limiter.peek(b)

    snapshot = ledgers.run(scenario())
    assert 899 <= snapshot.tokens_remaining <= 901  # plus what refilled in the meantime
    assert snapshot.day_remaining == 4900


def test_the_daily_quota_refuses_with_insufficient_quota_and_no_retry(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(tokens_per_day=500)

    async def scenario():
        first = await limiter.reserve(b, tokens=400)
        error = await refused(limiter, b, 200)
        await first.release(used_tokens=250)
        await limiter.reserve(b, tokens=200)  # fits once the unused part is back
        return error

    error = ledgers.run(scenario())
    assert error.status_code == 429 and error.code == "insufficient_quota"
    assert error.body()["error"]["type"] == "insufficient_quota"
    assert error.headers["x-should-retry"] == "false" and "retry-after-ms" not in error.headers
    assert error.headers["x-ratelimit-limit-tokens-day"] == "500"
    assert error.headers["x-ratelimit-remaining-tokens"] == "100"


def test_a_request_larger_than_the_minute_is_told_so_and_not_to_retry(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(tpm=100)
    error = ledgers.run(refused(limiter, b, 101))
    assert error.code == "rate_limit_exceeded" and error.body()["error"]["type"] == "tokens"
    assert error.headers["x-should-retry"] == "false"
    assert "request too large" in error.message


def test_requests_at_once_are_leases(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(max_parallel=2)

    async def scenario():
        first = await limiter.reserve(b, tokens=1)
        await limiter.reserve(b, tokens=1)
        error = await refused(limiter, b, 1)
        await first.release(used_tokens=1)
        await limiter.reserve(b, tokens=1)
        return error

    error = ledgers.run(scenario())
    assert error.body()["error"]["type"] == "requests" and "in progress" in error.message


def test_a_request_refused_after_its_reservation_gets_the_request_back(ledgers):
    limiter, b = RateLimiter(ledgers.make()), budget(rpm=1)

    async def scenario():
        reservation = await limiter.reserve(b, tokens=5)
        await reservation.release(used_tokens=0, refund_request=True)  # e.g. the queue was full
        await limiter.reserve(b, tokens=5)

    ledgers.run(scenario())


def test_two_replicas_share_one_budget(ledgers):
    b = budget(rpm=4)
    first, second = RateLimiter(ledgers.make()), RateLimiter(ledgers.make())

    async def scenario():
        await asyncio.gather(*(limiter.reserve(b, tokens=1) for limiter in (first, second) for _ in range(2)))
        await refused(first, b, 1)
        await refused(second, b, 1)

    ledgers.run(scenario())


def test_buckets_refill_at_the_limit_per_minute():
    now = [1_000_000.0]
    limiter, b = RateLimiter(MemoryLedger(clock=lambda: now[0])), budget(rpm=60, tpm=600)

    async def scenario():
        for _ in range(60):
            await limiter.reserve(b, tokens=10)
        error = await refused(limiter, b, 10)
        assert error.headers["retry-after-ms"] == "1000"
        now[0] += 1.0
        reservation = await limiter.reserve(b, tokens=10)
        assert reservation.snapshot.headers()["x-ratelimit-reset-requests"] == "1m0s"
        now[0] += 30.0
        return await limiter.peek(b)

    snapshot = run(scenario())
    assert snapshot.requests_remaining == 30 and snapshot.tokens_remaining == 300


def test_the_day_resets_at_utc_midnight():
    now = [86_400.0 * 20_000 + 86_399.0]  # one second before midnight
    limiter, b = RateLimiter(MemoryLedger(clock=lambda: now[0])), budget(tokens_per_day=100)

    async def scenario():
        await limiter.reserve(b, tokens=100)
        error = await refused(limiter, b, 1)
        assert error.headers["x-ratelimit-reset-tokens-day"] == "1s"
        now[0] += 1.0
        await limiter.reserve(b, tokens=100)

    run(scenario())


def test_callers_without_limits_reserve_nothing():
    limiter = RateLimiter(MemoryLedger())
    assert run(limiter.reserve(None, tokens=10**9)) is None
    assert run(limiter.reserve(Budget("key:x", Limits()), tokens=10**9)) is None


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0ms"), (0.0201, "21ms"), (1, "1s"), (1.5, "1.5s"), (59.9986, "59.999s"), (59.9996, "1m0s"), (360, "6m0s"),
    (90.25, "1m30.25s"), (7384, "2h3m4s")])
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text
