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


class SinksStack:
    """The end-to-end tests' common stack: a DynamoDB Local table with a stream (``table``,
    ``stream_arn``), its lease table name, an S3 bucket, and a worker configuration with the three
    built-in sinks — ``search`` (OpenSearch at ``os_url``, index ``index``), ``audit`` (S3 audit log
    under ``audit/``, 2 s buffer age) and ``cache`` (Redis invalidation by the workload's key
    templates) — written to ``tmp_path/config.yaml``. ``search_options`` / ``cache_options`` merge
    into those sinks' options, ``cache_policy`` into the cache sink's entry (``on_failure`` …),
    ``extra_sinks`` follow the three, ``worker`` is the ``worker:`` section. ``self.config`` holds
    the dict; :meth:`save_config` writes it again after a test changed it."""

    def __init__(self, tmp_path: Path, *, dynamodb_endpoint: str, s3_endpoint: str, os_url: str, redis_url: str,
                 table: str, bucket: str, index: str, search_options: dict[str, Any] | None = None,
                 cache_options: dict[str, Any] | None = None, cache_policy: dict[str, Any] | None = None,
                 extra_sinks: tuple[dict[str, Any], ...] = (), worker: dict[str, Any] | None = None):
        import boto3

        from connectors.embedded.workload import CACHE_KEY_TEMPLATES, create_table
        from pipeline.awsconfig import AwsConfig

        creds = {"region_name": TEST_AWS_ENV["AWS_DEFAULT_REGION"],
                 "aws_access_key_id": TEST_AWS_ENV["AWS_ACCESS_KEY_ID"],
                 "aws_secret_access_key": TEST_AWS_ENV["AWS_SECRET_ACCESS_KEY"]}
        self.tmp = tmp_path
        self.endpoint = dynamodb_endpoint
        self.ddb = boto3.client("dynamodb", endpoint_url=dynamodb_endpoint, **creds)
        self.streams = boto3.client("dynamodbstreams", endpoint_url=dynamodb_endpoint, **creds)
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint, **creds)
        self.table = table
        self.lease_table = f"{table}-leases"
        self.stream_arn = create_table(self.ddb, table)
        self.bucket = bucket
        self.s3.create_bucket(Bucket=bucket)
        self.os_url = os_url
        self.redis_url = redis_url
        self.index = index
        self.dead_letter = tmp_path / "dead-letter"
        self.aws = AwsConfig(region=creds["region_name"], dynamodb_endpoint_url=dynamodb_endpoint,
                             s3_endpoint_url=s3_endpoint)
        cache = {"name": "cache", "type": "redis_cache",
                 "options": {"url": redis_url, "key_templates": CACHE_KEY_TEMPLATES, **(cache_options or {})}}
        cache.update(cache_policy or {})
        self.config: dict[str, Any] = {
            "source": {"table": table, "checkpoint_interval_s": 0.5, "idle_interval_ms": 100,
                       "discovery_interval_s": 5},
            "aws": {"region": creds["region_name"], "dynamodb_endpoint_url": dynamodb_endpoint,
                    "s3_endpoint_url": s3_endpoint},
            "checkpoints": {"store": "dynamodb", "table_name": self.lease_table, "failover_time_s": 3},
            "dead_letter": {"directory": str(self.dead_letter)},
            "log": {"format": "json"},
            "sinks": [
                {"name": "search", "type": "opensearch",
                 "options": {"hosts": [os_url], "index": index, **(search_options or {})}},
                {"name": "audit", "type": "s3_audit",
                 "options": {"bucket": bucket, "prefix": "audit", "max_buffer_age_s": 2}},
                cache,
                *extra_sinks,
            ],
        }
        if worker:
            self.config["worker"] = dict(worker)
        self.config_path = tmp_path / "config.yaml"
        self.save_config()

    def save_config(self) -> Path:
        """Write ``self.config`` to ``self.config_path`` and return the path."""
        return write_config(self.config_path, self.config)

    def store(self, namespace: str = "") -> Any:
        """The worker's lease table as a DynamoDBLeaseStore (``namespace``: a replay's)."""
        from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore

        return DynamoDBLeaseStore(self.aws, self.lease_table, client=self.ddb, namespace=namespace)

    def checkpoint(self) -> str | None:
        """The first lease's checkpoint; None before the worker created its lease table or a lease."""
        leases = poll_leases(self.store())
        return leases[0].checkpoint if leases else None

    def stream(self) -> list[Any]:
        """Every change event of the table's stream, in order (read from TRIM_HORIZON)."""
        from connectors.embedded.verify import read_stream_events

        return read_stream_events(self.streams, self.stream_arn, self.table)

    def last_seq(self) -> str:
        """The sequence number of the stream's last record."""
        return self.stream()[-1].sequence_number
