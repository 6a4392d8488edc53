"""Rate limits against live servers, through the official `openai` SDK: the request after a limit
gets the right 429, the SDK's own retry waits out `retry-after-ms` and succeeds, concurrent requests
admit exactly as many as fit, an aborted stream gives back what it did not use, the daily quota
says not to retry, every authenticated response carries the headers, and two servers on one Redis
share one budget."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import httpx
import openai
import pytest

from tests.serving.conftest import MODEL, start_server
from tests.serving.test_errors import MESSAGES, sdk, sdk_error, wait_until

ADMIN = {"Authorization": "Bearer admin-secret"}
# ignore_eos: every request uses exactly the tokens it reserved (prompt + max_tokens), so a budget's
# arithmetic is known in advance.
EXACT = {"ignore_eos": True}


def _start(tiny_loaded, url: str, **config):
    return start_server(tiny_loaded, api_keys=("admin-secret",), require_auth=True, database_url=url,
                        max_auth_failures_per_minute=None, **config)


@pytest.fixture(scope="module")
def database_file(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('limits') / 'keys.db'}"


@pytest.fixture(scope="module")
def server(tiny_loaded, database_file):
    """Budgets in this server's memory."""
    server = _start(tiny_loaded, database_file)
    yield server
    server.stop()


def _key(server, **limits) -> str:
    response = httpx.post(server.url + "/admin/keys", json={"name": "limited", **limits}, headers=ADMIN, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()["key"]


def _prompt_tokens(server) -> int:
    response = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": MESSAGES}, headers=ADMIN,
                          timeout=60)
    return response.json()["count"]


def _chat(client, max_tokens: int = 4):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens, extra_body=EXACT)


def test_the_request_after_the_limit_gets_429_with_its_type(server):
    key = _key(server, tier="enterprise", rpm=2)
    with sdk(server, key) as client:
        _chat(client)
        _chat(client)
        with pytest.raises(openai.RateLimitError) as info:
            _chat(client)
    error = sdk_error(info, status=429, code="rate_limit_exceeded", kind="requests")
    assert "2 requests per minute" in error["message"]
    headers = info.value.response.headers
    wait_ms = int(headers["retry-after-ms"])  # one request refills in 30 s, less what has passed since
    assert 0 < wait_ms <= 30_000 and headers["retry-after"] == str(-(-wait_ms // 1000))
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"


def test_the_sdk_retry_waits_out_retry_after_ms_and_succeeds(server):
    """A 520-token minute: a 501-token completion leaves 19, so a chat of ~34 waits ~2 s."""
    prompt = _prompt_tokens(server)
    key = _key(server, tier="enterprise", tpm=520)
    with sdk(server, key) as client:
        client.completions.create(model=MODEL, prompt=[7] * 500, max_tokens=1, extra_body=EXACT)
        with pytest.raises(openai.RateLimitError) as info:
            _chat(client)
    sdk_error(info, status=429, code="rate_limit_exceeded", kind="tokens")
    wait = int(info.value.response.headers["retry-after-ms"]) / 1000
    assert 0 < wait <= (prompt + 4) * 60 / 520
    with openai.OpenAI(base_url=server.v1, api_key=key, max_retries=2, timeout=120) as client:
        started = time.monotonic()
        reply = _chat(client)
        waited = time.monotonic() - started
    assert reply.usage.total_tokens == prompt + 4
    assert waited >= wait * 0.9  # the SDK slept as told before its retry (a bound, not a speed)


def test_concurrent_requests_admit_exactly_as_many_as_fit(server):
    reserved = _prompt_tokens(server) + 4
    key = _key(server, tier="enterprise", tpm=3 * reserved + reserved // 2)
    with sdk(server, key) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_chat, client) for _ in range(8)]
        outcomes = [f.exception() or f.result() for f in futures]
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(refused) == 5 and len(outcomes) - len(refused) == 3, outcomes
    assert {r.code for r in refused} == {"rate_limit_exceeded"}


def _remaining_tokens(server, key: str) -> int:
    response = httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    return int(response.headers["x-ratelimit-remaining-tokens"])


def test_an_aborted_stream_gives_back_what_it_did_not_use(server):
    """A 480-token minute refills 8 tokens a second: the reservation of ~431 leaves ~49; without a
    refund, 3 s later fewer than 90 would be there."""
    prompt = _prompt_tokens(server)
    key = _key(server, tier="enterprise", tpm=480)
    with sdk(server, key) as client:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=400, stream=True,
                                                extra_body=EXACT)
        assert _remaining_tokens(server, key) <= 480 - prompt - 400 + 5  # reserved (plus a refill)
        next(iter(stream))
        stream.close()
    # The unused part comes back once the server sees the client gone: far more than was generated.
    assert wait_until(lambda: _remaining_tokens(server, key) > 300, "the refund", tries=60)


def test_the_daily_quota_is_insufficient_quota_and_the_sdk_does_not_retry(server):
    prompt = _prompt_tokens(server)
    key = _key(server, tier="free", tokens_per_day=prompt + 4 + 20)
    with openai.OpenAI(base_url=server.v1, api_key=key, max_retries=2, timeout=120) as client:
        reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                                  extra_body=EXACT)
        assert reply.headers["x-ratelimit-remaining-tokens-day"] == str(20)
        with pytest.raises(openai.RateLimitError) as info:
            _chat(client, max_tokens=30)
    sdk_error(info, status=429, code="insufficient_quota", kind="insufficient_quota")
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "x-stainless-retry-count" not in info.value.response.request.headers or \
        info.value.response.request.headers["x-stainless-retry-count"] == "0"  # no retry was sent


def test_every_authenticated_response_carries_the_headers(server):
    key = _key(server, tier="enterprise", rpm=100, tpm=10_000, tokens_per_day=50_000)
    models = httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    for kind in ("requests", "tokens", "tokens-day"):
        for part in ("limit", "remaining", "reset"):
            assert f"x-ratelimit-{part}-{kind}" in models.headers, (kind, part)
    assert models.headers["x-ratelimit-remaining-requests"] == "100"  # listing models spends nothing
    assert models.headers["x-request-id"]
    with sdk(server, key) as client:
        reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                                  extra_body=EXACT)
        bad = httpx.post(server.v1 + "/chat/completions", json={"model": MODEL}, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})
    assert reply.headers["x-ratelimit-remaining-requests"] == "99"
    assert reply.headers["x-ratelimit-reset-requests"] in ("600ms", "601ms")
    assert bad.status_code == 400 and bad.headers["x-ratelimit-limit-requests"] == "100"
    # A static key (and a server without authentication) has no budget: no headers.
    assert "x-ratelimit-limit-requests" not in httpx.get(server.v1 + "/models", headers=ADMIN, timeout=60).headers


def test_a_request_the_queue_refuses_costs_the_key_nothing(tiny_loaded, database_file):
    """Admission comes after the reservation; a refusal there (a full queue's 429, or here, 9 choices
    where 8 fit at all: a 400 from the same check) gives the request and its tokens back."""
    server = _start(tiny_loaded, database_file, max_queue=0)
    try:
        key = _key(server, tier="enterprise", rpm=2, tpm=2_000)
        with sdk(server, key) as client:
            for _ in range(3):
                with pytest.raises(openai.BadRequestError, match="9 sequences"):
                    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=9)
            assert _remaining_tokens(server, key) >= 1_999  # nothing was spent (and a refill)
            _chat(client)
            _chat(client)
            with pytest.raises(openai.RateLimitError):
                _chat(client)
    finally:
        server.stop()


@dataclasses.dataclass
class _Replica:
    """A server process, addressed as the helpers address a LiveServer."""

    url: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def test_two_server_processes_on_one_redis_share_one_budget(tiny_model_dir, database_file, redis_url):
    """Two `balansis serve` processes, as two replicas behind a load balancer: one key's requests
    per minute are counted once across both."""
    import subprocess
    import sys

    import redis

    from tests.serving.conftest import free_port, wait_until_ready

    client = redis.Redis.from_url(redis_url)
    for stale in client.scan_iter("balansis:ratelimit:*"):
        client.delete(stale)
    ports = [free_port(), free_port()]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--served-model-name", MODEL, "--no-warmup", "--max-num-seqs", "4", "--max-model-len", "256",
         "--kv-cache-memory", "8MiB", "--no-access-log", "--log-level", "warning", "--api-key", "admin-secret",
         "--require-auth", "--database-url", database_file, "--redis-url", redis_url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for port in ports]
    servers = [_Replica(f"http://127.0.0.1:{port}") for port in ports]
    try:
        for server, process in zip(servers, processes):
            if not wait_until_ready(server.url, processes):
                pytest.fail(f"a server did not become ready: {process.communicate(timeout=10)[0]}")
        key = _key(servers[0], tier="enterprise", rpm=3)
        with sdk(servers[0], key) as one, sdk(servers[1], key) as two:
            _chat(one)
            _chat(two)
            _chat(one)
            for replica in (two, one):
                with pytest.raises(openai.RateLimitError) as info:
                    _chat(replica)
                sdk_error(info, status=429, code="rate_limit_exceeded", kind="requests")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
