"""The in-process stack the worker tests share: a real Worker over a stream source (by default the
streams API double, connectors/dynamodb_streams/testing.py ``FakeStreams``), a SQLite lease store,
a dead-letter directory and the test's sinks, with the small settings most tests use as keyword
defaults; and :class:`Running`, ``worker.run()`` in a thread.

Test-specific settings stay in the tests: pass them as keywords (anything else ``Worker`` takes goes
through ``**worker_kw``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import structlog

from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.runtime.fanout import FailurePolicy
from pipeline.runtime.shard_consumer import ShardSettings
from pipeline.runtime.worker import Worker


def fake_source(streams: FakeStreams, stream_arn: str = STREAM_ARN) -> DynamoDBStreamSource:
    """A DynamoDBStreamSource that reads ``streams`` (the API double) for ``stream_arn``."""
    return DynamoDBStreamSource(AwsConfig(), stream_arn=stream_arn, streams=streams)


def sqlite_store(path: Path) -> SQLiteLeaseStore:
    """A SQLite lease store at ``path``, its file created (and switched to WAL) first, so that the
    worker and the test's readers can open it at once (see
    test_processes_opening_a_fresh_sqlite_file_at_once_all_succeed)."""
    SQLiteLeaseStore(path).ensure_table()
    return SQLiteLeaseStore(path)


def fast_policies(sinks: Sequence[Any], initial_backoff_s: float = 0.001,
                  max_backoff_s: float = 0.01) -> dict[str, FailurePolicy]:
    """A blocking FailurePolicy with a short backoff (s) for every sink, by sink name."""
    return {s.name: FailurePolicy(initial_backoff_s=initial_backoff_s, max_backoff_s=max_backoff_s) for s in sinks}


def make_worker(streams: FakeStreams | Any, tmp_path: Path, sinks: Any, *, worker_id: str = "w1",
                store: Any = None, store_path: Path | None = None, dead_letter: Any = None,
                logger: Any = None, max_records: int = 2, idle_interval_ms: int = 10,
                checkpoint_interval_s: float = 0.0, on_trimmed: str | None = None,
                discovery_interval_s: float = 0.05, failover_time_s: float = 0.6,
                shutdown_grace_s: float = 5.0, fast_retries: bool = False, **worker_kw: Any) -> Worker:
    """A Worker over ``streams`` (a FakeStreams, read through :func:`fake_source`, or any
    StreamSource) writing to ``sinks`` (one sink or a list).

    Lease store: ``store`` when given, else a SQLite store at ``store_path`` (default
    ``tmp_path/l.sqlite``), created first. Dead letters: ``dead_letter`` or a directory
    ``tmp_path/dlq``. ``max_records`` per GetRecords call, ``idle_interval_ms`` (ms),
    ``checkpoint_interval_s`` (s) and ``on_trimmed`` make the ShardSettings; ``fast_retries``
    gives every sink :func:`fast_policies`. Everything else (``exit_when_idle``, ``policies``,
    ``start_position``, ``aws``, ...) goes to ``Worker`` as is."""
    sinks = list(sinks) if isinstance(sinks, (list, tuple)) else [sinks]
    source = fake_source(streams) if isinstance(streams, FakeStreams) else streams
    if store is None:
        store = sqlite_store(store_path or tmp_path / "l.sqlite")
    settings = dict(max_records_per_call=max_records, idle_interval_ms=idle_interval_ms,
                    checkpoint_interval_s=checkpoint_interval_s)
    if on_trimmed is not None:
        settings["on_trimmed"] = on_trimmed
    if fast_retries:
        worker_kw.setdefault("policies", fast_policies(sinks))
    return Worker(source=source, lease_store=store, sinks=sinks,
                  dead_letter=dead_letter if dead_letter is not None else DirectoryDeadLetterQueue(tmp_path / "dlq"),
                  worker_id=worker_id, logger=logger if logger is not None else structlog.get_logger("tests.stacks"),
                  shard_settings=ShardSettings(**settings), discovery_interval_s=discovery_interval_s,
                  failover_time_s=failover_time_s, shutdown_grace_s=shutdown_grace_s, **worker_kw)


class Running:
    """``worker.run()`` in a daemon thread, started at once; ``code`` is its exit code once it
    returned."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.worker.run()

    def join(self, timeout: float = 10.0) -> int:
        """Wait up to ``timeout`` s for ``run()`` to return and give its exit code; if it has not,
        stop the worker (10 s more) and raise AssertionError."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.worker.stop()
            self.thread.join(10)
            raise AssertionError(f"worker.run() did not return within {timeout} s")
        assert self.code is not None
        return self.code

    def stop(self, timeout: float = 10.0) -> int:
        """Stop the worker and :meth:`join` it (``timeout`` s)."""
        self.worker.stop()
        return self.join(timeout)


def run_to_idle(worker: Worker, timeout: float = 10.0) -> int:
    """Run an ``exit_when_idle`` worker to its end (``timeout`` s) and give its exit code."""
    return Running(worker).join(timeout)
