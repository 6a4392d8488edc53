"""`balansis serve --log-format json` as a process: every line it writes parses as JSON, the access
log carries each request's id (an inbound sane X-Request-ID kept, an insane one replaced), and
neither a key nor a prompt appears in any line."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import httpx
import openai
import pytest

from serving.api_keys import KeyStore
from serving import database
from tests.serving.conftest import MODEL, free_port, wait_until_ready


def test_every_line_is_json_and_carries_no_secret(tiny_model_dir, tmp_path):  # noqa: F811
    url_db = f"sqlite:///{tmp_path / 'keys.db'}"
    stored_key, record = KeyStore(database.connect(url_db)).create(name="logged", actor="cli")
    static_key = f"static-{uuid.uuid4().hex}"
    marker = f"prompt-marker-{uuid.uuid4().hex}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--served-model-name", MODEL, "--no-warmup", "--max-num-seqs", "4", "--max-model-len", "256",
         "--kv-cache-memory", "8MiB", "--log-format", "json", "--api-key", static_key, "--database-url", url_db],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if not wait_until_ready(url, [process]):
            pytest.fail(f"the server did not become ready: {process.communicate(timeout=10)[0]}")
        for key in (stored_key, static_key):
            with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": marker}],
                                               max_tokens=2)
        kept = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {stored_key}",
                                                      "X-Request-ID": "trace-42.a_b"}, timeout=60)
        assert kept.headers["x-request-id"] == "trace-42.a_b"
        replaced = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {stored_key}",
                                                          "X-Request-ID": "bad id; " + "x" * 200}, timeout=60)
        assert replaced.headers["x-request-id"].startswith("req_")
        refused = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong-key"}, timeout=60)
        assert refused.status_code == 401 and refused.headers["x-request-id"].startswith("req_")
    finally:
        process.terminate()
        output = process.communicate(timeout=120)[0]
    lines = [line for line in output.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))  # every line, start-up and shutdown included
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all({"timestamp", "level", "logger", "event"} <= set(r) for r in records)
    for secret in (stored_key, static_key, marker, "wrong-key"):
        assert secret not in output, secret
    access = [r for r in records if r["logger"] == "balansis.access"]
    by_id = {r["request_id"]: r for r in access}
    assert by_id["trace-42.a_b"]["route"] == "/v1/models" and by_id["trace-42.a_b"]["status"] == 200
    assert by_id["trace-42.a_b"]["key_prefix"] == record.prefix and by_id["trace-42.a_b"]["user"] == "logged"
    assert by_id[refused.headers["x-request-id"]]["status"] == 401
    chats = [r for r in access if r["route"] == "/v1/chat/completions"]
    assert [r["user"] for r in chats] == ["logged", "static key"]
    assert all(r["duration_ms"] > 0 for r in chats)
