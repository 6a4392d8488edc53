"""Usage records: the store on SQLite and on the real PostgreSQL (batched writes, one row per
request id, totals per day, a database that is down), and a live server's rows against the `usage`
of its responses for a mixed run of completions, chat, streams, an abort and refusals."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from serving import database
from serving.usage_store import UsageStore
from tests.serving.conftest import MODEL, start_server
from tests.serving.test_errors import MESSAGES, sdk, wait_until

ADMIN = {"Authorization": "Bearer admin-secret"}
DAY = 86_400.0


def _row(request_id: str, **fields) -> dict:
    row = {"request_id": request_id, "created_at": 20_000 * DAY + 3600, "key_prefix": "sk-abc", "user_id": "u1",
           "model": "m", "endpoint": "/v1/chat/completions", "stream": False, "status": "ok", "http_status": 200,
           "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 5, "queue_ms": 1.0, "ttft_ms": 2.0,
           "total_ms": 30.0, "temperature": 1.0, "top_p": 1.0, "precision": "standard", "act_stability_score": 1.0,
           "prompt": None, "output": None}
    return row | fields


def test_rows_are_written_once_per_request_id_and_summed_per_day(database_url):
    store = UsageStore(database.connect(database_url), flush_seconds=0.05)
    store.submit(_row("a"))
    store.submit(_row("a", prompt_tokens=999))  # the same request id: stored once
    store.submit(_row("b", created_at=20_001 * DAY, status="rejected", http_status=429, prompt_tokens=0,
                      completion_tokens=0, user_id="u2"))
    store.submit(_row("c", created_at=20_001 * DAY + 5, status="aborted", completion_tokens=2, model="other"))
    assert store.flush()
    rows = store.rows()
    assert [r["request_id"] for r in rows] == ["a", "b", "c"] and rows[0]["prompt_tokens"] == 10
    totals, days = store.summary()
    assert totals == {"requests": 3, "ok": 1, "error": 0, "aborted": 1, "rejected": 1, "prompt_tokens": 20,
                      "completion_tokens": 7, "total_tokens": 27}
    assert [(d["date"], d["requests"], d["total_tokens"]) for d in days] == [
        ("2024-10-04", 1, 15), ("2024-10-05", 2, 12)]
    assert store.summary(user="u2")[0]["requests"] == 1
    assert store.summary(model="other")[0]["completion_tokens"] == 2
    assert store.summary(since=20_001 * DAY, until=20_001 * DAY + 1)[0]["requests"] == 1
    assert store.summary(key="sk-none")[0] == {k: 0 for k in totals}
    store.close()


def test_a_database_that_is_down_drops_rows_and_counts_them():
    dropped = []
    engine = database.connect("postgresql://postgres@127.0.0.1:1/nothing", migrate=False)  # nothing listens
    store = UsageStore(engine, on_dropped=dropped.append, flush_seconds=0.05)
    store.submit(_row("a"))
    store.submit(_row("b"))
    assert store.flush()
    assert sum(dropped) == 2
    store.close()


@pytest.fixture
def server(tiny_loaded, database_url):
    server = start_server(tiny_loaded, api_keys=("admin-secret",), require_auth=True, database_url=database_url,
                          max_auth_failures_per_minute=None)
    yield server
    server.stop()


def _key(server, **fields) -> str:
    response = httpx.post(server.url + "/admin/keys", json={"name": "metered", "tier": "enterprise", **fields},
                          headers=ADMIN, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()["key"]


def test_rows_equal_the_responses_usage_for_a_mixed_run(server):
    key = _key(server, user_id="alice", rpm=1000)
    limited = _key(server, user_id="bob", rpm=1)
    expected = {}  # request id → (status, prompt tokens, completion tokens)
    with sdk(server, key) as client:
        for i, max_tokens in enumerate((3, 5)):
            rid = f"chat-{i}-{uuid.uuid4().hex[:6]}"
            reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens,
                                                   extra_headers={"X-Request-ID": rid})
            expected[rid] = ("ok", reply.usage.prompt_tokens, reply.usage.completion_tokens)
        rid = f"cmpl-{uuid.uuid4().hex[:6]}"
        reply = client.completions.create(model=MODEL, prompt=["One", "Two three"], max_tokens=4, n=2,
                                          extra_headers={"X-Request-ID": rid})
        expected[rid] = ("ok", reply.usage.prompt_tokens, reply.usage.completion_tokens)
        rid = f"stream-{uuid.uuid4().hex[:6]}"
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True},
            extra_headers={"X-Request-ID": rid}))
        usage = chunks[-1].usage
        expected[rid] = ("ok", usage.prompt_tokens, usage.completion_tokens)
        rid = f"embed-{uuid.uuid4().hex[:6]}"
        reply = client.embeddings.create(model=MODEL, input=["a b c", "d"], extra_headers={"X-Request-ID": rid})
        expected[rid] = ("ok", reply.usage.prompt_tokens, 0)
        rid = f"bad-{uuid.uuid4().hex[:6]}"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000,
                                           extra_headers={"X-Request-ID": rid})
        expected[rid] = ("rejected", 0, 0)
        rid = f"abort-{uuid.uuid4().hex[:6]}"
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=400, stream=True,
                                                extra_body={"ignore_eos": True},
                                                extra_headers={"X-Request-ID": rid})
        next(iter(stream))
        stream.close()
        expected[rid] = ("aborted", None, None)
    with sdk(server, limited) as client:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                       extra_headers={"X-Request-ID": "bob-1"})
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                           extra_headers={"X-Request-ID": "bob-2"})
    store = server.state.usage_store

    def all_rows():
        assert store.flush()
        rows = {r["request_id"]: r for r in store.rows()}
        return rows if set(expected) | {"bob-1", "bob-2"} <= set(rows) else None

    rows = wait_until(all_rows, "every request's row")  # the aborted stream's ends when the server sees it
    for rid, (status, prompt_tokens, completion_tokens) in expected.items():
        row = rows[rid]
        assert row["status"] == status, (rid, row)
        assert (row["key_prefix"], row["user_id"], row["model"]) == (key[:12], "alice", MODEL)
        if prompt_tokens is not None:
            assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt_tokens, completion_tokens), rid
        assert row["prompt"] is None and row["output"] is None  # without --log-prompts
    aborted = rows[next(r for r in expected if r.startswith("abort"))]
    assert aborted["http_status"] == 200 and 0 < aborted["completion_tokens"] < 400 and aborted["stream"]
    assert rows[next(r for r in expected if r.startswith("stream"))]["ttft_ms"] > 0
    chat = rows[next(r for r in expected if r.startswith("chat-1"))]
    assert chat["precision"] == "standard" and chat["endpoint"] == "/v1/chat/completions"
    assert chat["finish_reason"] in ("stop", "length") and chat["total_ms"] >= chat["ttft_ms"] > 0
    assert (rows["bob-1"]["status"], rows["bob-2"]["status"], rows["bob-2"]["http_status"]) == ("ok", "rejected", 429)
    # The admin API's totals are the rows' sums.
    report = httpx.get(server.url + "/admin/usage", params={"user": "alice"}, headers=ADMIN, timeout=60).json()
    alice = [r for r in rows.values() if r["user_id"] == "alice"]
    assert report["totals"]["requests"] == len(alice)
    assert report["totals"]["total_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in alice)
    assert report["totals"]["aborted"] == 1 and report["totals"]["rejected"] == 1
    assert sum(d["requests"] for d in report["days"]) == len(alice)
    stats = httpx.get(server.url + "/admin/stats", headers=ADMIN, timeout=60).json()
    (model,) = stats["models"]
    assert model["model"] == MODEL and model["state"] == "loaded" and model["requests"] == len(rows)
    assert model["e2e_ms"]["p50"] > 0 and model["num_running"] == 0


def test_a_repeated_request_id_is_stored_once(server):
    key = _key(server)
    with sdk(server, key) as client:
        for _ in range(2):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                           extra_headers={"X-Request-ID": "same-id"})
    store = server.state.usage_store
    assert store.flush()
    assert [r["request_id"] for r in store.rows()].count("same-id") == 1


def test_prompts_and_outputs_are_kept_only_with_log_prompts(tiny_loaded, tmp_path):
    server = start_server(tiny_loaded, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", log_prompts=True)
    try:
        with sdk(server) as client:
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "MARKER-42"}],
                                                   max_tokens=3, extra_headers={"X-Request-ID": "logged"})
        store = server.state.usage_store
        assert store.flush()
        (row,) = [r for r in store.rows() if r["request_id"] == "logged"]
        assert "MARKER-42" in row["prompt"] and reply.choices[0].message.content in row["output"]
        assert row["user_id"] is None  # no authentication: nobody to name
    finally:
        server.stop()


def test_admin_usage_takes_iso_dates_and_refuses_nonsense(server):
    ok = httpx.get(server.url + "/admin/usage", params={"since": "2026-01-01", "until": time.time()},
                   headers=ADMIN, timeout=60)
    assert ok.status_code == 200 and ok.json()["since"] == 1767225600.0
    bad = httpx.get(server.url + "/admin/usage", params={"since": "yesterday"}, headers=ADMIN, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
