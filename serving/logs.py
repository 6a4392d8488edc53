"""The server's logs: one JSON object per line (default when stdout is no terminal) or text.

Every line carries a timestamp, level, logger and event; lines logged while
a request is handled carry its `request_id` (a context variable the HTTP
middleware sets: serving.http_observer). The access log is the middleware's
own line per request (`event: "request"`, with method, path, route, status,
duration_ms, request_id, user and key_prefix), in the same format; uvicorn's
access log is off. Credentials never reach a log line: the middleware logs
a key's display prefix, never the key, and request bodies are not logged.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import traceback

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("balansis_request_id", default=None)

# Fields a record may carry (logging's `extra=`), written beside the event.
FIELDS = ("request_id", "method", "path", "route", "status", "duration_ms", "user", "key_prefix", "model",
          "prompt_tokens", "completion_tokens", "finish_reason")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                    timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage()}
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(line, ensure_ascii=False, default=str)


class _RequestIdFilter(logging.Filter):
    """Gives each record the request id of the request being handled, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


def default_format() -> str:
    return "text" if sys.stdout.isatty() else "json"


def configure(*, level: str = "info", log_format: str | None = None) -> None:
    """Route every logger (ours, uvicorn's, litestar's) through one handler on stderr, in
    `log_format` ("json" or "text"; default: default_format())."""
    log_format = log_format or default_format()
    if log_format not in ("json", "text"):
        raise ValueError(f"log format must be json or text, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar"):  # theirs go through ours
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
