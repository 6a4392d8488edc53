"""Who is asking: one policy for every route but the probes, the metrics and the docs.

With authentication on (static `--api-key`s, `--require-auth` for the
stored keys, or a JWT key source), a request sends `Authorization: Bearer
KEY` (or a JWT); `authenticate` turns that into a `Principal` or a 401.
Static keys are admins (compared in constant time); stored keys
(serving.api_keys) carry their own role, tier and models; a JWT
(serving.jwt_auth) its claims. `/admin/*` needs the admin role (403 otherwise), and a model
outside a key's list is a 403 where the route resolves the model.
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import time

from limits import RateLimitItemPerMinute, storage, strategies

from serving.api_keys import KEY_PREFIX, ApiKey, KeyStore, Role, Tier
from serving.errors import RequestError
from serving.jwt_auth import InvalidToken, JwtVerifier
from serving.rate_limits import Budget, limits_for


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request."""

    user_id: str
    role: Role
    tier: Tier
    models: tuple[str, ...] = ()  # empty: every model
    precisions: tuple[str, ...] = ()  # precision levels it may ask for; empty: every one the server allows
    key_prefix: str | None = None  # a stored key's display prefix
    api_key: ApiKey | None = None  # the stored key's record (its limits)
    is_limited: bool = True  # False for static keys and without authentication: no budget

    @property
    def budget(self) -> Budget | None:
        """Whose rate limits this caller spends (serving.rate_limits): its stored key's, else its user's
        (a JWT's `sub`); None when nothing limits it."""
        if not self.is_limited:
            return None
        owner = f"key:{self.key_prefix}" if self.key_prefix is not None else f"user:{self.user_id}"
        return Budget(owner, limits_for(self.tier, self.api_key))

    @property
    def actor(self) -> str:
        """How audit rows name this caller."""
        return self.key_prefix or self.user_id

    def check_model(self, name: str) -> None:
        if self.models and name not in self.models:
            raise RequestError(f"this API key may not use the model {name!r}", status_code=403,
                               code="model_not_allowed", param="model")

    def check_precision(self, level: str, *, param: str = "precision") -> None:
        if self.precisions and level not in self.precisions:
            raise RequestError(f"this API key may not use the {level!r} precision level (it may use "
                               f"{', '.join(self.precisions)})", status_code=403, code="precision_not_allowed",
                               param=param)

    def check_admin(self) -> None:
        if self.role is not Role.ADMIN:
            raise RequestError("this route needs an admin key", status_code=403, code="insufficient_permissions")


# Without authentication every caller is this: an admin, so nothing is refused.
ANONYMOUS = Principal(user_id="anonymous", role=Role.ADMIN, tier=Tier.ENTERPRISE, is_limited=False)
STATIC = Principal(user_id="static key", role=Role.ADMIN, tier=Tier.ENTERPRISE, is_limited=False)


class FailureLimit:
    """At most `per_minute` refused credentials per client address in any minute (a moving window,
    the `limits` library's); past that, the address gets a 429 until its window frees, so keys
    cannot be guessed at speed. In this process's memory (a replica counts its own)."""

    def __init__(self, per_minute: int):
        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def check(self, address: str) -> None:
        """A 429 when `address` has used up its failures."""
        if self._limiter.test(self._item, "auth-failures", address):
            return
        reset = self._limiter.get_window_stats(self._item, "auth-failures", address).reset_time
        seconds = max(1, math.ceil(reset - time.time()))
        raise RequestError(f"too many refused credentials from this address; retry in {seconds} s",
                           status_code=429, code="rate_limit_exceeded",
                           headers={"Retry-After": str(seconds), "retry-after-ms": str(seconds * 1000)})

    def count(self, address: str) -> None:
        self._limiter.hit(self._item, "auth-failures", address)


def principal_of(connection) -> Principal:
    """The caller the auth guard found for this request (ANONYMOUS on an open route)."""
    return getattr(connection.state, "principal", ANONYMOUS)


class Authenticator:
    def __init__(self, *, static_keys: tuple[str, ...] = (), store: KeyStore | None = None,
                 required: bool = False, jwt: JwtVerifier | None = None):
        """`required`: stored keys are checked even without static keys (`--require-auth`)."""
        self._static = tuple(k.encode() for k in static_keys)
        self.store = store
        self._jwt = jwt
        self.is_on = bool(static_keys) or required or jwt is not None

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request whose Authorization header is `authorization`, or a 401."""
        if not self.is_on:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise RequestError("missing API key: send it as 'Authorization: Bearer KEY'", status_code=401,
                               code="invalid_api_key")
        encoded = token.encode()
        # Every static key is compared, so the time taken does not tell which one was close.
        if any([hmac.compare_digest(encoded, key) for key in self._static]):  # noqa: C419 (a list: all compared)
            return STATIC
        if self._jwt is not None and not token.startswith(KEY_PREFIX) and token.count(".") == 2:
            try:
                claims = self._jwt.verify(token)
            except InvalidToken as e:
                raise RequestError(f"invalid token: {e}", status_code=401, code="invalid_api_key") from None
            return Principal(user_id=claims.user_id, role=claims.role, tier=claims.tier, models=claims.models,
                             precisions=claims.precisions)
        record = self.store.verify(token) if self.store is not None else None
        if record is None:
            raise RequestError("incorrect API key provided, or it expired or was revoked", status_code=401,
                               code="invalid_api_key")
        return Principal(user_id=record.user_id, role=record.role, tier=record.tier, models=record.models,
                         precisions=record.precisions, key_prefix=record.prefix, api_key=record)
