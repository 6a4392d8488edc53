"""Bearer JWTs (PyJWT): an HS256 secret, or RS256/ES256 public keys from a PEM file or a JWKS URL.

Each kind of key accepts only its own algorithms, so a token cannot pick
its verifier: `alg: none` is refused, and so is an HS256 token "signed"
with an RSA public key as its secret. `exp` and `sub` are required; `nbf`
and `iat` are checked when present; `iss` and `aud` when the server names
them; 30 s of leeway for clocks. `sub` is the user; a `role` claim (`admin`
or `user`, default `user`) and a `tier` claim (default `free`) apply as for
API keys, and `models` and `precisions` claims (lists) limit the models and precision levels as a
key's lists do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jwt

from serving.api_keys import PRECISION_LEVELS, Role, Tier

LEEWAY_SECONDS = 30
MIN_SECRET_BYTES = 32
_PUBLIC_ALGORITHMS = ["RS256", "ES256"]


@dataclasses.dataclass(frozen=True, slots=True)
class JwtSettings:
    """`balansis serve`'s --jwt-* flags; at most one of secret, public_key_file and jwks_url."""

    secret: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None

    def __post_init__(self):
        given = [n for n in ("secret", "public_key_file", "jwks_url") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give one JWT key source, not {' and '.join(given)}")
        if self.secret is not None and len(self.secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"a JWT secret must be at least {MIN_SECRET_BYTES} bytes "
                             f"(got {len(self.secret.encode())})")

    @property
    def is_on(self) -> bool:
        return bool(self.secret or self.public_key_file or self.jwks_url)


@dataclasses.dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: str
    role: Role
    tier: Tier
    models: tuple[str, ...]
    precisions: tuple[str, ...] = ()


class InvalidToken(Exception):
    """Why a token was refused (the message goes into the 401)."""


class JwtVerifier:
    def __init__(self, settings: JwtSettings):
        self._settings = settings
        self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True) if settings.jwks_url else None
        self._public_key = (Path(settings.public_key_file).read_text() if settings.public_key_file else None)

    def verify(self, token: str) -> TokenClaims:
        """The claims of a valid token; InvalidToken otherwise."""
        settings = self._settings
        try:
            if settings.secret is not None:
                key, algorithms = settings.secret, ["HS256"]
            elif self._jwks is not None:
                key, algorithms = self._jwks.get_signing_key_from_jwt(token).key, _PUBLIC_ALGORITHMS
            else:
                key, algorithms = self._public_key, _PUBLIC_ALGORITHMS
            claims = jwt.decode(token, key, algorithms=algorithms, leeway=LEEWAY_SECONDS,
                                issuer=settings.issuer, audience=settings.audience,
                                options={"require": ["exp", "sub"], "verify_aud": settings.audience is not None})
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise InvalidToken(str(e) or type(e).__name__) from None
        try:
            models = claims.get("models") or ()
            if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
                raise ValueError("the models claim must be a list of model names")
            precisions = claims.get("precisions") or ()
            if not isinstance(precisions, (list, tuple)) or not all(p in PRECISION_LEVELS for p in precisions):
                raise ValueError(f"the precisions claim must be a list of {list(PRECISION_LEVELS)}")
            if not isinstance(claims["sub"], str) or not claims["sub"]:
                raise ValueError("the sub claim must be a non-empty string")
            return TokenClaims(user_id=claims["sub"], role=Role(claims.get("role", "user")),
                               tier=Tier(claims.get("tier", "free")), models=tuple(models),
                               precisions=tuple(precisions))
        except ValueError as e:
            raise InvalidToken(str(e)) from None
