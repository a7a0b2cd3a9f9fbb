"""Archive replay over objects that are not contiguous runs (issue 13, item 3).

- (a) A redriven dead letter is archived as its own object (``103-103``) inside a larger one
  (``100-105``) that does not hold it: the replay delivers it. Objects that overlap, nest, repeat
  and have holes: every distinct archived event once per shard, in sequence order, with a bounded
  number of objects open at once.
- (b) A worker loses a shard's lease with events still buffered in its s3_audit sink, another
  worker archives the shard further, the first takes the shard back and reads from the new
  checkpoint: its sink must not upload an object spanning both ownership periods with a hole, and
  the archive replay delivers every event of the stream exactly once (real DynamoDB Local stream,
  real ShardConsumers and lease coordinators, real S3AuditSinks on moto S3).

Both parts also run through ``opensearch reindex --from-archive``'s code path:
:func:`connectors.s3.archive.run_archive_replay` is what it calls to fill the new index.
"""

from __future__ import annotations

import gzip
import random
import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import boto3
import orjson
import structlog
import structlog.testing

from connectors.s3.archive import run_archive_replay
from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.s3.audit import S3AuditSink
from connectors.sqlite_store import SQLiteLeaseStore
from connectors.embedded.verify import read_stream_events
from connectors.embedded.workload import Workload, apply_change, create_table
from pipeline.replay.archive import ArchiveObject, group_objects, order_shards, replay_archive
from pipeline.awsconfig import AwsConfig
from pipeline.codec import decode_record
from pipeline.config import Settings
from pipeline.deadletter import DirectoryDeadLetterQueue, delivery_entry, utc_now
from pipeline.events import TRIM_HORIZON, Batch, ChangeEvent
from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.ops.redrive import redrive
from pipeline.render import event_to_record_dict
from pipeline.runtime.shard_consumer import ShardConsumer, ShardSettings
from pipeline.sink import SinkContext
from pipeline.testing import RecordingSink, make_stream_record
from tests.helpers import wait_until
from tests.test_archive_replay import audit_sink, bucket, s3  # noqa: F401 - fixtures shared with the archive tests

LOG = structlog.get_logger("test_archive_holes")
STREAM = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-05-01T00:00:00.000"
SHARD = "shardId-00000001714564800000-0000000h"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def seq(n: int) -> str:
    return f"{n:021d}"


def event(n: int, *, pk: str | None = None, value: int | None = None) -> ChangeEvent:
    pk = pk or f"item-{n % 3}"
    record = make_stream_record(event_name="MODIFY", keys={"pk": pk}, sequence_number=seq(n),
                                new_image={"pk": pk, "n": Decimal(n if value is None else value)},
                                created=T0 + timedelta(seconds=n))
    return decode_record(record, table="orders", stream_arn=STREAM, shard_id=SHARD)


def settings_for(tmp_path, endpoint: str) -> Settings:
    return Settings(source={"table": "orders"}, aws={"region": "us-east-1", "s3_endpoint_url": endpoint},
                    checkpoints={"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite")},
                    dead_letter={"directory": str(tmp_path / "dead-letter")},
                    sinks=[{"name": "unused", "type": "s3_audit", "options": {"bucket": "unused"}}])


def write_object(sink: S3AuditSink, events: list[ChangeEvent]) -> None:
    sink.write(Batch(table="orders", stream_arn=STREAM, shard_id=SHARD, events=tuple(events),
                     checkpoint_sequence_number=events[-1].sequence_number))
    sink.flush()


def keys_of(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", ()))


# -- (a) a redriven dead letter inside a larger object ---------------------------------------------


def test_redriven_dead_letter_object_inside_a_larger_object_is_replayed(s3, bucket, moto_server, tmp_path):
    # the live worker archived 100..105, but the audit sink dead-lettered 103 (it is not in 100-105)
    live = audit_sink(bucket, moto_server.endpoint)
    write_object(live, [event(n) for n in (100, 101, 102, 104, 105)])
    live.close()
    # `dlq redrive` puts 103 into its own object 103-103, through the real redrive path
    dlq = DirectoryDeadLetterQueue(tmp_path / "dead-letter")
    now = utc_now()
    dlq.put(delivery_entry(event(103), sink="audit", error="SlowDown", attempts=3, first_failure=now,
                           last_failure=now))
    redriven = S3AuditSink("audit", S3AuditSink.Options(bucket=bucket, prefix="arch"))
    result = redrive(dlq, {"audit": redriven}, logger=LOG,
                     aws=AwsConfig(region="us-east-1", s3_endpoint_url=moto_server.endpoint))
    assert result.ok and result.delivered == 1, result.summary()
    names = [k.rsplit("/", 1)[1] for k in keys_of(s3, bucket)]
    assert names == [f"{seq(100)}-{seq(105)}.jsonl.gz", f"{seq(103)}-{seq(103)}.jsonl.gz"]

    rec = RecordingSink("rec")
    report = run_archive_replay(settings_for(tmp_path, moto_server.endpoint), f"s3://{bucket}/arch", sinks=[rec],
                                logger=LOG, progress=False)
    assert report.ok, report
    assert [e.sequence_number for e in rec.written] == [seq(n) for n in range(100, 106)]
    assert rec.written[3] == event(103)  # the redriven copy, content and version as archived
    assert report.shards[0].duplicates == 0 and report.delivered == 6


def test_redriven_copy_of_an_event_that_is_also_in_the_larger_object_is_delivered_once(s3, bucket, moto_server,
                                                                                           tmp_path):
    sink = audit_sink(bucket, moto_server.endpoint)
    write_object(sink, [event(n) for n in range(100, 106)])
    write_object(sink, [event(103)])  # the same event again, alone
    write_object(sink, [event(n) for n in range(104, 108)])  # a restart re-archived 104..105, then 106, 107
    sink.close()
    rec = RecordingSink("rec")
    report = run_archive_replay(settings_for(tmp_path, moto_server.endpoint), f"s3://{bucket}/arch", sinks=[rec],
                                logger=LOG, progress=False)
    assert [e.sequence_number for e in rec.written] == [seq(n) for n in range(100, 108)]
    assert report.ok and report.shards[0].duplicates == 3


# -- overlapping, nested, repeated, holed objects (pure: objects in memory) -------------------------


class CountingArchive:
    """Objects in memory; counts how many are open (read started, not exhausted or closed) at once."""

    def __init__(self) -> None:
        self.lines: dict[str, list[dict[str, Any]]] = {}
        self.objects: list[ArchiveObject] = []
        self.open = 0
        self.max_open = 0

    def add(self, events: list[ChangeEvent], tag: str = "") -> None:
        key = f"a/orders/dt=2024-05-01/{SHARD}/{events[0].sequence_number}-{events[-1].sequence_number}{tag}.jsonl.gz"
        self.objects.append(ArchiveObject(key=key, table="orders", shard_id=SHARD, first_seq=events[0].sequence_number,
                                          last_seq=events[-1].sequence_number, day=None))
        self.lines[key] = [event_to_record_dict(e) for e in events]

    def read(self, obj: ArchiveObject):
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            yield from self.lines[obj.key]
        finally:
            self.open -= 1

    def replay(self, **kwargs):
        got: list[ChangeEvent] = []
        report = replay_archive(order_shards(group_objects(self.objects)), read_object=self.read,
                                deliver=lambda b: got.extend(b.events), flush=lambda: None, since=None, until=None,
                                dry_run=False, sink_names=["x"], logger=kwargs.pop("logger", LOG), progress=False,
                                **kwargs)
        return report, got


def test_overlapping_nested_repeated_and_holed_objects_give_every_event_once_in_order():
    rng = random.Random(13)
    archive = CountingArchive()
    archived: set[int] = set()
    lines = 0
    for i in range(120):
        start = rng.randrange(1, 2000)
        run = sorted(rng.sample(range(start, start + 60), rng.randrange(1, 40)))  # holes inside the range
        archive.add([event(n) for n in run], tag=f"-{i}")
        archived.update(run)
        lines += len(run)
    archive.add([event(n) for n in range(500, 1500, 7)], tag="-wide")  # nests many of the others
    archived.update(range(500, 1500, 7))
    lines += len(range(500, 1500, 7))
    report, got = archive.replay(batch_size=50)
    assert [int(e.sequence_number) for e in got] == sorted(archived)
    assert report.ok and report.shards[0].duplicates == lines - len(archived)
    assert archive.open == 0  # every stream closed
    # only objects whose ranges hold the current position are open: far fewer than all of them
    depth = max(sum(int(o.first_seq) <= n <= int(o.last_seq) for o in archive.objects) for n in archived)
    assert archive.max_open <= depth + 1 < len(archive.objects) // 4


def test_copies_that_differ_deliver_the_first_objects_copy_and_warn():
    archive = CountingArchive()
    archive.add([event(n) for n in range(1, 6)])
    archive.add([event(3, value=999)])  # same sequence number, other content (processors changed)
    captured = structlog.testing.CapturingLogger()
    report, got = archive.replay(logger=structlog.wrap_logger(captured, processors=[]))
    assert [e.sequence_number for e in got] == [seq(n) for n in range(1, 6)]
    assert got[2] == event(3) and report.shards[0].duplicates == 1
    warnings = [c for c in captured.calls if c.method_name == "warning"]
    assert len(warnings) == 1 and warnings[0].kwargs["event"] == "archive_copies_differ"
    assert warnings[0].kwargs["ignored_from"].endswith(f"{seq(3)}-{seq(3)}.jsonl.gz")


def test_a_line_outside_its_objects_key_range_fails_the_shard_instead_of_misordering():
    archive = CountingArchive()
    archive.add([event(n) for n in range(1, 4)])
    archive.lines[archive.objects[0].key].append(event_to_record_dict(event(9)))  # key says 1-3
    report, got = archive.replay()
    row = report.shards[0]
    assert row.ended == "failed" and "outside the object's key range" in row.error and not report.ok
    assert archive.open == 0


# -- (b) lease lost with a buffer, shard taken back: end to end ------------------------------------


class _Worker:
    """One worker's lease coordinator, S3 sink and fan-out (its own process, in real life)."""

    def __init__(self, name: str, store, arn: str, bucket: str, endpoint: str, tmp_path, clock=None):
        kwargs = {"clock": clock} if clock is not None else {}
        self.log = structlog.get_logger(name)
        self.coordinator = LeaseCoordinator(store, worker_id=name, stream_arns=[arn], failover_time_s=3.0,
                                            logger=self.log, max_steal=0, **kwargs)
        self.sink = S3AuditSink("audit", S3AuditSink.Options(bucket=bucket, prefix="arch"))
        self.sink.open(SinkContext(sink_name="audit", worker_id=name, logger=self.log,
                                   aws=AwsConfig(region="us-east-1", s3_endpoint_url=endpoint)))
        self.dlq = DirectoryDeadLetterQueue(tmp_path / f"dead-letter-{name}")
        self.stop = threading.Event()
        self.fanout = FanOut([SinkRunner(self.sink, FailurePolicy())], self.dlq, stop_event=self.stop,
                             logger=self.log)

    def consumer(self, key: str, source, *, limit: int, checkpoint_interval_s: float) -> ShardConsumer:
        self.stop.clear()
        consumer = ShardConsumer(key, source=source, coordinator=self.coordinator, fanout=self.fanout,
                                 dead_letter=self.dlq, stop_event=self.stop, logger=self.log,
                                 settings=ShardSettings(max_records_per_call=limit, idle_interval_ms=20,
                                                        checkpoint_interval_s=checkpoint_interval_s))
        consumer.start()
        return consumer


def test_lease_lost_with_a_buffer_then_taken_back_archives_no_hole_and_replays_every_event_once(
        s3, bucket, moto_server, dynamodb_local, aws_env, tmp_path):
    creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    ddb = boto3.client("dynamodb", endpoint_url=dynamodb_local.endpoint, **creds)
    streams = boto3.client("dynamodbstreams", endpoint_url=dynamodb_local.endpoint, **creds)
    table = f"holes-{uuid.uuid4().hex[:8]}"
    arn = create_table(ddb, table)
    changes = iter(Workload(seed=13, items=15).changes(40))

    def apply(count: int) -> None:
        for _ in range(count):
            apply_change(ddb, table, next(changes))

    aws = AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint)
    source = DynamoDBStreamSource(aws, table=table, dynamodb=ddb, streams=streams)
    store = SQLiteLeaseStore(tmp_path / "leases.sqlite")
    store.ensure_table()
    b_clock = [0.0]
    a = _Worker("worker-a", store, arn, bucket, moto_server.endpoint, tmp_path)
    b = _Worker("worker-b", store, arn, bucket, moto_server.endpoint, tmp_path, clock=lambda: b_clock[0])
    a.coordinator.sync_shards(table, arn, source.list_shards(), TRIM_HORIZON)
    [lease] = a.coordinator.acquire()
    key = lease.lease_key
    consumers: list[ShardConsumer] = []
    try:
        # 1. A reads changes 1-20 into its sink's buffer; no checkpoint (and so no upload) yet
        apply(20)
        consumers.append(a.consumer(key, source, limit=10, checkpoint_interval_s=3600))
        wait_until(lambda: a.sink.pending_events() == 20, timeout=30, what="A buffered 20 events")

        # 2. A stalls; B sees the lease expire and takes it; A learns it lost the lease
        b.coordinator.acquire()
        b_clock[0] += 10
        assert [lease.lease_key for lease in b.coordinator.acquire()] == [key]
        a.coordinator.acquire()
        consumers[0].join(10)
        assert consumers[0].outcome == "lease_lost"
        assert a.sink.pending_events() == 20 and keys_of(s3, bucket) == []  # the buffer is still there

        # 3. more changes; B reads the shard from TRIM_HORIZON, archiving 1-15 and 16-30, checkpoint 30
        apply(10)
        stream = read_stream_events(streams, arn, table)
        assert len(stream) == 30
        consumers.append(b.consumer(key, source, limit=15, checkpoint_interval_s=0))
        wait_until(lambda: store.get_lease(key).checkpoint == stream[-1].sequence_number, timeout=30,
                   what="B checkpointed the 30th change")
        b.stop.set()
        consumers[1].join(10)
        b.coordinator.release(key)

        # 4. A takes the shard back and reads from B's checkpoint: changes 31-40; then it stops
        #    (flush + checkpoint), with the same sink that still held 1-20 from before
        apply(10)
        assert [lease.lease_key for lease in a.coordinator.acquire()] == [key]
        consumers.append(a.consumer(key, source, limit=10, checkpoint_interval_s=3600))
        stream = read_stream_events(streams, arn, table)
        assert len(stream) == 40
        wait_until(lambda: consumers[2].stats.last_sequence_number == stream[-1].sequence_number, timeout=30,
                   what="A read the 40th change")
        a.stop.set()
        consumers[2].join(10)
        assert consumers[2].outcome == "stopped" and store.get_lease(key).checkpoint == stream[-1].sequence_number
    finally:
        a.stop.set()
        b.stop.set()
        for consumer in consumers:
            consumer.join(10)
        a.sink.close()
        b.sink.close()
        ddb.delete_table(TableName=table)

    # every archived object holds every stream record of its key range: no object spans a hole
    by_seq = {int(e.sequence_number): e for e in stream}
    for object_key in keys_of(s3, bucket):
        first, last = (int(n) for n in object_key.rsplit("/", 1)[1].split(".")[0].split("-"))
        body = s3.get_object(Bucket=bucket, Key=object_key)["Body"].read()
        archived = [int(orjson.loads(line)["source"]["sequence_number"])
                    for line in gzip.decompress(body).splitlines() if line.strip()]
        assert archived == [n for n in sorted(by_seq) if first <= n <= last], f"{object_key} has a hole"

    # the replay delivers every change of the stream exactly once, in order
    rec = RecordingSink("rec")
    report = run_archive_replay(settings_for(tmp_path, moto_server.endpoint), f"s3://{bucket}/arch", sinks=[rec],
                                logger=LOG, progress=False)
    assert report.ok, report
    assert [e.sequence_number for e in rec.written] == [e.sequence_number for e in stream]
    assert [e.after for e in rec.written] == [e.after for e in stream]


def test_fanout_reset_shard_reaches_sinks_that_have_it_and_survives_one_that_fails(tmp_path):
    class Plain:  # a plugin that does not subclass Sink and has no reset_shard
        name = "plain"

    class Resetting(RecordingSink):
        def __init__(self, name: str, fail: bool = False):
            super().__init__(name)
            self.resets: list[tuple[str, str]] = []
            self.fail = fail

        def reset_shard(self, table: str, shard_id: str) -> None:
            self.resets.append((table, shard_id))
            if self.fail:
                raise RuntimeError("boom")

    failing, ok = Resetting("failing", fail=True), Resetting("ok")
    captured = structlog.testing.CapturingLogger()
    fanout = FanOut([SinkRunner(s, FailurePolicy()) for s in (Plain(), failing, ok)],
                    DirectoryDeadLetterQueue(tmp_path / "dl"), stop_event=threading.Event(),
                    logger=structlog.wrap_logger(captured, processors=[]))
    fanout.reset_shard("orders", SHARD)
    assert failing.resets == ok.resets == [("orders", SHARD)]
    assert [c.kwargs.get("sink") for c in captured.calls if c.args == ("sink_reset_shard_failed",)
            or c.kwargs.get("event") == "sink_reset_shard_failed"] == ["failing"]
