"""Replay from the S3 audit archive (issue 5, part 3).

- Pure logic (pipeline/replay/archive.py): key parsing, partition pruning, lineage order, overlap
  de-duplication, the inclusive time window, batch size, dry run, failures.
- Real servers: archives written by the real S3AuditSink to moto S3 (split lineage through object
  metadata; several days for the window), and the whole path — a live worker on DynamoDB Local
  archiving to moto S3, then ``run_archive_replay`` into a fresh osmem (OpenSearch API) index.
"""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest
import structlog
import yaml

from connectors.s3.archive import list_archive, parse_archive_uri, run_archive_replay
from connectors.app.wiring import build_worker
from connectors.s3.audit import S3AuditSink, read_audit_objects
from connectors.embedded.verify import check_opensearch, read_stream_events
from connectors.embedded.workload import Workload, apply_change, create_table, scan_items
from pipeline.replay.archive import (
    BATCH_MAX_EVENTS,
    ArchiveError,
    ArchiveObject,
    ArchiveShard,
    batches,
    day_may_hold,
    group_objects,
    order_shards,
    parse_object_key,
    partition_day,
    replay_archive,
)
from pipeline.awsconfig import AwsConfig
from pipeline.codec import decode_record, key_id
from pipeline.config import Settings
from pipeline.errors import ConfigError, FatalSinkError
from pipeline.events import Batch, ChangeEvent
from pipeline.registry import build_sinks
from pipeline.render import event_from_record_dict, event_to_record_dict
from pipeline.sink import SinkContext
from pipeline.testing import RecordingSink, make_stream_record
from tests.helpers import wait_until

LOG = structlog.get_logger("test_archive_replay")
STREAM = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-05-01T00:00:00.000"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
P = "shardId-00000001714564800000-0000000p"
C1 = "shardId-00000001714568400000-000000c1"
C2 = "shardId-00000001714568400000-000000c2"
Q = "shardId-00000001714564700000-0000000q"


def seq(n: int) -> str:
    return f"{n:021d}"


def event(n: int, *, pk: str = "item-1", shard: str = P, table: str = "orders",
          created: datetime | None | str = "auto", op: str = "MODIFY") -> ChangeEvent:
    """Change number ``n`` of item ``pk`` (sequence number ``n``, created T0 + n s unless given)."""
    when = T0 + timedelta(seconds=n) if created == "auto" else created
    record = make_stream_record(event_name=op, keys={"pk": pk}, sequence_number=seq(n),
                                new_image=None if op == "REMOVE" else {"pk": pk, "n": Decimal(n), "b": b"\x00\xff"},
                                created=when or T0)
    ev = decode_record(record, table=table, stream_arn=STREAM, shard_id=shard)
    if when is None:
        ev = replace(ev, source=replace(ev.source, approximate_creation_time=None))
    return ev


class MemoryArchive:
    """Archive objects held in memory: ``add(shard, events)`` makes one object, as the sink would."""

    def __init__(self) -> None:
        self.lines: dict[str, list[dict[str, Any]]] = {}
        self.objects: list[ArchiveObject] = []
        self.parents: dict[str, tuple[str, ...]] = {}
        self.reads: list[str] = []

    def add(self, events: list[ChangeEvent], parents: tuple[str, ...] = ()) -> ArchiveObject:
        first = events[0]
        created = first.source.approximate_creation_time
        obj = ArchiveObject(key=f"a/{first.source.table}/dt={created.date() if created else 'unknown'}/"
                                f"{first.source.shard_id}/{events[0].sequence_number}-{events[-1].sequence_number}.jsonl.gz",
                            table=first.source.table, shard_id=first.source.shard_id,
                            first_seq=events[0].sequence_number, last_seq=events[-1].sequence_number,
                            day=created.date() if created else None)
        self.lines[obj.key] = [event_to_record_dict(e) for e in events]
        self.objects.append(obj)
        if parents:
            self.parents[obj.shard_id] = parents
        return obj

    def shards(self) -> list[ArchiveShard]:
        shards = group_objects(self.objects)
        for shard in shards:
            shard.parent_shard_ids = self.parents.get(shard.shard_id, ())
        return order_shards(shards)

    def read(self, obj: ArchiveObject):
        self.reads.append(obj.key)
        return iter(self.lines[obj.key])


class Collector:
    """``deliver`` / ``flush`` callables that keep what they got."""

    def __init__(self, fail_on_batch: int | None = None):
        self.batches: list[Batch] = []
        self.flushes: list[int] = []  # number of batches delivered at each flush
        self.fail_on_batch = fail_on_batch

    def deliver(self, batch: Batch) -> None:
        if self.fail_on_batch is not None and len(self.batches) == self.fail_on_batch:
            raise FatalSinkError("sink 'x': credentials refused")
        self.batches.append(batch)

    def flush(self) -> None:
        self.flushes.append(len(self.batches))

    @property
    def events(self) -> list[ChangeEvent]:
        return [e for b in self.batches for e in b.events]


def replay(archive: MemoryArchive, collector: Collector | None = None, **kwargs):
    collector = collector if collector is not None else Collector()
    kwargs.setdefault("since", None)
    kwargs.setdefault("until", None)
    kwargs.setdefault("dry_run", False)
    kwargs.setdefault("progress", False)
    report = replay_archive(archive.shards(), read_object=archive.read, deliver=collector.deliver,
                            flush=collector.flush, sink_names=["x"], logger=LOG, **kwargs)
    return report, collector


# -- keys and partitions ------------------------------------------------------------------------


def test_object_keys_and_partitions_parse():
    obj = parse_object_key(f"audit/orders/dt=2024-05-01/{P}/{seq(5)}-{seq(12)}.jsonl.gz", "audit")
    assert obj == ArchiveObject(key=f"audit/orders/dt=2024-05-01/{P}/{seq(5)}-{seq(12)}.jsonl.gz", table="orders",
                                shard_id=P, first_seq=seq(5), last_seq=seq(12), day=date(2024, 5, 1))
    assert parse_object_key(f"orders/dt=unknown/{P}/1-2.jsonl.gz", "").day is None
    for other in (f"audit/orders/dt=2024-05-01/{P}/1-2.json", f"audit/orders/{P}/1-2.jsonl.gz",
                  f"audit/orders/dt=May/{P}/1-2.jsonl.gz", f"other/orders/dt=2024-05-01/{P}/1-2.jsonl.gz"):
        assert parse_object_key(other, "audit") is None, other
    assert partition_day("dt=2024-05-01/") == date(2024, 5, 1)
    with pytest.raises(ValueError):
        partition_day("dt=yesterday")


def test_partition_pruning_keeps_the_day_before_since_and_unknown():
    since, until = datetime(2024, 5, 3, 0, 30, tzinfo=timezone.utc), datetime(2024, 5, 5, 23, 0, tzinfo=timezone.utc)
    kept = {d for d in (date(2024, 5, k) for k in range(1, 8)) if day_may_hold(d, since, until)}
    # an object under 05-02 may run past midnight into 05-03; nothing under 05-06 can be ≤ until
    assert kept == {date(2024, 5, 2), date(2024, 5, 3), date(2024, 5, 4), date(2024, 5, 5)}
    assert day_may_hold(None, since, until)
    assert day_may_hold(date(2000, 1, 1), None, None)


def test_archive_uri_parsing():
    assert parse_archive_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_archive_uri("s3://bucket") == ("bucket", "")
    for bad in ("bucket/prefix", "s3://", "s3:///prefix", "https://bucket/x", "s3://bu cket/x"):
        with pytest.raises(ConfigError) as info:
            parse_archive_uri(bad)
        assert len(info.value.problems) == 1 and "s3://bucket/prefix" in info.value.problems[0]


# -- order ---------------------------------------------------------------------------------------


def test_lineage_split_parents_before_children_and_per_item_order():
    archive = MemoryArchive()
    # the parent P holds items a and b until the split; then a goes on in C1, b in C2
    archive.add([event(1, pk="a"), event(2, pk="b"), event(3, pk="a")])
    archive.add([event(4, pk="b"), event(5, pk="a")])
    # children start with smaller sequence numbers than the parent's end, so only lineage can
    # put them after it; C2's objects are added first and an unrelated root Q sorts before P
    archive.add([event(2, pk="b", shard=C2), event(3, pk="b", shard=C2)], parents=(P,))
    archive.add([event(1, pk="a", shard=C1), event(4, pk="a", shard=C1)], parents=(P,))
    archive.add([event(0, pk="q", shard=Q)])
    # a child whose parent is not in the archive (trimmed long ago) is a root
    archive.add([event(7, pk="z", shard="shardId-orphan")], parents=("shardId-gone",))

    assert [s.shard_id for s in archive.shards()] == [Q, P, C1, C2, "shardId-orphan"]
    report, got = replay(archive)
    assert report.ok and [s.ended for s in report.shards] == ["archive_end"] * 5
    assert [(b.shard_id, len(b)) for b in got.batches] == [(Q, 1), (P, 5), (C1, 2), (C2, 2), ("shardId-orphan", 1)]
    per_item: dict[str, list[tuple[str, str]]] = {}
    for ev in got.events:
        per_item.setdefault(ev.key_id, []).append((ev.source.shard_id, ev.sequence_number))
    assert per_item["a"] == [(P, seq(1)), (P, seq(3)), (P, seq(5)), (C1, seq(1)), (C1, seq(4))]
    assert per_item["b"] == [(P, seq(2)), (P, seq(4)), (C2, seq(2)), (C2, seq(3))]
    rows = {s.shard_id: s for s in report.shards}
    assert rows[C1].parent_shard_id == P and rows[P].parent_shard_id is None
    assert rows[P].stream_arn == STREAM and rows[P].first_sequence_number == seq(1)
    assert rows[P].last_sequence_number == seq(5)


def test_order_is_per_table_and_survives_a_metadata_cycle():
    x = ArchiveShard("t2", "x", [ArchiveObject("k1", "t2", "x", "5", "6", None)], parent_shard_ids=("y",))
    y = ArchiveShard("t2", "y", [ArchiveObject("k2", "t2", "y", "3", "4", None)], parent_shard_ids=("x",))
    z = ArchiveShard("t1", "z", [ArchiveObject("k3", "t1", "z", "9", "9", None)])
    two = ArchiveShard("t2", "w", [ArchiveObject("k4", "t2", "w", "10", "11", None)], parent_shard_ids=("x",))
    assert [s.shard_id for s in order_shards([x, y, z, two])] == ["z", "y", "x", "w"]


def test_objects_sort_by_first_sequence_as_integers():
    small = ArchiveObject("k-small", "t", "s", "99", "100", None)
    big = ArchiveObject("k-big", "t", "s", "1000", "1001", None)  # "1000" < "99" as text
    assert [o.key for o in group_objects([big, small])[0].objects] == ["k-small", "k-big"]


# -- duplicates, window, batches ----------------------------------------------------------------


def test_overlapping_objects_deliver_each_sequence_number_once():
    archive = MemoryArchive()
    archive.add([event(n) for n in range(1, 11)])          # 1..10
    archive.add([event(n) for n in range(5, 13)])          # 5..12: a restart re-archived 5..10
    archive.add([event(n) for n in range(3, 5)])           # 3..4: inside the first
    archive.add([event(n) for n in range(1, 11)])          # the very same range again
    report, got = replay(archive)
    assert [e.sequence_number for e in got.events] == [seq(n) for n in range(1, 13)]
    row = report.shards[0]
    assert (row.delivered, row.duplicates) == (12, 6 + 2 + 10)
    assert report.ok


def test_window_bounds_are_inclusive_and_events_without_time_are_delivered():
    archive = MemoryArchive()
    archive.add([event(n) for n in range(0, 10)] + [event(10, created=None)])
    since, until = T0 + timedelta(seconds=3), T0 + timedelta(seconds=6)
    report, got = replay(archive, since=since, until=until)
    assert [e.sequence_number for e in got.events] == [seq(n) for n in (3, 4, 5, 6, 10)]
    row = report.shards[0]
    assert (row.delivered, row.skipped_before, row.skipped_after) == (5, 3, 3)
    assert (row.first_time, row.last_time) == (since, until)
    # naive bounds are UTC; since == until selects exactly that second
    _, got = replay(archive, since=since.replace(tzinfo=None), until=since.replace(tzinfo=None))
    assert [e.sequence_number for e in got.events] == [seq(3), seq(10)]
    with pytest.raises(ConfigError):
        replay(archive, since=until, until=since)


def test_batches_hold_at_most_1000_events_and_flush_runs_periodically_and_at_the_end():
    archive = MemoryArchive()
    archive.add([event(n, pk=f"i{n % 50}") for n in range(1, 1801)])
    archive.add([event(n, pk=f"i{n % 50}") for n in range(1801, 2501)])
    report, got = replay(archive, flush_every=2)
    assert [len(b) for b in got.batches] == [1000, 1000, 500]
    assert all(b.checkpoint_sequence_number == b.events[-1].sequence_number for b in got.batches)
    assert all(b.stream_arn == STREAM and b.table == "orders" and b.shard_id == P for b in got.batches)
    assert got.flushes == [2, 3]
    assert report.delivered == 2500
    assert [len(b) for b in batches([event(n) for n in range(5)], table="orders", shard_id=P, size=2)] == [2, 2, 1]
    with pytest.raises(ValueError):
        list(batches([], table="orders", shard_id=P, size=BATCH_MAX_EVENTS + 1))


def test_dry_run_reads_and_counts_but_sends_nothing():
    archive = MemoryArchive()
    archive.add([event(n) for n in range(1, 6)])
    archive.add([event(n) for n in range(4, 9)])
    report = replay_archive(archive.shards(), read_object=archive.read, deliver=None, flush=None, since=None,
                            until=None, dry_run=True, sink_names=["x"], logger=LOG, progress=False)
    assert report.dry_run and report.ok and report.delivered == 8 and report.shards[0].duplicates == 2
    assert len(archive.reads) == 2


def test_a_fatal_sink_error_fails_the_shard_and_stops_the_rest():
    archive = MemoryArchive()
    archive.add([event(1, pk="q", shard=Q)])
    archive.add([event(n) for n in range(1, 4)])  # P: same first seq as Q; Q's id sorts first
    archive.add([event(2, pk="a", shard=C1)], parents=(P,))
    report, got = replay(archive, collector=Collector(fail_on_batch=1))  # P's batch fails
    assert [(s.shard_id, s.ended) for s in report.shards] == [(Q, "failed"), (P, "failed"), (C1, "stopped")]
    rows = {s.shard_id: s for s in report.shards}
    assert "credentials refused" in rows[P].error
    assert rows[Q].error.startswith("not flushed after a sink error")  # delivered, never made durable
    assert got.flushes == [], "a failed sink is not flushed again (it could block)"
    assert not report.ok


def test_a_corrupt_line_fails_the_shard_and_the_finished_ones_are_flushed():
    archive = MemoryArchive()
    archive.add([event(1, pk="q", shard=Q)])
    bad = archive.add([event(n) for n in range(2, 4)])
    archive.add([event(5, pk="a", shard=C1)], parents=(P,))
    archive.lines[bad.key][1] = {"not": "an event"}
    report, got = replay(archive)
    assert [(s.shard_id, s.ended) for s in report.shards] == [(Q, "archive_end"), (P, "failed"), (C1, "stopped")]
    assert "line 2: not a change event" in report.shards[1].error
    assert got.flushes == [1], "what was delivered before the read error is flushed"
    assert not report.ok


def test_stop_event_stops_between_batches():
    archive = MemoryArchive()
    archive.add([event(n) for n in range(1, 2501)])
    stop = threading.Event()
    collector = Collector()
    original = collector.deliver

    def deliver_then_stop(batch):
        original(batch)
        stop.set()

    collector.deliver = deliver_then_stop
    report, got = replay(archive, collector=collector, stop_event=stop)
    assert len(got.batches) == 1 and report.shards[0].ended == "stopped" and not report.ok
    assert got.flushes == [1]



def test_progress_bar_and_summary_render():
    import io

    from rich.console import Console

    from pipeline.replay.report import render_replay_report, replay_report_to_dict

    archive = MemoryArchive()
    archive.add([event(n) for n in range(1, 4)])
    archive.add([event(n) for n in range(3, 6)])
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    report, _ = replay(archive, console=console, progress=True)
    render_replay_report(report, console=console)
    text = out.getvalue()
    assert "OK: replayed 5 change(s) from 1 shard(s) into x" in text and "archive_end" in text
    data = replay_report_to_dict(report)
    assert data["mode"] == "archive" and data["shards"][0]["duplicates"] == 1

# -- real servers: archives written by the real S3AuditSink to moto S3 ---------------------------


def settings_for(tmp_path: Path, s3_endpoint: str, *, sinks: list[dict] | None = None, **source: Any) -> Settings:
    """Settings whose aws section points S3 at ``s3_endpoint`` (the replay's S3 client uses it)."""
    return Settings(
        source={"table": "orders", **source},
        aws={"region": "us-east-1", "s3_endpoint_url": s3_endpoint},
        checkpoints={"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite")},
        dead_letter={"directory": str(tmp_path / "dead-letter")},
        sinks=sinks or [{"name": "unused", "type": "s3_audit", "options": {"bucket": "unused"}}],
    )


@pytest.fixture
def s3(moto_server, aws_env):
    return boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server.endpoint)


@pytest.fixture
def bucket(s3) -> str:
    name = f"archive-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def audit_sink(bucket: str, endpoint: str, prefix: str = "arch") -> S3AuditSink:
    sink = S3AuditSink("audit", S3AuditSink.Options(bucket=bucket, prefix=prefix))
    sink.open(SinkContext(sink_name="audit", worker_id="w", logger=None,
                          aws=AwsConfig(region="us-east-1", s3_endpoint_url=endpoint)))
    return sink


def archive(sink: S3AuditSink, events: list[ChangeEvent], parents: tuple[str, ...] | None = None) -> None:
    """Write ``events`` as one batch (with the consumer's ``parent_shard_ids`` when given) and upload."""
    ev = events[0].source
    sink.write(Batch(table=ev.table, stream_arn=ev.stream_arn, shard_id=ev.shard_id, events=tuple(events),
                     checkpoint_sequence_number=events[-1].sequence_number,
                     extra={} if parents is None else {"parent_shard_ids": parents}))
    sink.flush()


def test_split_lineage_archived_by_the_sink_replays_parents_first(s3, bucket, moto_server, tmp_path):
    sink = audit_sink(bucket, moto_server.endpoint)
    archive(sink, [event(1, pk="a"), event(2, pk="b")], parents=())
    archive(sink, [event(3, pk="a"), event(4, pk="b")], parents=())
    # children with sequence numbers below the parent's: only the lineage can order them after it
    archive(sink, [event(1, pk="a", shard=C1), event(2, pk="a", shard=C1)], parents=(P,))
    archive(sink, [event(1, pk="b", shard=C2)])  # written before the consumer passed parents
    archive(sink, [event(2, pk="b", shard=C2)], parents=(P,))
    sink.close()
    restarted = audit_sink(bucket, moto_server.endpoint)  # a restart re-archives 2..4 under another key
    archive(restarted, [event(2, pk="b"), event(3, pk="a"), event(4, pk="b")], parents=())
    restarted.close()

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    metadata = {k: s3.head_object(Bucket=bucket, Key=k)["Metadata"] for k in keys}
    assert {m["parent-shard-ids"] for k, m in metadata.items() if f"/{C1}/" in k} == {P}
    assert {m["parent-shard-ids"] for k, m in metadata.items() if f"/{P}/" in k} == {""}

    rec = RecordingSink("rec")
    report = run_archive_replay(settings_for(tmp_path, moto_server.endpoint), f"s3://{bucket}/arch/", sinks=[rec],
                                logger=LOG, progress=False)
    assert report.ok and report.mode == "archive" and not report.dry_run, report
    assert rec.opened and rec.closed and rec.flushed == rec.written
    assert [(e.source.shard_id, e.key_id, e.sequence_number) for e in rec.written] == [
        (P, "a", seq(1)), (P, "b", seq(2)), (P, "a", seq(3)), (P, "b", seq(4)),
        (C1, "a", seq(1)), (C1, "a", seq(2)), (C2, "b", seq(1)), (C2, "b", seq(2))]
    rows = {s.shard_id: s for s in report.shards}
    assert rows[P].duplicates == 3 and rows[C2].parent_shard_id == P and rows[C1].parent_shard_id == P
    assert all(s.ended == "archive_end" for s in report.shards)
    # versions come back as archived (external versioning depends on it)
    assert [e.version for e in rec.written[:4]] == [event(n).version for n in range(1, 5)]


def test_time_window_over_days_gives_exactly_the_events_in_the_window(s3, bucket, moto_server, tmp_path):
    sink = audit_sink(bucket, moto_server.endpoint)
    start = datetime(2024, 5, 1, 22, 0, tzinfo=timezone.utc)
    hourly = [event(n, pk=f"i{n % 7}", created=start + timedelta(hours=n)) for n in range(1, 55)]
    for i in range(0, len(hourly), 5):  # 5-hour objects, several cross midnight
        archive(sink, hourly[i:i + 5])
    archive(sink, [event(n, pk="t", shard=Q, created=None) for n in (1, 2)])  # dt=unknown
    sink.close()
    since = datetime(2024, 5, 3, 1, 30, tzinfo=timezone.utc)
    until = datetime(2024, 5, 3, 5, 0, tzinfo=timezone.utc)

    listing = list_archive(s3, bucket, "arch", since=since, until=until)
    assert set(listing.skipped_partitions) == {"orders/dt=2024-05-01", "orders/dt=2024-05-04"}
    # 05-02's last object starts 05-02 22:00 and runs into 05-03: it must be read
    assert any(o.day == date(2024, 5, 2) for o in listing.objects)

    rec = RecordingSink("rec")
    report = run_archive_replay(settings_for(tmp_path, moto_server.endpoint), f"s3://{bucket}/arch", sinks=[rec],
                                since=since, until=until, logger=LOG, progress=False)
    archived = [event_from_record_dict(d) for d in read_audit_objects(s3, bucket, "arch/")]
    expected = [e for e in archived if e.source.approximate_creation_time is None
                or since <= e.source.approximate_creation_time <= until]
    got = sorted((e.source.shard_id, int(e.sequence_number)) for e in rec.written)
    assert got == sorted((e.source.shard_id, int(e.sequence_number)) for e in expected)
    assert [e.source.approximate_creation_time for e in rec.written if e.source.shard_id == P] == [
        start + timedelta(hours=n) for n in range(28, 32)]  # 02:00 … 05:00, 05:00 included
    assert report.ok and report.delivered == len(expected) == 6

    # --table limits to that folder; a table with nothing archived is a problem (exit 1), not a silent 0
    report = run_archive_replay(settings_for(tmp_path, moto_server.endpoint), f"s3://{bucket}/arch",
                                sinks=[RecordingSink("rec")], tables=["orders", "nosuch"], dry_run=True,
                                logger=LOG, progress=False)
    assert report.delivered == 56 and not report.ok
    assert report.problems == [f"nothing archived for table 'nosuch' under s3://{bucket}/arch"]


def test_missing_bucket_is_one_clear_error(moto_server, aws_env, tmp_path):
    with pytest.raises(ArchiveError) as info:
        run_archive_replay(settings_for(tmp_path, moto_server.endpoint), "s3://no-such-bucket-x1/arch",
                           sinks=[RecordingSink("rec")], logger=LOG, progress=False)
    text = str(info.value)
    assert "NoSuchBucket" in text and "\n" not in text and moto_server.endpoint in text


# -- real servers end to end: live worker → S3 archive → replay into a fresh OpenSearch index ----


def os_request(url: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read(), parse_float=Decimal)


def doc_versions(url: str, index: str) -> dict[str, tuple[int, int]]:
    """{_id: (_version, _seq_no)} of every document of ``index``."""
    os_request(url, f"/{index}/_refresh", {})
    hits = os_request(url, f"/{index}/_search", {"query": {"match_all": {}}, "size": 10000, "version": True,
                                                 "seq_no_primary_term": True})["hits"]["hits"]
    return {h["_id"]: (h["_version"], h["_seq_no"]) for h in hits}


def test_live_changes_archived_then_replayed_into_a_fresh_index(tmp_path, aws_env, dynamodb_local, moto_server,
                                                                opensearch_url):
    creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    ddb = boto3.client("dynamodb", endpoint_url=dynamodb_local.endpoint, **creds)
    streams = boto3.client("dynamodbstreams", endpoint_url=dynamodb_local.endpoint, **creds)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **creds)
    table = f"archive-{uuid.uuid4().hex[:8]}"
    stream_arn = create_table(ddb, table)
    bucket = f"audit-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    index = f"replayed-{uuid.uuid4().hex[:8]}"
    config = {
        "source": {"table": table, "checkpoint_interval_s": 0.2, "idle_interval_ms": 50, "discovery_interval_s": 5},
        "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint,
                "s3_endpoint_url": moto_server.endpoint},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite")},
        "dead_letter": {"directory": str(tmp_path / "dead-letter")},
        "sinks": [
            {"name": "audit", "type": "s3_audit",
             "options": {"bucket": bucket, "prefix": "audit", "max_buffer_age_s": 0.3}},
            {"name": "search", "type": "opensearch", "options": {"hosts": [opensearch_url], "index": index}},
        ],
    }
    settings = Settings(**config)
    audit_cfg, search_cfg = settings.sinks

    # 1. the live worker archives a mixed workload to S3 (the search sink is not running)
    worker = build_worker(settings, logger=LOG, sinks=build_sinks([audit_cfg]))
    outcome: dict[str, int] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("code", worker.run()), daemon=True)
    thread.start()
    try:
        workload = Workload(seed=31, items=40)
        for change in workload.changes(300):
            apply_change(ddb, table, change)
        truth = read_stream_events(streams, stream_arn, table)
        assert len(truth) == 300
        wanted = {e.sequence_number for e in truth}

        def archived() -> bool:
            return wanted <= {d["source"]["sequence_number"] for d in read_audit_objects(s3, bucket, "audit/")}

        wait_until(archived, "every change in the S3 archive", timeout=30, interval=0.3)
    finally:
        worker.stop()
        thread.join(30)
    assert outcome.get("code") == 0
    assert {e.operation.value for e in truth} == {"INSERT", "MODIFY", "REMOVE"}
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="audit/")["KeyCount"]
    assert objects > 1, "several objects, so the replay merges objects"

    # 2. replay into a fresh index: equal to the table; every document at its item's last version
    items = scan_items(ddb, table)
    key_of = lambda it: key_id({"pk": it["pk"], "sk": it["sk"]})  # noqa: E731
    uri = f"s3://{bucket}/audit"
    report = run_archive_replay(settings, uri, sinks=build_sinks([search_cfg]), logger=LOG, progress=False)
    assert report.ok and report.delivered == 300 and report.dead_lettered == 0, report
    assert [s.ended for s in report.shards] == ["archive_end"] and report.sinks == ["search"]
    check = check_opensearch(opensearch_url, index, items, key_of)
    assert check.ok, (check.summary, check.problems[:5])
    last_version = {}
    for ev in truth:
        last_version[ev.key_id] = ev.version
    before = doc_versions(opensearch_url, index)
    assert {doc: v for doc, (v, _) in before.items()} == {key_of(it): last_version[key_of(it)] for it in items}

    # 3. a second replay changes nothing: same _version and _seq_no for every document
    again = run_archive_replay(settings, uri, sinks=build_sinks([search_cfg]), logger=LOG, progress=False)
    assert again.ok and again.delivered == 300
    assert doc_versions(opensearch_url, index) == before
    assert check_opensearch(opensearch_url, index, items, key_of).ok

    # 4. a time window gives exactly the archived events whose time is in it (bounds inclusive)
    archived_events = {(e.source.shard_id, e.sequence_number): e for e in
                       (event_from_record_dict(d) for d in read_audit_objects(s3, bucket, "audit/"))}
    times = sorted({e.source.approximate_creation_time for e in archived_events.values()})
    windows = [(times[0], times[0]), (times[0], times[-1]), (times[-1] + timedelta(seconds=1), None)]
    if len(times) > 1:
        windows.append((times[1], times[-1]))
    for since, until in windows:
        rec = RecordingSink("rec")
        report = run_archive_replay(settings, uri, sinks=[rec], since=since, until=until, logger=LOG, progress=False)
        expected = [k for k, e in archived_events.items() if since <= e.source.approximate_creation_time
                    and (until is None or e.source.approximate_creation_time <= until)]
        assert sorted((e.source.shard_id, int(e.sequence_number)) for e in rec.written) == \
            sorted((s, int(q)) for s, q in expected), (since, until)
        assert report.ok and report.delivered == len(expected)
        assert report.delivered + sum(s.skipped_before + s.skipped_after for s in report.shards) == 300

    # 5. dry run: same count, no sink opened, nothing sent
    rec = RecordingSink("rec")
    dry = run_archive_replay(settings, uri, sinks=[rec], dry_run=True, logger=LOG, progress=False)
    assert dry.ok and dry.dry_run and dry.delivered == 300
    assert not rec.opened and rec.written == []


def test_cli_replay_from_archive_into_opensearch(s3, bucket, moto_server, opensearch_url, tmp_path, capsys):
    from connectors.app.cli import main

    sink = audit_sink(bucket, moto_server.endpoint, prefix="audit")
    archive(sink, [event(1, pk="a", op="INSERT"), event(2, pk="b", op="INSERT"), event(3, pk="a")])
    archive(sink, [event(4, pk="b", op="REMOVE"), event(5, pk="c", op="INSERT")])
    sink.close()
    index = f"cli-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"table": "orders"},
        "aws": {"region": "us-east-1", "s3_endpoint_url": moto_server.endpoint},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite")},
        "dead_letter": {"directory": str(tmp_path / "dead-letter")},
        "log": {"format": "json", "level": "WARNING"},
        "sinks": [{"name": "search", "type": "opensearch", "options": {"hosts": [opensearch_url], "index": index}},
                  {"name": "audit", "type": "s3_audit", "options": {"bucket": bucket, "prefix": "audit"}}],
    }))
    uri = f"s3://{bucket}/audit"

    code = main(["replay", "--config", str(config), "--from-archive", uri, "--sink", "search", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert (out["mode"], out["ok"], out["delivered"], out["sinks"]) == ("archive", True, 5, ["search"])
    assert {doc: v for doc, (v, _) in doc_versions(opensearch_url, index).items()} == {
        "a": event(3, pk="a").version, "c": event(5, pk="c", op="INSERT").version}

    # the plain summary (no --json) and a dry run without --sink
    assert main(["replay", "--config", str(config), "--from-archive", uri, "--sink", "search", "--no-progress"]) == 0
    assert "OK: replayed 5 change(s) from 1 shard(s) into search" in capsys.readouterr().out
    assert main(["replay", "--config", str(config), "--from-archive", uri, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["delivered"] == 5
    # usage errors: exit 2, one line
    assert main(["replay", "--config", str(config), "--from-archive", "bucket/audit", "--sink", "search"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3://bucket/prefix" in err[0]
    # a missing bucket: exit 1, one line
    assert main(["replay", "--config", str(config), "--from-archive", "s3://no-such-bucket-cli/x",
                 "--sink", "search", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NoSuchBucket" in err[0], err
