"""Small helpers shared by the tests: polling for a condition, running a worker to its end,
reading a worker's JSON log."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` every ``interval`` s until it is true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def run_to_exit(worker: Any, timeout: float, what: str = "") -> int:
    """Run ``worker.run()`` in a thread and return its exit code; if it has not returned after
    ``timeout`` s, stop it and raise AssertionError (``what`` says why it might hang)."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(worker.run()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stop()
        thread.join(10)
        raise AssertionError(f"worker.run() did not return within {timeout} s{what}")
    return result[0]


def json_log_events(path: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON lines of a worker's log file (only those with ``event == name`` when given);
    lines that are not JSON objects (e.g. a traceback) are left out."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if name is None or entry.get("event") == name:
            out.append(entry)
    return out


class EventLog:
    """A structlog-like logger keeping (event, fields) of every call, for every bound child."""

    def __init__(self, events=None, **bound):
        self.events = events if events is not None else []
        self.bound = bound

    def bind(self, **kw):
        return EventLog(self.events, **{**self.bound, **kw})

    def _log(self, event, **kw):
        self.events.append((event, {**self.bound, **kw}))

    debug = info = warning = error = exception = critical = _log

    def named(self, name):
        return [kw for e, kw in list(self.events) if e == name]
