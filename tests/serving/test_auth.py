"""Stored API keys against a live server, through the official `openai` SDK: the admin API
creates and revokes them, a created key works, a revoked or expired one is a 401, a non-admin on
/admin is a 403, a key's model list is enforced, and every route but the probes, the metrics and
the docs is closed without a key."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from serving import database
from serving.api_keys import KeyStore
from tests.serving.conftest import MODEL, start_server
from tests.serving.test_errors import MESSAGES, error_of, sdk, sdk_error, wait_until

ADMIN = {"Authorization": "Bearer admin-secret"}
OPEN_ROUTES = {"/health", "/ready", "/metrics"}


@pytest.fixture(scope="module")
def keyed_server(tiny_loaded, tmp_path_factory):
    """Authentication required: the static admin key `admin-secret` and the stored keys."""
    url = f"sqlite:///{tmp_path_factory.mktemp('keys') / 'keys.db'}"
    server = start_server(tiny_loaded, api_keys=("admin-secret",), require_auth=True, database_url=url,
                          max_auth_failures_per_minute=None)  # the route walk sends many bad keys
    server.database_url = url
    yield server
    server.stop()


def _create(server, **fields) -> dict:
    response = httpx.post(server.url + "/admin/keys", json={"name": "test", **fields}, headers=ADMIN, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()


def _chat(server, key: str, model: str = MODEL):
    with sdk(server, api_key=key) as client:
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)


def test_a_created_key_works_and_a_revoked_one_is_401(keyed_server):
    made = _create(keyed_server, tier="pro")
    assert made["key"].startswith("sk-") and made["record"]["prefix"] == made["key"][:12]
    assert _chat(keyed_server, made["key"]).usage.completion_tokens >= 1
    listed = httpx.get(keyed_server.url + "/admin/keys", headers=ADMIN, timeout=60).json()
    assert made["record"]["prefix"] in [r["prefix"] for r in listed["data"]]
    assert made["key"] not in str(listed)
    revoked = httpx.delete(keyed_server.url + f"/admin/keys/{made['record']['prefix']}", headers=ADMIN, timeout=60)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as info:
        _chat(keyed_server, made["key"])
    sdk_error(info, status=401, code="invalid_api_key", kind="authentication_error")
    error_of(httpx.delete(keyed_server.url + "/admin/keys/sk-nothing", headers=ADMIN, timeout=60),
             status=404, code="key_not_found", param="prefix")


def test_an_expired_key_is_401(keyed_server):
    made = _create(keyed_server, expires_in="1s")

    def refused():
        try:
            _chat(keyed_server, made["key"])
        except openai.AuthenticationError:
            return True
        return False
    assert wait_until(refused, "the key to expire")


def test_a_key_from_the_command_line_store_works_on_the_server(keyed_server):
    """`balansis keys create` writes to the same database the server reads."""
    key, _ = KeyStore(database.connect(keyed_server.database_url)).create(name="from-cli", actor="cli")
    assert _chat(keyed_server, key).choices


def test_a_user_key_on_admin_routes_is_403(keyed_server):
    user = _create(keyed_server)["key"]
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/sk-x")):
        response = httpx.request(method, keyed_server.url + path, json={"name": "x"} if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {user}"}, timeout=60)
        error_of(response, status=403, code="insufficient_permissions", kind="permission_error")
    admin = _create(keyed_server, role="admin")["key"]
    assert httpx.get(keyed_server.url + "/admin/keys", headers={"Authorization": f"Bearer {admin}"},
                     timeout=60).status_code == 200


def test_a_model_outside_the_keys_list_is_403(keyed_server):
    key = _create(keyed_server, models=["another-model"])["key"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        _chat(keyed_server, key)
    sdk_error(info, status=403, code="model_not_allowed", param="model", kind="permission_error")
    with sdk(keyed_server, api_key=key) as client:
        assert client.models.list().data == []  # it lists only what the key may use
    allowed = _create(keyed_server, models=[MODEL])["key"]
    assert _chat(keyed_server, allowed).choices


def test_bad_admin_bodies_are_400(keyed_server):
    for fields, param in (({"role": "root"}, "role"), ({"expires_in": "soon"}, "expires_in"),
                          ({"rpm": 0}, "rpm"), ({"name": ""}, "name")):
        response = httpx.post(keyed_server.url + "/admin/keys", json={"name": "x", **fields}, headers=ADMIN,
                              timeout=60)
        error_of(response, status=400, code="invalid_value", param=param)


def _routes(server) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, path parameters filled in."""
    out = []
    for route in server.app.routes:
        for method in sorted(getattr(route, "methods", ())):
            if method in ("HEAD", "OPTIONS"):
                continue
            out.append((method, re.sub(r"\{[^}]*\}", "x", route.path)))
    return out


def test_every_route_but_probes_metrics_and_docs_needs_a_key(keyed_server):
    routes = _routes(keyed_server)
    closed = [(m, p) for m, p in routes if p not in OPEN_ROUTES and not p.startswith("/docs")]
    assert {"/v1/chat/completions", "/admin/keys", "/version", "/tokenize"} <= {p for _, p in closed}
    for method, path in closed:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer sk-" + "a" * 43}):
            response = httpx.request(method, keyed_server.url + path, headers=headers, timeout=60,
                                     json={} if method in ("POST", "PUT", "PATCH") else None)
            error_of(response, status=401, code="invalid_api_key", kind="authentication_error")
    for path in sorted(OPEN_ROUTES) + ["/docs/openapi.json"]:
        assert httpx.get(keyed_server.url + path, timeout=60).status_code == 200, path


def test_the_admin_api_stays_closed_on_a_server_without_authentication(live_server):
    """Anyone may use an open server's models, but not the key store it may share with replicas."""
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/sk-x")):
        response = httpx.request(method, live_server.url + path, json={"name": "x"} if method == "POST" else None,
                                 timeout=60)
        error_of(response, status=403, code="insufficient_permissions", kind="permission_error")


def test_an_address_that_keeps_guessing_keys_gets_429s(tiny_loaded):
    """After 3 refused credentials in a minute (the flag's value here; 10 by default) an address gets
    429s with Retry-After, a good key included, until its window frees."""
    server = start_server(tiny_loaded, api_keys=("good-key",), max_auth_failures_per_minute=3)
    try:
        for _ in range(3):
            error_of(httpx.get(server.v1 + "/models", headers={"Authorization": "Bearer guess"}, timeout=60),
                     status=401, code="invalid_api_key", kind="authentication_error")
        for headers in ({"Authorization": "Bearer guess"}, {"Authorization": "Bearer good-key"}):
            response = httpx.get(server.v1 + "/models", headers=headers, timeout=60)
            error_of(response, status=429, code="rate_limit_exceeded", kind="rate_limit_error")
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert int(response.headers["retry-after-ms"]) == 1000 * int(response.headers["retry-after"])
        assert httpx.get(server.url + "/health", timeout=60).status_code == 200  # probes stay open
        metrics = httpx.get(server.url + "/metrics", timeout=60).text
        assert 'balansis:rate_limited_total{reason="auth_failures"} 2.0' in metrics
    finally:
        server.stop()


def test_a_key_without_a_level_gets_403_for_it(keyed_server):
    key = _create(keyed_server, precisions=["standard", "high"])["key"]
    assert _chat(keyed_server, key).choices  # the server's default level, standard
    with sdk(keyed_server, api_key=key) as client, pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"precision": "ultra"})
    sdk_error(info, status=403, code="precision_not_allowed", param="precision", kind="permission_error")
    seed = httpx.post(keyed_server.url + "/api/v1/generate", json={"prompt": "Hi", "act_precision": "ultra"},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)
    error_of(seed, status=403, code="precision_not_allowed", param="act_precision", kind="permission_error")
    levels = httpx.get(keyed_server.url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=60).json()
    assert levels["models"][0]["precision_levels"] == ["standard", "high"]
    refused = httpx.post(keyed_server.url + "/admin/keys", json={"name": "x", "precisions": ["fast"]}, headers=ADMIN,
                         timeout=60)
    assert refused.status_code == 400


def test_a_server_can_refuse_a_level_to_everyone(tiny_loaded):
    server = start_server(tiny_loaded, allowed_precisions=("standard",))
    try:
        with sdk(server) as client, pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                           extra_body={"precision": "high"})
        sdk_error(info, status=403, code="precision_not_allowed", param="precision", kind="permission_error")
    finally:
        server.stop()
