"""Shutdown order (issue 7): a worker whose shutdown exceeds ``worker.shutdown_grace_s`` must not close
a sink while a shard thread is still inside it, nor let that thread reach a closed sink afterwards,
nor checkpoint a batch that did not reach every sink.

The race is made deterministic with a sink that blocks inside ``write`` (or ``flush``) until the
test lets it go: the worker is stopped while the shard thread is blocked there, so its grace period
(0.3 s) runs out with the thread still in the sink. Before the fix the worker closed both sinks at
that moment; when the slow call returned, the thread went on to the next sink, which was closed
— ``FatalSinkError: sink 'cache': write before open()``, as in the log of the 1,000 changes/s run.

Real Worker, DynamoDBStreamSource and SQLite lease store; the stream is the API double
(connectors/dynamodb_streams/testing.py).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.errors import FatalSinkError
from pipeline.events import Batch
from pipeline.runtime.fanout import SinkFenced
from pipeline.runtime.lanes import LaneSettings
from pipeline.sink import Sink, SinkContext
from pipeline.testing import RecordingSink
from pipeline.runtime.worker import Worker
from connectors.dynamodb_streams.testing import FakeStreams, seq
from test_worker_source import make_worker, recs
from tests import stacks
from tests.stacks import Running
from tests.helpers import wait_until

SHARD = "shardId-00000001700000000000-0000000s"


class RecordingLogger:
    """A structlog-like logger that keeps every event (name and fields) of every bound copy."""

    def __init__(self, events: list[tuple[str, str, dict[str, Any]]] | None = None, **bound: Any):
        self.events = events if events is not None else []
        self.bound = bound

    def bind(self, **values: Any) -> "RecordingLogger":
        return RecordingLogger(self.events, **{**self.bound, **values})

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.events.append((level, event, {**self.bound, **fields}))

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]


class GuardedSink(Sink):
    """Records what it was given and every contract violation: a call after ``close()`` (answered as
    the built-in sinks answer it, with ``FatalSinkError: write before open()``) or a ``close()`` while
    a call is in progress. With ``block_on=("write", n)`` its n-th write (or flush) blocks until
    ``release`` is set, with ``entered`` set meanwhile."""

    def __init__(self, name: str, *, thread_safe: bool = True, block_on: tuple[str, int] | None = None):
        super().__init__(name)
        self.thread_safe = thread_safe
        self.block_on = block_on
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written: list[str] = []
        self.flushed: list[str] = []
        self.violations: list[str] = []
        self.closes = 0
        self._pending: list[str] = []
        self._calls = {"write": 0, "flush": 0}
        self._in_call = 0
        self._lock = threading.Lock()
        self._open = False

    def open(self, context: SinkContext) -> None:
        super().open(context)
        self._open = True

    def _enter(self, what: str) -> int:
        with self._lock:
            if not self._open:
                self.violations.append(f"{what} after close()")
                raise FatalSinkError(f"sink {self.name!r}: {what} before open()")
            self._in_call += 1
            self._calls[what] += 1
            return self._calls[what]

    def _leave(self) -> None:
        with self._lock:
            self._in_call -= 1

    def _maybe_block(self, what: str, call_no: int) -> None:
        if self.block_on == (what, call_no):
            self.entered.set()
            assert self.release.wait(20), "the test never released the blocked sink call"

    def write(self, batch: Batch) -> None:
        call_no = self._enter("write")
        try:
            self._maybe_block("write", call_no)
            with self._lock:
                self.written.extend(e.sequence_number for e in batch.events)
                self._pending.extend(e.sequence_number for e in batch.events)
        finally:
            self._leave()

    def flush(self) -> None:
        call_no = self._enter("flush")
        try:
            self._maybe_block("flush", call_no)
            with self._lock:
                self.flushed.extend(self._pending)
                self._pending.clear()
        finally:
            self._leave()

    def close(self) -> None:
        with self._lock:
            if self._in_call:
                self.violations.append(f"close() while {self._in_call} call(s) in progress")
            self.closes += 1
            self._open = False


def guarded_worker(fake: FakeStreams, tmp_path, sinks: list[Sink], logger: RecordingLogger, *,
                   shutdown_grace_s: float, closed: bool = True) -> Worker:
    """A worker over ``fake`` with pages of 2 records, a flush + checkpoint after every page."""
    # every page is its own write (no merging of waiting pages), so "the n-th write" is page n
    return stacks.make_worker(fake, tmp_path, sinks, logger=logger, failover_time_s=0.3,
                              shutdown_grace_s=shutdown_grace_s, fast_retries=True,
                              lane_settings={s.name: LaneSettings(coalesce_max_records=1) for s in sinks})


def checkpoint_of(tmp_path) -> str:
    (lease,) = [lease for lease in SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases() if lease.shard_id == SHARD]
    return lease.checkpoint


@pytest.mark.parametrize("blocked", ["write", "flush"])
@pytest.mark.parametrize("thread_safe", [True, False])
def test_sinks_are_not_closed_under_a_straggling_shard_thread(tmp_path, blocked, thread_safe):
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 6), closed=True)
    all_seqs = [seq(1, i) for i in range(6)]
    # the second page (records 2 and 3) blocks in the first sink: in its write, or in the flush
    # before its checkpoint (pages of 2 records, a flush + checkpoint after every page)
    slow = GuardedSink("search", thread_safe=thread_safe, block_on=(blocked, 2))
    cache = GuardedSink("cache", thread_safe=thread_safe)
    log = RecordingLogger()
    worker = guarded_worker(fake, tmp_path, [slow, cache], log, shutdown_grace_s=0.3)
    running = Running(worker)
    assert slow.entered.wait(10), "the shard thread never reached the slow sink"
    (consumer,) = worker.consumers.values()
    # per-sink lanes: while the slow sink is stuck, the other sink receives the whole shard
    wait_until(lambda: cache.written == all_seqs, "the cache's lane went on without the slow sink")

    # stop while the shard thread is inside the slow sink: the grace period runs out
    code = running.stop(timeout=10)
    assert code == 1, "a shutdown that exceeded its grace period exits 1"
    assert consumer.is_alive(), "the shard thread should still be blocked in the slow sink"
    assert [f["shard_id"] for f in log.named("shutdown_grace_exceeded")] == [SHARD]
    (fenced,) = log.named("sinks_fenced")
    assert fenced["shard_ids"] == [SHARD] and fenced["sink_calls_in_progress"].get("search") == 1
    # the busy sink is left to the thread that is inside it (each sink has its own lane thread,
    # so the other sink is idle or closed by its own thread when its call returns)
    assert slow.closes == 0, f"the slow sink was closed under a running {blocked}: {slow.violations}"
    assert "search" in [f["sink"] for f in log.named("sink_close_deferred")]

    slow.release.set()
    consumer.join(10)
    assert not consumer.is_alive()
    wait_until(lambda: slow.closes == 1 and cache.closes == 1, "every sink closed once its last call returned")

    # no sink was called after its close(), none was closed under a call
    assert slow.violations == [] and cache.violations == []
    assert consumer.outcome == "stopped" and isinstance(consumer.error, SinkFenced), consumer.error

    # nothing past what every sink flushed was checkpointed (at most the first page: the slow
    # sink never made page 2 durable before the fence)
    cp = checkpoint_of(tmp_path)
    assert cp in ("TRIM_HORIZON", seq(1, 1)), cp
    covered = 0 if cp == "TRIM_HORIZON" else all_seqs.index(cp) + 1
    assert set(all_seqs[:covered]) <= set(slow.flushed) and set(all_seqs[:covered]) <= set(cache.flushed)
    # each sink got the shard in sequence order; the idle sink was not held up by the slow one
    for sink in (slow, cache):
        assert sink.written == all_seqs[:len(sink.written)] and sink.flushed == all_seqs[:len(sink.flushed)]

    # no change lost: the next owner (after the lease expires) reads on from the checkpoint
    again = RecordingSink("again")
    second = make_worker(fake, tmp_path, again, worker_id="w2", exit_when_idle=True)
    assert Running(second).join(15) == 0
    assert [e.sequence_number for e in again.flushed] == all_seqs[covered:]
    assert checkpoint_of(tmp_path) == "SHARD_END"


def test_a_clean_shutdown_closes_every_sink_once_and_releases_the_lease(tmp_path):
    """The ordinary case is unchanged: consumers end within the grace period, every sink is closed
    once after their last flush, the lease is released, exit code 0."""
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 4), closed=False)
    a, b = GuardedSink("a"), GuardedSink("b")
    log = RecordingLogger()
    worker = guarded_worker(fake, tmp_path, [a, b], log, shutdown_grace_s=5.0)
    running = Running(worker)
    wait_until(lambda: len(b.flushed) == 4, "all four records flushed to the last sink")
    assert running.stop() == 0
    assert (a.closes, b.closes) == (1, 1) and a.violations == b.violations == []
    assert not log.named("sinks_fenced") and not log.named("sink_close_deferred")
    (lease,) = SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases()
    assert not lease.owner and lease.checkpoint == seq(1, 3)


def test_leases_are_renewed_while_a_shutdown_drains_so_no_other_worker_takes_them_as_expired(tmp_path):
    """SIGTERM drains every lane (a flush may take longer than failover_time_s) before the final
    checkpoint and the release. Until then the worker still owns its leases and keeps renewing
    them: a second worker must not take them as expired meanwhile (it would read the shard while
    the first one still writes and flushes it, and the final checkpoint would be refused)."""
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 4), closed=False)
    slow = GuardedSink("slow")
    log = RecordingLogger()
    worker = guarded_worker(fake, tmp_path, [slow], log, shutdown_grace_s=10.0)
    running = Running(worker)
    wait_until(lambda: len(slow.flushed) == 4, "all four records flushed")
    slow.block_on = ("flush", slow._calls["flush"] + 1)  # the next flush is held until released
    fake.append(SHARD, recs(1, 2, start=4))
    other_log = RecordingLogger()
    other = stacks.make_worker(fake, tmp_path, [RecordingSink("other")], worker_id="w2", logger=other_log,
                               failover_time_s=0.3, shutdown_grace_s=5.0)
    other_running = Running(other)
    wait_until(lambda: other_log.named("worker_started"), "the second worker started")
    assert slow.entered.wait(10), "the flush of the two new records began"
    stopping = threading.Thread(target=running.stop, daemon=True)
    stopping.start()  # the shutdown drains the lane, so it waits for the held flush
    wait_until(lambda: worker.stop_event.is_set(), "the shutdown began")
    threading.Event().wait(1.2)  # 4 x failover_time_s with the flush held
    slow.release.set()
    stopping.join(15)
    assert running.code == 0
    taken = other_log.named("lease_taken")
    assert not [t for t in taken if t.get("reason") == "expired"], f"taken as expired during the drain: {taken}"
    assert log.named("lease_released"), "the first worker released its lease after its final checkpoint"
    other_running.stop()
    (lease,) = SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases()
    assert lease.checkpoint == seq(1, 5) and slow.flushed[-2:] == [seq(1, 4), seq(1, 5)]
