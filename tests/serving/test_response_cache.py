"""`--response-cache`: repeated deterministic requests answered from the cache (in memory and in the
real Redis), under a fresh id, costing no tokens; everything else goes to the engine."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import MODEL, start_server
from tests.serving.test_errors import MESSAGES

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def cached_server(tiny_loaded, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('cache') / 'db.sqlite'}"
    server = start_server(tiny_loaded, response_cache=True, api_keys=("admin-secret",), require_auth=True,
                          database_url=url, max_auth_failures_per_minute=None)
    yield server
    server.stop()


def _post(server, path: str, body: dict, key: str = "admin-secret", **headers) -> httpx.Response:
    response = httpx.post(server.v1 + path, json={"model": MODEL, **body}, timeout=120,
                          headers={"Authorization": f"Bearer {key}", **headers})
    assert response.status_code == 200, response.text
    return response


def test_a_repeated_greedy_chat_is_a_hit_under_a_fresh_id(cached_server):
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    first = _post(cached_server, "/chat/completions", body)
    second = _post(cached_server, "/chat/completions", {**body, "user": "someone else"})  # user changes nothing
    assert (first.headers["x-balansis-cache"], second.headers["x-balansis-cache"]) == ("miss", "hit")
    a, b = first.json(), second.json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"] and a["id"] != b["id"]
    other = _post(cached_server, "/chat/completions", {**body, "max_tokens": 5})
    assert other.headers["x-balansis-cache"] == "miss"


def test_seeded_completions_are_cached_and_unseeded_sampling_is_not(cached_server):
    body = {"prompt": ["One", "Two"], "max_tokens": 4, "temperature": 1.0, "seed": 11, "n": 2}
    first, second = (_post(cached_server, "/completions", body) for _ in range(2))
    assert second.headers["x-balansis-cache"] == "hit" and first.json()["choices"] == second.json()["choices"]
    sampled = _post(cached_server, "/completions", {"prompt": "One", "max_tokens": 4, "temperature": 1.0})
    assert "x-balansis-cache" not in sampled.headers
    streamed = httpx.post(cached_server.v1 + "/completions", headers=ADMIN, timeout=120, json={
        "model": MODEL, "prompt": "One", "max_tokens": 4, "temperature": 0, "stream": True})
    assert streamed.status_code == 200 and "x-balansis-cache" not in streamed.headers


def test_a_hit_costs_a_request_and_no_tokens_and_has_its_usage_row(cached_server):
    created = httpx.post(cached_server.url + "/admin/keys", headers=ADMIN, timeout=60,
                         json={"name": "cached", "tier": "enterprise", "rpm": 100, "tpm": 100_000})
    key = created.json()["key"]
    body = {"messages": [{"role": "user", "content": "cache me"}], "max_tokens": 5, "temperature": 0}
    _post(cached_server, "/chat/completions", body, key=key)
    hit = _post(cached_server, "/chat/completions", body, key=key, **{"X-Request-ID": "cache-hit-1"})
    assert hit.headers["x-balansis-cache"] == "hit"
    assert hit.headers["x-ratelimit-remaining-requests"] == "98"
    assert int(hit.headers["x-ratelimit-remaining-tokens"]) >= 100_000 - hit.json()["usage"]["total_tokens"]
    store = cached_server.state.usage_store
    assert store.flush()
    (row,) = [r for r in store.rows() if r["request_id"] == "cache-hit-1"]
    usage = hit.json()["usage"]
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "ok", usage["prompt_tokens"], usage["completion_tokens"])


def test_the_cache_lives_in_redis_when_given(tiny_loaded, redis_url):
    import redis

    server = start_server(tiny_loaded, response_cache=True, redis_url=redis_url, response_cache_ttl=60)
    try:
        body = {"messages": [{"role": "user", "content": "in redis"}], "max_tokens": 3, "temperature": 0}
        httpx.post(server.v1 + "/chat/completions", json={"model": MODEL, **body}, timeout=120)
        keys = list(redis.Redis.from_url(redis_url).scan_iter("balansis:response:*"))
        assert keys and 0 < redis.Redis.from_url(redis_url).ttl(keys[0]) <= 60
        again = httpx.post(server.v1 + "/chat/completions", json={"model": MODEL, **body}, timeout=120)
        assert again.headers["x-balansis-cache"] == "hit"
    finally:
        server.stop()
