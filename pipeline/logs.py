"""structlog set-up: JSON lines when stderr is not a TTY, readable console output when it is.

Every entry carries ``event`` (what happened, snake_case), ``level``, ``timestamp`` (ISO 8601 UTC)
and, where they apply, ``worker_id``, ``shard_id``, ``sequence_number`` and ``sink``.

Secrets never reach the logs:

- values under keys that look like credentials (password, secret, token, authorization, access
  key) are replaced by ``***`` before rendering;
- exceptions are rendered **without frame locals** (structlog's ``ExceptionDictTransformer`` and
  the console renderer show them by default; a local holding ``aws_secret_access_key`` would be
  printed in clear), only type, message and file/line/function per frame;
- every rendered line passes :func:`pipeline.redact.redact_text` (credentials in URLs) and has
  each value given to :func:`register_secret` (the configured AWS secret key and session token,
  OpenSearch password, Redis URL password) replaced by ``***``;
- library loggers (stdlib ``logging``: botocore, urllib3, opensearch, redis) and ``warnings`` go
  through the same processors and renderer (structlog's ``ProcessorFormatter``), so they are JSON
  lines too, at WARNING and above.
"""

from __future__ import annotations

import json

import logging
import re
import sys
import threading
from typing import Any

import orjson
import structlog

from pipeline.redact import MASK, redact_text

_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|authori[sz]ation|access_?key|api_?key|credential)", re.I)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
#: secrets shorter than this are not scrubbed literally (they would mask ordinary words)
MIN_SECRET_LENGTH = 4


def register_secret(value: str | None) -> None:
    """Scrub ``value`` (a password, a secret key) from every log line from now on, in its raw,
    JSON-escaped and ``repr`` forms. Values shorter than :data:`MIN_SECRET_LENGTH` characters
    are ignored."""
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    # orjson keeps UTF-8; json.dumps (structlog's JSONRenderer, stdlib formatters) escapes it as \uXXXX
    forms = {value, orjson.dumps(value).decode()[1:-1], json.dumps(value)[1:-1], repr(value)[1:-1]}
    with _secrets_lock:
        _secrets.update(f for f in forms if len(f) >= MIN_SECRET_LENGTH)


def register_secrets_of(config: Any) -> None:
    """Register (:func:`register_secret`) every secret found in ``config``: a pydantic model
    (e.g. the loaded settings), a dict or a list, walked to any depth. A secret is a ``SecretStr``
    value, a string under a credential-like key (password, secret, token, access key, …), or the
    password of a URL (``redis://:PASSWORD@host``, ``?password=PASSWORD``)."""
    stack: list[tuple[str, Any]] = [("", config)]
    seen = 0
    while stack and seen < 100_000:
        seen += 1
        key, value = stack.pop()
        if hasattr(value, "get_secret_value"):
            secret = value.get_secret_value()
            register_secret(secret if isinstance(secret, str) else None)
        elif hasattr(value, "model_dump") and callable(value.model_dump):
            stack.append((key, value.model_dump()))
        elif isinstance(value, dict):
            stack.extend((str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple, set)):
            stack.extend((key, v) for v in value)
        elif isinstance(value, str):
            if _SECRET_KEY.search(key):
                register_secret(value)
            for password in _url_passwords(value):
                register_secret(password)


def _url_passwords(text: str) -> list[str]:
    if "://" not in text:
        return []
    from urllib.parse import parse_qsl, unquote, urlsplit

    out = []
    try:
        parts = urlsplit(text)
        if parts.password:
            out += [parts.password, unquote(parts.password)]
        for name, value in parse_qsl(parts.query):
            if _SECRET_KEY.search(name) or name.lower() in ("pwd", "pass"):
                out.append(value)
    except ValueError:
        pass
    return out


def scrub(text: str) -> str:
    """``text`` with registered secrets and URL credentials removed (see the module doc)."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return redact_text(text)


def _redact(_, __, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in list(event_dict):
        if key != "event" and _SECRET_KEY.search(key):
            event_dict[key] = "***"
    return event_dict


class _Scrubbed:
    """A renderer whose output passes :func:`scrub`."""

    def __init__(self, renderer: Any):
        self.renderer = renderer

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        out = self.renderer(logger, name, event_dict)
        return scrub(out if isinstance(out, str) else out.decode())


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the moment of writing, so loggers configured once
    keep working when stderr is replaced (a test's capture, a re-opened stream)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog and stdlib ``logging`` for the process. ``fmt``: ``auto`` | ``json`` |
    ``console``; ``stream`` defaults to the current ``sys.stderr`` (looked up at every write).
    Idempotent: calling it again replaces the handler it installed before."""
    stream = stream or _CurrentStderr()
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    if use_json:
        exceptions = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
        renderer = _Scrubbed(structlog.processors.JSONRenderer())
    else:
        exceptions = structlog.dev.set_exc_info
        renderer = _Scrubbed(structlog.dev.ConsoleRenderer(colors=False,
                                                           exception_formatter=structlog.dev.plain_traceback))  # no locals
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Library loggers (botocore, urllib3, opensearch, redis) stay quiet below WARNING and are
    # rendered by the same chain: JSON lines with ``logger`` naming the library.
    handler = logging.StreamHandler(stream)
    handler.set_name("ddb-cdc")
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, exceptions, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "ddb-cdc"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` key/values."""
    return structlog.get_logger().bind(**bound)
