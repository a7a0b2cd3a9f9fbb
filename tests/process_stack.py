"""The subprocess stack the end-to-end tests share: a worker configuration written as YAML from a
dict, ``python -m connectors.app.cli run`` processes with their own log files and a clean
environment (PYTHONPATH = this repository, test credentials), and a lease-table poller.

What a test's stack holds (tables, buckets, indices, workloads) stays in the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pipeline.errors import CdcError
from tests.helpers import json_log_events

#: the repository root: the worker processes' cwd and PYTHONPATH (so this tree's code runs)
ROOT = Path(__file__).resolve().parent.parent

#: what the worker processes get for AWS: dummy credentials (the servers are local) and a region
TEST_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` (the worker configuration as a dict, see README "Configuration") to
    ``path`` as YAML and return ``path``."""
    path.write_text(yaml.safe_dump(config))
    return path


def worker_env(extra: dict[str, str] | None = None, *, drop: Callable[[str], bool] | None = None,
               faulthandler: bool = True) -> dict[str, str]:
    """The environment of a worker process: this process's, less the names ``drop`` says
    (e.g. ``lambda k: k.startswith("DDB_CDC_")``), with :data:`TEST_AWS_ENV`, PYTHONPATH = this
    repository, PYTHONFAULTHANDLER=1 (``faulthandler``: SIGABRT writes every thread's stack to the
    log) and then ``extra``."""
    env = {k: v for k, v in os.environ.items() if drop is None or not drop(k)}
    env.update(TEST_AWS_ENV)
    env["PYTHONPATH"] = str(ROOT)
    if faulthandler:
        env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra or {})
    return env


class WorkerProcess:
    """One ``python -m connectors.app.cli run`` process (or a supervisor) and its log file."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path):
        self.name = name
        self.proc = proc
        self.log = log
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log entries of this process (only those with ``event == name`` when given)."""
        return json_log_events(self.log, name)

    def tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of its log."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """The first log entry ``name``, polled every 0.05 s for ``timeout`` s; the test fails
        (with the end of the log) if the process exits first or it does not come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode} before {name}; log:\n{self.tail()}")
            time.sleep(0.05)
        pytest.fail(f"no {name} within {timeout} s; log:\n{self.tail()}")

    def alive(self) -> None:
        """Fail the test (with the end of the log) if the process has exited."""
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited early with {self.proc.returncode}; log:\n{self.tail()}")

    def stop(self, timeout: float = 40, *, signalled: bool = False) -> int:
        """SIGTERM the process (unless ``signalled``: already sent) and give its exit code. One
        still running after ``timeout`` s gets SIGABRT (stacks to the log with PYTHONFAULTHANDLER),
        then SIGKILL after 5 s more, and the test fails with the end of its log."""
        if not signalled and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            pytest.fail(f"{self.name} did not exit within {timeout} s of SIGTERM; log:\n{self.tail(12000)}")

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_worker(config_path: Path, log: Path, *extra_args: str, env: dict[str, str] | None = None,
                 name: str | None = None, cwd: Path = ROOT, append: bool = False) -> WorkerProcess:
    """Start ``python -m connectors.app.cli run --config CONFIG [extra_args]`` with stdout and
    stderr to ``log`` (created anew, or appended to with ``append``), in ``env`` (default
    :func:`worker_env`)."""
    with open(log, "ab" if append else "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "connectors.app.cli", "run", "--config", str(config_path),
                                 *extra_args], stdout=fh, stderr=subprocess.STDOUT,
                                env=env if env is not None else worker_env(), cwd=str(cwd))
    return WorkerProcess(name or log.stem, proc, log)


def poll_leases(store: Any) -> list[Any]:
    """The leases in ``store`` (any LeaseStore), or ``[]`` while the store cannot answer yet (its
    table not created, a transient error: a CdcError)."""
    try:
        return list(store.list_leases())
    except CdcError:
        return []


class LeasePoller(threading.Thread):
    """Scans a lease store every ``interval_s`` s in a daemon thread until :meth:`stop`, and hands
    each scan to :meth:`record` (under ``self._lock``; subclasses keep what their tests check).
    A scan the store cannot answer (a CdcError: the lease table does not exist before the first
    worker creates it) counts in ``errors`` and is not recorded."""

    def __init__(self, store: Any, interval_s: float = 0.1, name: str = "lease-poller"):
        super().__init__(name=name, daemon=True)
        self.store = store
        self.interval_s = interval_s
        self.errors = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def record(self, t: float, leases: list[Any]) -> None:
        """Keep one scan: ``t`` is time.monotonic() when it returned, ``leases`` its leases."""
        raise NotImplementedError

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                leases = list(self.store.list_leases())
            except CdcError:
                self.errors += 1
            else:
                with self._lock:
                    self.record(time.monotonic(), leases)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        """End the polling and join the thread (10 s)."""
        self._stop_event.set()
        self.join(10)
