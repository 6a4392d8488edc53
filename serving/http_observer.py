"""Around every HTTP request (404s, 405s and CORS answers included): its id, its metrics, its
access-log line.

- Headers the request's guard or handler left in `state["response_headers"]` (the rate-limit
  headers of serving.rate_limits, the response cache's), unless the response carries its own (a
  429's).
- `X-Request-ID`: an inbound one is kept when it is sane (`REQUEST_ID_PATTERN`), else a fresh
  `req_…` replaces it; the response carries it back, and every log line logged while the request
  is handled carries it (serving.logs.REQUEST_ID).
- Metrics: `balansis:http_requests_total{method, route, status}` and the duration histogram,
  labelled by route template and by HTTP's own methods, so clients cannot grow the label set.
- Usage records: a request to a route that runs a model (serving.usage.METERED_ROUTES) gives one
  row when its response has ended, from the meter its handler left in `state["usage"]`; with
  authentication on, only once the caller is known (refused credentials are counted, not stored).
- The access log: one line per request (method, raw path, route, status, duration, request id,
  and the caller's user and key prefix once authenticated — never the key, never the body).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from serving.logs import REQUEST_ID
from serving.metrics import ServingMetrics
from serving.usage import METERED_ROUTES, usage_row

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

access_log = logging.getLogger("balansis.access")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when sane, else a fresh one."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID_PATTERN.fullmatch(text):
                return text
            break
    return f"req_{uuid.uuid4().hex}"


class HttpObserver:
    def __init__(self, app, metrics: ServingMetrics, *, log_requests: bool = True, record_usage=None,
                 log_prompts: bool = False, is_auth_on: bool = False):
        """`record_usage(row)` takes each usage record (None: none are made)."""
        self._app = app
        self._metrics = metrics
        self._log_requests = log_requests
        self._record_usage = record_usage
        self._log_prompts = log_prompts
        self._is_auth_on = is_auth_on

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        arrived = time.time()
        request_id = request_id_from(scope.get("headers", []))
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        status = 500  # what the client gets when the app fails before it answers

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                limits = scope["state"].get("response_headers")
                if limits:
                    present = {k.lower() for k, _ in headers}
                    headers += [(k.encode(), v.encode()) for k, v in limits.items() if k.encode() not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - started
            method = scope.get("method", "")
            method = method if method in _HTTP_METHODS else "other"
            route = scope.get("path_template") or "unmatched"  # Litestar sets it once a route matched
            self._metrics.http_requests.labels(method, route, str(status)).inc()
            self._metrics.http_duration.labels(method, route).observe(seconds)
            principal = scope["state"].get("principal")
            is_known = principal is not None or not self._is_auth_on
            if self._record_usage is not None and route in METERED_ROUTES and is_known:
                self._record_usage(usage_row(
                    request_id=request_id, endpoint=route, http_status=status, created_at=arrived, seconds=seconds,
                    user_id=None if principal is None else principal.user_id,
                    key_prefix=None if principal is None else principal.key_prefix,
                    model=scope["state"].get("model_name"), meter=scope["state"].get("usage"),
                    log_prompts=self._log_prompts))
            if self._log_requests:
                access_log.info("request", extra={
                    "method": method, "path": scope.get("path"), "route": route, "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "user": None if principal is None else principal.user_id,
                    "key_prefix": None if principal is None else principal.key_prefix})
            REQUEST_ID.reset(token)
