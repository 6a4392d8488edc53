"""Bearer JWTs (serving.jwt_auth): what is accepted and every classic forgery refused, keys from a
secret, a PEM file and a JWKS served over HTTP; then a live server through the `openai` SDK."""

from __future__ import annotations

import http.server
import json
import threading
import time

import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from serving.api_keys import Role, Tier
from serving.jwt_auth import InvalidToken, JwtSettings, JwtVerifier
from tests.serving.conftest import MODEL, start_server
from tests.serving.test_errors import MESSAGES, sdk, sdk_error

SECRET = "s" * 40


def _claims(**overrides) -> dict:
    now = int(time.time())
    claims = {"sub": "alice", "exp": now + 600, "iat": now}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _refused(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    return str(info.value)


def test_a_valid_hs256_token_gives_its_claims():
    verifier = JwtVerifier(JwtSettings(secret=SECRET))
    claims = verifier.verify(jwt.encode(_claims(role="admin", tier="pro", models=["tiny"]), SECRET, "HS256"))
    assert (claims.user_id, claims.role, claims.tier, claims.models) == ("alice", Role.ADMIN, Tier.PRO, ("tiny",))
    plain = verifier.verify(jwt.encode(_claims(), SECRET, "HS256"))
    assert (plain.role, plain.tier, plain.models, plain.precisions) == (Role.USER, Tier.FREE, (), ())
    levels = verifier.verify(jwt.encode(_claims(precisions=["standard"]), SECRET, "HS256"))
    assert levels.precisions == ("standard",)
    _refused(verifier, jwt.encode(_claims(precisions=["fast"]), SECRET, "HS256"))


def test_a_tokens_user_spends_one_budget_by_its_sub():
    """JWTs have no key: their rate limits are their user's (serving.rate_limits), by tier."""
    from serving.auth import Authenticator
    from serving.rate_limits import TIER_LIMITS

    authenticator = Authenticator(jwt=JwtVerifier(JwtSettings(secret=SECRET)))
    principal = authenticator.authenticate("Bearer " + jwt.encode(_claims(tier="pro"), SECRET, "HS256"))
    assert principal.budget.owner == "user:alice" and principal.budget.limits == TIER_LIMITS[Tier.PRO]


def test_forged_expired_and_incomplete_tokens_are_refused():
    verifier = JwtVerifier(JwtSettings(secret=SECRET, issuer="https://issuer", audience="balansis"))
    good = dict(iss="https://issuer", aud="balansis")
    assert verifier.verify(jwt.encode(_claims(**good), SECRET, "HS256")).user_id == "alice"
    now = int(time.time())
    unsigned = jwt.encode(_claims(**good), None, algorithm="none")
    cases = {
        "alg none": unsigned,
        "another secret": jwt.encode(_claims(**good), "t" * 40, "HS256"),
        "expired beyond the leeway": jwt.encode(_claims(exp=now - 31, **good), SECRET, "HS256"),
        "not yet valid": jwt.encode(_claims(nbf=now + 120, **good), SECRET, "HS256"),
        "wrong audience": jwt.encode(_claims(iss="https://issuer", aud="someone-else"), SECRET, "HS256"),
        "wrong issuer": jwt.encode(_claims(iss="https://evil", aud="balansis"), SECRET, "HS256"),
        "no sub": jwt.encode(_claims(sub=None, **good), SECRET, "HS256"),
        "no exp": jwt.encode(_claims(exp=None, **good), SECRET, "HS256"),
        "an unknown role": jwt.encode(_claims(role="root", **good), SECRET, "HS256"),
        "a tampered payload": _tampered(jwt.encode(_claims(**good), SECRET, "HS256")),
        "not a token": "a.b.c",
    }
    for case, token in cases.items():
        assert _refused(verifier, token), case
    # Within the leeway an expired token still passes.
    assert verifier.verify(jwt.encode(_claims(exp=now - 10, **good), SECRET, "HS256"))


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    data = json.loads(jwt.utils.base64url_decode(payload))
    data["role"] = "admin"
    return ".".join([header, jwt.utils.base64url_encode(json.dumps(data).encode()).decode(), signature])


def _rsa():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public


def test_public_keys_take_rs256_and_es256_and_refuse_an_hs256_token_signed_with_the_public_key(tmp_path):
    key, public = _rsa()
    path = tmp_path / "public.pem"
    path.write_bytes(public)
    verifier = JwtVerifier(JwtSettings(public_key_file=str(path)))
    assert verifier.verify(jwt.encode(_claims(), key, "RS256")).user_id == "alice"
    # The algorithm-confusion attack: the public key (known to all) used as an HMAC secret.
    assert _refused(verifier, _hs256_with_raw_key(public))
    assert _refused(verifier, jwt.encode(_claims(), _rsa()[0], "RS256"))  # another key pair
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    assert JwtVerifier(JwtSettings(public_key_file=str(ec_path))).verify(
        jwt.encode(_claims(), ec_key, "ES256")).user_id == "alice"


def _hs256_with_raw_key(secret: bytes) -> str:
    """An HS256 token keyed with `secret`, built by hand (PyJWT itself refuses to sign with a PEM key)."""
    import hashlib
    import hmac

    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(_claims()).encode())
    signature = hmac.new(secret, header + b"." + payload, hashlib.sha256).digest()
    return b".".join([header, payload, jwt.utils.base64url_encode(signature)]).decode()


@pytest.fixture
def jwks_url():
    """A JWKS of one RSA key (kid "k1") served over HTTP on a free port."""
    key, _ = _rsa()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/jwks.json", key
    server.shutdown()


def test_a_jwks_url_gives_the_signing_key_by_kid(jwks_url):
    url, key = jwks_url
    verifier = JwtVerifier(JwtSettings(jwks_url=url))
    token = jwt.encode(_claims(), key, "RS256", headers={"kid": "k1"})
    assert verifier.verify(token).user_id == "alice"
    assert _refused(verifier, jwt.encode(_claims(), key, "RS256", headers={"kid": "unknown"}))
    assert _refused(verifier, jwt.encode(_claims(), SECRET, "HS256", headers={"kid": "k1"}))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="32 bytes"):
        JwtSettings(secret="short")
    with pytest.raises(ValueError, match="one JWT key source"):
        JwtSettings(secret=SECRET, jwks_url="http://x")
    assert not JwtSettings().is_on


@pytest.fixture(scope="module")
def jwt_server(tiny_loaded):
    server = start_server(tiny_loaded, jwt=JwtSettings(secret=SECRET, audience="balansis"))
    yield server
    server.stop()


def test_a_live_server_takes_a_token_and_refuses_a_bad_one(jwt_server):
    token = jwt.encode(_claims(aud="balansis"), SECRET, "HS256")
    with sdk(jwt_server, api_key=token) as client:
        assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
    for bad in (jwt.encode(_claims(aud="balansis", exp=int(time.time()) - 60), SECRET, "HS256"),
                jwt.encode(_claims(aud="other"), SECRET, "HS256"),
                jwt.encode(_claims(aud="balansis"), None, algorithm="none")):
        with sdk(jwt_server, api_key=bad) as client, pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        sdk_error(info, status=401, code="invalid_api_key", kind="authentication_error")
    limited = jwt.encode(_claims(aud="balansis", models=["other"]), SECRET, "HS256")
    with sdk(jwt_server, api_key=limited) as client, pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
