"""structlog set-up: JSON lines when stderr is not a TTY, readable console output when it is.

Every entry carries ``event`` (what happened, snake_case), ``level``, ``timestamp`` (ISO 8601 UTC)
and, where they apply, ``worker_id``, ``shard_id``, ``sequence_number`` and ``sink``. Values under
keys that look like credentials (password, secret, token, authorization, access key) are replaced
by ``***`` before rendering, so credentials never reach the logs.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|authori[sz]ation|access_?key|api_?key|credential)", re.I)


def _redact(_, __, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in list(event_dict):
        if key != "event" and _SECRET_KEY.search(key):
            event_dict[key] = "***"
    return event_dict


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
    """Configure structlog for the process. ``fmt``: ``auto`` | ``json`` | ``console``;
    ``stream`` defaults to the current ``sys.stderr`` (looked up at every write)."""
    stream = stream or _CurrentStderr()
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.dict_tracebacks if use_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Library loggers (botocore, urllib3, opensearch) stay quiet below WARNING.
    logging.basicConfig(level=logging.WARNING, stream=stream, format="%(levelname)s %(name)s: %(message)s")


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` key/values."""
    return structlog.get_logger().bind(**bound)
