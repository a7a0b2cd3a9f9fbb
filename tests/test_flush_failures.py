"""Failures of ``flush()`` (issue 13, items 4 and 11; the rule is in pipeline/sink.py's module doc):

- a ``PartialSinkError`` from flush names events the sink no longer holds: permanent ones are
  dead-lettered, retriable ones are written again and flushed again; the checkpoint moves only
  past events that are durable in the sink or dead-lettered;
- ``on_failure: dead_letter`` unblocks a buffering sink whose flushes keep failing: after
  ``retry_budget_s`` the events given to it since its last successful flush are dead-lettered, the
  sink drops its buffer (``discard_unflushed``) and the checkpoint moves — against the real S3
  audit sink on moto, with S3 unreachable (a closed loopback port) for a while: nothing is lost and
  nothing dead-lettered is uploaded afterwards.

The worker runs for real (Worker + DynamoDBStreamSource + SQLite leases) over the streams API double
(connectors/dynamodb_streams/testing.py), so "the checkpoint moves" is the lease table's checkpoint.
"""

from __future__ import annotations

import socket
import threading
import uuid
from dataclasses import replace
from decimal import Decimal
from typing import Any

import boto3
import structlog

from connectors.aws import make_client
from connectors.s3.audit import S3AuditOptions, S3AuditSink, read_audit_objects
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.errors import PartialSinkError, RetriableSinkError
from pipeline.events import SHARD_END
from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.testing import RecordingSink, make_batch, make_stream_record, sample_batch
from pipeline.runtime.worker import Worker
from tests import stacks
from tests.helpers import run_to_exit
from connectors.dynamodb_streams.testing import FakeStreams, seq

SHARD = "shardId-00000001700000000000-0000flsh"


def records(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        k = {"pk": f"item-{i}"}
        out.append(make_stream_record(event_name="INSERT", keys=k, new_image={**k, "n": Decimal(i), "b": b"\x01"},
                                      sequence_number=seq(1, i)))
    return out


def make_worker(fake: FakeStreams, tmp_path, sink: Any, policy: FailurePolicy, *, aws: AwsConfig | None = None) -> Worker:
    return stacks.make_worker(fake, tmp_path, sink, worker_id="w-flush",
                              logger=structlog.get_logger("test_flush_failures"), failover_time_s=0.3,
                              policies={sink.name: policy}, aws=aws, exit_when_idle=True)


def run_to_idle(worker: Worker, timeout: float = 20.0) -> int:
    return run_to_exit(worker, timeout, " (a flush retried forever?)")


def checkpoint(tmp_path) -> str:
    (lease,) = SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases()
    return lease.checkpoint


def fast(on_failure: str = "block", budget: float = 300.0) -> FailurePolicy:
    return FailurePolicy(on_failure=on_failure, retry_budget_s=budget, initial_backoff_s=0.001, max_backoff_s=0.01)


class PartialFlushSink(RecordingSink):
    """A buffering sink whose first flush that holds ``victim`` reports it as failed (``kind``
    permanent or retriable) and drops it from its buffer, making everything else durable — what a
    bulk-uploading plugin does when one document of the upload is refused."""

    thread_safe = False

    def __init__(self, victim: str, kind: str):
        super().__init__("buffered")
        self.victim, self.kind = victim, kind
        self.reported = 0

    def flush(self) -> None:
        with self._lock:
            bad = [ev for ev in self._pending if ev.sequence_number == self.victim]
            if not bad or self.reported:
                self.flushed.extend(self._pending)
                self._pending.clear()
                return
            self.reported += 1
            self.flushed.extend(ev for ev in self._pending if ev.sequence_number != self.victim)
            self._pending.clear()  # the failed event is reported and dropped
        failure = [(bad[0], "document too large")]
        if self.kind == "permanent":
            raise PartialSinkError("1 event of the flush failed", permanent=failure)
        raise PartialSinkError("1 event of the flush failed", retriable=failure)


def test_permanent_failure_from_flush_is_dead_lettered_and_the_checkpoint_moves(tmp_path):
    fake = FakeStreams()
    fake.add_shard(SHARD, records(6))
    victim = seq(1, 3)
    sink = PartialFlushSink(victim, "permanent")
    assert run_to_idle(make_worker(fake, tmp_path, sink, fast())) == 0

    assert checkpoint(tmp_path) == SHARD_END
    (entry,) = DirectoryDeadLetterQueue(tmp_path / "dlq").list()
    assert (entry.kind, entry.sink, entry.shard_id, entry.sequence_number) == ("delivery", "buffered", SHARD, victim)
    assert "document too large" in entry.error
    assert entry.event["source"]["sequence_number"] == victim and entry.event["after"]["pk"] == {"S": "item-3"}
    # every other event is durable in the sink, the victim is not (it went to the dead-letter destination)
    assert sorted(e.sequence_number for e in sink.flushed) == [seq(1, i) for i in range(6) if i != 3]


def test_retriable_failure_from_flush_is_written_again_and_ends_up_in_the_sink(tmp_path):
    fake = FakeStreams()
    fake.add_shard(SHARD, records(6))
    victim = seq(1, 2)
    sink = PartialFlushSink(victim, "retriable")
    assert run_to_idle(make_worker(fake, tmp_path, sink, fast())) == 0

    assert sink.reported == 1
    assert checkpoint(tmp_path) == SHARD_END
    assert list(DirectoryDeadLetterQueue(tmp_path / "dlq").list()) == []
    written = [e.sequence_number for e in sink.written]
    assert written.count(victim) == 2  # written again after the flush ...
    again = written.index(victim, written.index(victim) + 1)
    assert written[again:] == sorted(written[again:])  # ... with the later events of the flush, in order
    assert sorted({e.sequence_number for e in sink.flushed}) == [seq(1, i) for i in range(6)]


def test_flush_partial_retriable_events_of_two_shards_are_rewritten_per_shard_in_order(tmp_path):
    """FanOut alone: one flush reports events of two shards; each shard's are written again — from
    its first failed event on, with every later event of the shard — as one batch in sequence
    order, then flushed."""
    a = make_batch(records(3), shard_id="shardId-a")
    b = make_batch(records(2), shard_id="shardId-b")

    class TwoShardFlush(RecordingSink):
        def __init__(self):
            super().__init__("two")
            self.batches: list[tuple[str, list[str]]] = []
            self.failed_once = False

        def write(self, batch):
            self.batches.append((batch.shard_id, [e.sequence_number for e in batch.events]))
            super().write(batch)

        def flush(self):
            if not self.failed_once:
                self.failed_once = True
                with self._lock:
                    self._pending.clear()
                raise PartialSinkError("3 failed", retriable=[(a.events[2], "x"), (b.events[1], "y"), (a.events[0], "z")])
            super().flush()

    sink = TwoShardFlush()
    fanout = FanOut([SinkRunner(sink, fast())], DirectoryDeadLetterQueue(tmp_path / "dlq"),
                    stop_event=threading.Event(), logger=structlog.get_logger("t"))
    fanout.deliver(a)
    fanout.deliver(b)
    fanout.flush()
    assert sink.batches[2:] == [("shardId-a", [seq(1, 0), seq(1, 1), seq(1, 2)]), ("shardId-b", [seq(1, 1)])]
    assert sorted((e.source.shard_id, e.sequence_number) for e in sink.flushed) == [
        ("shardId-a", seq(1, 0)), ("shardId-a", seq(1, 1)), ("shardId-a", seq(1, 2)), ("shardId-b", seq(1, 1))]


def test_flush_partial_retriable_event_is_rewritten_with_every_later_event_of_its_shard(tmp_path):
    """Per-shard order (pipeline/sink.py): a flush drops the INSERT of an item (retriable) and makes
    the item's later MODIFY and REMOVE — written in a later batch of the same shard — durable.
    Writing the INSERT again alone would leave a ghost of the removed item; the fan-out writes it
    again with every later event of its shard the sink was given since its last successful flush."""
    from tests.test_fanout import end_state

    events = sample_batch().events  # INSERT, MODIFY, REMOVE of one item
    insert = events[0]
    first, second = (replace(sample_batch(), events=part) for part in (events[:1], events[1:]))

    class DropsTheInsertOnce(RecordingSink):
        failed_once = False

        def flush(self):
            if not self.failed_once:
                self.failed_once = True
                with self._lock:
                    self.flushed.extend(ev for ev in self._pending if ev is not insert)
                    self._pending.clear()
                raise PartialSinkError("1 failed", retriable=[(insert, "429")])
            super().flush()

    sink = DropsTheInsertOnce("cache")
    fanout = FanOut([SinkRunner(sink, fast())], DirectoryDeadLetterQueue(tmp_path / "dlq"),
                    stop_event=threading.Event(), logger=structlog.get_logger("t"))
    fanout.deliver(first)
    fanout.deliver(second)
    fanout.flush()
    assert [e.sequence_number for e in sink.written[3:]] == [e.sequence_number for e in events]
    assert end_state(sink.flushed) == {insert.key_id: None}, "the removed item came back"


# -- on_failure: dead_letter unblocks a buffering sink (S3 audit sink, moto, S3 unreachable) ----


def _closed_port() -> int:
    """A loopback port nothing listens on (connection refused): S3 unreachable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutageS3AuditSink(S3AuditSink):
    """The real S3 audit sink; after open() its client points at a closed loopback port (S3 is
    unreachable) until its buffers were discarded ``outage_discards`` times; then S3 is back."""

    def __init__(self, name: str, options: S3AuditOptions, dead_client: Any, outage_discards: int = 1):
        super().__init__(name, options)
        self.dead_client = dead_client
        self.outage_discards = outage_discards
        self.discards = 0
        self.good_client: Any = None

    def open(self, context):
        super().open(context)  # HeadBucket against moto
        self.good_client, self._client = self._client, self.dead_client

    def discard_unflushed(self):
        super().discard_unflushed()
        self.discards += 1
        if self.discards >= self.outage_discards:
            self._client = self.good_client  # S3 is back


def test_dead_letter_policy_unblocks_s3_audit_flush_during_an_outage_and_loses_nothing(tmp_path, moto_server, aws_env):
    bucket = f"flush-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    aws = AwsConfig(region="us-east-1", max_attempts=1, connect_timeout_s=1.0, read_timeout_s=2.0)
    dead = make_client("s3", aws, endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    options = S3AuditOptions(bucket=bucket, prefix="audit", endpoint_url=moto_server.endpoint)
    sink = OutageS3AuditSink("audit", options, dead)

    fake = FakeStreams()
    fake.add_shard(SHARD, records(6))
    worker = make_worker(fake, tmp_path, sink, fast("dead_letter", budget=0.3), aws=aws)
    assert run_to_idle(worker) == 0

    assert sink.discards == 1
    assert checkpoint(tmp_path) == SHARD_END
    dead_lettered = {e.sequence_number: e for e in DirectoryDeadLetterQueue(tmp_path / "dlq").list()}
    # the first batch (2 records) was written during the outage: its flush was retried for the
    # budget, then its events were dead-lettered with the sink's name and the error. (With per-sink
    # lanes the sink's thread may have merged later pages into that first write: then they were
    # unflushed too and are dead-lettered with it.)
    assert {seq(1, 0), seq(1, 1)} <= set(dead_lettered)
    for entry in dead_lettered.values():
        assert entry.sink == "audit" and entry.kind == "delivery"
        assert "flush failed" in entry.error and "127.0.0.1" in entry.error
        assert entry.event["source"]["shard_id"] == SHARD
    archived = [line["source"]["sequence_number"] for line in read_audit_objects(s3, bucket, "audit/")]
    # nothing lost: every record is in S3 or in the dead-letter destination ...
    assert set(archived) | set(dead_lettered) == {seq(1, i) for i in range(6)}
    # ... and the discarded buffer was not uploaded later as well
    assert not set(archived) & set(dead_lettered)
    assert sorted(archived) == [seq(1, i) for i in range(6) if seq(1, i) not in dead_lettered]
    assert worker.runners[0].stats.dead_lettered == len(dead_lettered)
    assert len(worker.runners[0].unflushed) == 0


def test_block_policy_keeps_retrying_the_flush_and_holds_the_checkpoint(tmp_path):
    """``on_failure: block``: a flush that keeps failing is retried until it succeeds; nothing is
    dead-lettered and the buffer is not discarded (the documented meaning)."""

    class FlakyFlush(RecordingSink):
        def __init__(self):
            super().__init__("flaky")
            self.flush_calls = 0
            self.discarded = False

        def flush(self):
            self.flush_calls += 1
            if self.flush_calls <= 30:
                raise RetriableSinkError("S3 unreachable")
            super().flush()

        def discard_unflushed(self):
            self.discarded = True

    sink = FlakyFlush()
    fanout = FanOut([SinkRunner(sink, fast("block", budget=0.001))], DirectoryDeadLetterQueue(tmp_path / "dlq"),
                    stop_event=threading.Event(), logger=structlog.get_logger("t"))
    batch = make_batch(records(2), shard_id=SHARD)
    fanout.deliver(batch)
    fanout.flush()
    assert sink.flush_calls == 31 and not sink.discarded
    assert [e.sequence_number for e in sink.flushed] == [seq(1, 0), seq(1, 1)]
    assert list(DirectoryDeadLetterQueue(tmp_path / "dlq").list()) == []
