"""Replay rules on the DynamoDB Streams API double (what DynamoDB Local cannot give: times to the
second, shard splits, trimmed data, throttling), with a real SQLite lease file shared with "live"
leases. The real-server replay tests are in tests/test_replay.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import structlog

from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.checkpoint import Lease, lease_key_for
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.events import TRIM_HORIZON
from pipeline.replay.stream import StartSpec, StreamReplay, dry_run, start_positions
from pipeline.runtime.shard_consumer import ShardSettings
from pipeline.testing import RecordingSink, make_stream_record
from pipeline.runtime.worker import Worker
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq
from tests.stacks import Running, make_worker

T0 = datetime(2026, 11, 20, 12, 0, 0, tzinfo=timezone.utc)


def recs(shard_no: int, n: int, start_s: int = 0) -> list[dict]:
    """``n`` records one second apart from T0 + ``start_s``; item keys repeat across shards."""
    return [make_stream_record(event_name="MODIFY", keys={"pk": f"item-{i % 3}"},
                               new_image={"pk": f"item-{i % 3}", "n": shard_no * 100 + i},
                               sequence_number=seq(shard_no, i), created=T0 + timedelta(seconds=start_s + i))
            for i in range(n)]


def split_stream() -> FakeStreams:
    """P (closed, t=0..9 s) → children A (closed, t=10..19) and B (open, t=10..14); A → A2 (open, t=20..24)."""
    fake = FakeStreams(page_size=10)
    fake.add_shard("shardId-P", recs(1, 10, 0), closed=True)
    fake.add_shard("shardId-A", recs(2, 10, 10), parent="shardId-P", closed=True)
    fake.add_shard("shardId-B", recs(3, 5, 10), parent="shardId-P", closed=False)
    fake.add_shard("shardId-A2", recs(4, 5, 20), parent="shardId-A", closed=False)
    return fake


def run_replay(tmp_path, fake: FakeStreams, spec: StartSpec, until: datetime | None, *, namespace="replay-t",
               on_trimmed: str = "fail"):
    source = DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)
    sink = RecordingSink()
    path = tmp_path / "leases.sqlite"
    log = structlog.get_logger()

    def make_worker(**kw):
        return Worker(sources=[source], sinks=[sink], dead_letter=DirectoryDeadLetterQueue(tmp_path / "dlq"),
                      logger=log, exit_when_idle=True, discovery_interval_s=0.05, failover_time_s=0.6,
                      shard_settings=ShardSettings(max_records_per_call=4, idle_interval_ms=5, checkpoint_interval_s=0,
                                                   on_trimmed=on_trimmed),
                      shutdown_grace_s=5, **kw)

    replay = StreamReplay(sources=[source], store=SQLiteLeaseStore(path, namespace=namespace), spec=spec, until=until,
                          sink_names=[sink.name], replay_id=namespace, make_worker=make_worker, logger=log,
                          idle_reads=2)
    replay.prepare()
    return replay.run(), sink, source


def seqs_of(fake: FakeStreams, shard: str, lo: int = 0, hi: int | None = None) -> list[str]:
    records = fake.shards[shard].records
    return [r["dynamodb"]["SequenceNumber"] for r in records[lo:hi]]


def test_trim_horizon_replay_follows_lineage_and_ends_open_shards_when_caught_up(tmp_path):
    fake = split_stream()
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("trim-horizon"), until=None)
    assert report.ok, report
    got = [e.sequence_number for e in sink.flushed]
    assert sorted(got) == sorted(sum((seqs_of(fake, s) for s in fake.shards), []))
    assert len(got) == len(set(got)) == 30
    position = {s: i for i, s in enumerate(got)}
    # every parent record before every child record; per shard in sequence order
    assert max(position[s] for s in seqs_of(fake, "shardId-P")) < min(position[s] for s in seqs_of(fake, "shardId-A"))
    assert max(position[s] for s in seqs_of(fake, "shardId-P")) < min(position[s] for s in seqs_of(fake, "shardId-B"))
    assert max(position[s] for s in seqs_of(fake, "shardId-A")) < min(position[s] for s in seqs_of(fake, "shardId-A2"))
    for shard in fake.shards:
        mine = [s for s in got if s in set(seqs_of(fake, shard))]
        assert mine == seqs_of(fake, shard)
    ended = {r.shard_id: r.ended for r in report.shards}
    assert ended == {"shardId-P": "shard_end", "shardId-A": "shard_end", "shardId-B": "caught_up",
                     "shardId-A2": "caught_up"}


def test_time_window_is_inclusive_to_the_second_and_until_ends_each_shard(tmp_path):
    fake = split_stream()
    since, until = T0 + timedelta(seconds=5), T0 + timedelta(seconds=12)
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("time", since=since), until=until)
    assert report.ok, report
    expected = [r["dynamodb"]["SequenceNumber"] for shard in fake.shards.values() for r in shard.records
                if since.timestamp() <= r["dynamodb"]["ApproximateCreationDateTime"].timestamp() <= until.timestamp()]
    assert sorted(e.sequence_number for e in sink.flushed) == sorted(expected)
    assert len(expected) == 5 + 3 + 3  # P t=5..9, A t=10..12, B t=10..12
    rows = {r.shard_id: r for r in report.shards}
    assert rows["shardId-P"].skipped_before == 5 and rows["shardId-P"].ended == "shard_end"
    assert rows["shardId-A"].ended == "until" and rows["shardId-B"].ended == "until"
    assert rows["shardId-A"].first_time == T0 + timedelta(seconds=10)
    assert rows["shardId-A"].last_time == until
    # A2 (t=20..) starts after A ended; its first record is past --until
    assert rows["shardId-A2"].delivered == 0 and rows["shardId-A2"].ended == "until"
    # the dry run reads the same way and counts the same, sending nothing
    dry = dry_run([DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)],
                  StartSpec("time", since=since), until, idle_reads=2)
    assert dry.dry_run and dry.delivered == len(expected)
    assert {r.shard_id: r.delivered for r in dry.shards} == {r.shard_id: r.delivered for r in report.shards}


def test_sequence_start_includes_that_record_then_descendants_only(tmp_path):
    fake = split_stream()
    start = seqs_of(fake, "shardId-A")[6]
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("sequence", sequences={"shardId-A": start}), until=None)
    assert report.ok, report
    got = [e.sequence_number for e in sink.flushed]
    assert got == seqs_of(fake, "shardId-A", 6) + seqs_of(fake, "shardId-A2")
    ended = {r.shard_id: r.ended for r in report.shards}
    assert ended["shardId-P"] == ended["shardId-B"] == "not_asked"


def test_checkpoint_file_start_resumes_after_each_exported_position(tmp_path):
    fake = split_stream()
    source = DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)
    shards = source.list_shards()
    snapshot = [Lease(lease_key=lease_key_for("orders", STREAM_ARN, "shardId-A"), table="orders",
                      stream_arn=STREAM_ARN, shard_id="shardId-A", checkpoint=seqs_of(fake, "shardId-A")[3]),
                Lease(lease_key=lease_key_for("orders", STREAM_ARN, "shardId-B"), table="orders",
                      stream_arn=STREAM_ARN, shard_id="shardId-B", checkpoint=TRIM_HORIZON)]
    spec = StartSpec("checkpoint-file", snapshot=snapshot)
    positions = start_positions(spec, source, shards)
    assert positions == {"shardId-P": "SHARD_END", "shardId-A": seqs_of(fake, "shardId-A")[3],
                         "shardId-B": TRIM_HORIZON, "shardId-A2": TRIM_HORIZON}
    report, sink, _ = run_replay(tmp_path, fake, spec, until=None)
    assert report.ok
    got = sorted(e.sequence_number for e in sink.flushed)
    assert got == sorted(seqs_of(fake, "shardId-A", 4) + seqs_of(fake, "shardId-B") + seqs_of(fake, "shardId-A2"))


def test_replay_never_touches_live_leases_and_reports_a_gap(tmp_path):
    fake = split_stream()
    path = tmp_path / "leases.sqlite"
    live = SQLiteLeaseStore(path)
    live.ensure_table()
    key = lease_key_for("orders", STREAM_ARN, "shardId-P")
    live.create_lease_if_absent(Lease(lease_key=key, table="orders", stream_arn=STREAM_ARN, shard_id="shardId-P",
                                      checkpoint=seqs_of(fake, "shardId-P")[2], owner="live-worker", counter=7))
    before = live.get_lease(key)
    fake.fail_get_records("shardId-B", 0, "TrimmedDataAccessException", times=None)
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("trim-horizon"), until=None)
    assert not report.ok
    rows = {r.shard_id: r for r in report.shards}
    assert rows["shardId-B"].ended == "gap" and "trim horizon" in rows["shardId-B"].error
    after = live.get_lease(key)
    assert (after.owner, after.counter, after.checkpoint) == (before.owner, before.counter, before.checkpoint)
    assert [lease.lease_key for lease in live.list_leases()] == [key]
    # an incomplete replay keeps its namespace for inspection
    assert SQLiteLeaseStore(path, namespace="replay-t").list_leases()


def test_throttled_replay_reader_backs_off_and_delivers_everything(tmp_path):
    from prometheus_client import REGISTRY

    def throttles() -> float:
        return REGISTRY.get_sample_value("ddb_cdc_get_records_throttles_total",
                                         {"table": "orders", "shard": "shardId-P"}) or 0.0

    before = throttles()
    fake = split_stream()
    fake.fail_get_records("shardId-P", 4, "LimitExceededException", times=3)
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("trim-horizon"), until=None)
    assert report.ok, report
    got = [e.sequence_number for e in sink.flushed]
    assert len(got) == len(set(got)) == 30
    assert [s for s in got if s in set(seqs_of(fake, "shardId-P"))] == seqs_of(fake, "shardId-P")
    assert throttles() - before == 3


@pytest.mark.parametrize("argv, message", [
    (["replay", "--from", "trim-horizon"], "needs --sink"),
    (["replay", "--from", "yesterday", "--sink", "cache"], "--from 'yesterday'"),
    (["replay", "--from", "time", "not-a-time", "--sink", "cache"], "not an ISO 8601 time"),
    (["replay", "--from", "sequence", "shard-without-seq", "--sink", "cache"], "SHARD=SEQUENCE_NUMBER"),
    (["replay", "--sink", "cache"], "say where to replay from"),
    (["replay", "--from", "trim-horizon", "--sink", "nope"], "--sink 'nope' is not a configured sink"),
])
def test_replay_usage_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    from connectors.app.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("source: {stream_arn: '%s'}\ncheckpoints: {store: sqlite, sqlite_path: '%s'}\n"
                   "sinks: [{name: cache, type: redis_cache, options: {url: 'redis://127.0.0.1:1/0', "
                   "key_templates: ['k:{pk}']}}]\n" % (STREAM_ARN, tmp_path / "l.sqlite"))
    monkeypatch.setattr("connectors.app.wiring.build_sources", lambda settings: [
        DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=split_stream())])
    code = main([*argv, "--config", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_stop_while_throttled_is_a_clean_stop(tmp_path):
    """A reader backing off from endless throttling stops cleanly on SIGTERM (exit 0, not a failed shard)."""
    import time

    fake = FakeStreams(page_size=10)
    fake.add_shard("shardId-P", recs(1, 6), closed=False)
    fake.fail_get_records("shardId-P", 2, "LimitExceededException", times=None)
    sink = RecordingSink()
    worker = make_worker(fake, tmp_path, sink, logger=structlog.get_logger(), idle_interval_ms=5,
                         on_consumer_done=lambda c: outcomes.append(c.outcome))
    outcomes: list = []
    running = Running(worker)
    from tests.helpers import wait_until

    wait_until(lambda: len(sink.flushed) >= 2, "the first page delivered", timeout=30)
    throttled_reads = lambda: len(fake.calls_of("GetRecords")) - 1  # noqa: E731 - every read after the first
    wait_until(lambda: throttled_reads() >= 3, "several throttled attempts", timeout=30)
    time.sleep(0.1)
    assert running.stop(10) == 0 and worker.failed == []
    assert outcomes == ["stopped"]
    assert [e.sequence_number for e in sink.flushed] == seqs_of(fake, "shardId-P", 0, 2)
    lease = SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases()[0]
    assert lease.checkpoint == seqs_of(fake, "shardId-P")[1] and lease.owner is None


def test_trim_horizon_moving_on_before_the_first_read_is_not_a_gap(tmp_path):
    """A shard still at TRIM_HORIZON whose iterator falls behind the oldest record before anything
    was read (DynamoDB Local numbers records across tables) re-reads from the new oldest record:
    no gap, every record delivered once. A trimmed position after records were read stays a gap
    (tests/test_trimmed_gaps.py)."""
    fake = FakeStreams(page_size=10)
    fake.add_shard("shardId-P", recs(1, 5), closed=True)
    fake.fail_get_records("shardId-P", 0, "TrimmedDataAccessException", times=2)
    sink = RecordingSink()
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    worker = Worker(sources=[DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)], sinks=[sink],
                    lease_store=store, worker_id="w1", exit_when_idle=True,
                    dead_letter=DirectoryDeadLetterQueue(tmp_path / "dlq"), logger=structlog.get_logger(),
                    shard_settings=ShardSettings(max_records_per_call=2, idle_interval_ms=5, checkpoint_interval_s=0),
                    discovery_interval_s=0.05, failover_time_s=0.6, shutdown_grace_s=5)
    assert worker.run() == 0
    assert [e.sequence_number for e in sink.flushed] == seqs_of(fake, "shardId-P")
    assert store.list_gaps() == []


# -- --from time T over trimmed data (issue 13, item 2) ------------------------------------------

@pytest.mark.parametrize("on_trimmed", ["fail", "skip"])
def test_time_start_over_a_trimmed_head_is_a_gap_and_exits_non_zero(tmp_path, on_trimmed):
    """`--from time T`: every shard is read from TRIM_HORIZON. P's records t=0..4 s were trimmed
    (T0 is long past the 24 h retention) and T = t0+2 s lies among them: the first readable record
    (t=5) was created after T and is not P's first — a gap, and the replay exits non-zero, under
    either policy (old code: exit 0, the records from T to t=5 silently missing)."""
    fake = split_stream()
    fake.trim_head("shardId-P", 5)
    since = T0 + timedelta(seconds=2)
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("time", since=since), until=None, on_trimmed=on_trimmed)
    assert not report.ok
    rows = {r.shard_id: r for r in report.shards}
    assert rows["shardId-P"].ended == "gap", rows["shardId-P"]
    if on_trimmed == "skip":  # the gap is skipped: the rest of P and every other shard are replayed
        assert all(r.complete for r in report.shards if r.shard_id != "shardId-P")
    gaps = SQLiteLeaseStore(tmp_path / "leases.sqlite", namespace="replay-t").list_gaps()
    assert [(g.shard_id, g.first_position_after) for g in gaps] == [("shardId-P", seqs_of(fake, "shardId-P")[5])]
    if on_trimmed == "skip":
        assert seqs_of(fake, "shardId-P", 5) == [e.sequence_number for e in sink.flushed
                                                 if e.source.shard_id == "shardId-P"]
    dry = dry_run([DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)],
                  StartSpec("time", since=since), None, idle_reads=2)
    assert {r.shard_id: r.ended for r in dry.shards}["shardId-P"] == "gap" and not dry.ok


def test_time_start_after_the_trimmed_records_is_no_gap(tmp_path):
    """The trimmed records all precede T (the first readable record is older than T), and the
    children's first records are their shards' first (StartingSequenceNumber, recorded in the
    replay's leases): nothing asked for is missing, exit 0."""
    fake = split_stream()
    fake.trim_head("shardId-P", 5)
    since = T0 + timedelta(seconds=7)
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("time", since=since), until=None)
    assert report.ok, report
    assert sink.flushed and min(e.source.approximate_creation_time for e in sink.flushed) == since
    dry = dry_run([DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)],
                  StartSpec("time", since=since), None, idle_reads=2)
    assert dry.ok, dry


def test_trim_horizon_start_over_a_trimmed_head_is_what_was_asked(tmp_path):
    """`--from trim-horizon` asks for the oldest record retained: a trimmed head is no gap."""
    fake = split_stream()
    fake.trim_head("shardId-P", 5)
    report, _, _ = run_replay(tmp_path, fake, StartSpec("trim-horizon"), until=None)
    assert report.ok, report


def test_time_start_after_a_parent_closed_is_no_gap_for_it(tmp_path):
    """`--from time T` over a parent P closed (27 h ago: its child C's id carries its creation time,
    the close of P) before T (26 h ago), whose records are all trimmed: P holds no record created
    at or after T, nothing was asked of it — the row ends shard_end, the replay and its dry run are
    ok. Old code: head_trimmed knew only P's creation time, P ended ``gap`` (exit 1)."""
    import time as _time

    now = _time.time()
    fake = FakeStreams()
    parent = fake.open_shard(created_ms=int((now - 40 * 3600) * 1000))
    for i in range(3):
        fake.put(parent, make_stream_record(keys={"pk": f"p{i}"}, new_image={"pk": "p"}, created=now - 39 * 3600 + i * 3600))
    fake.shards[parent].closed = True
    fake.trim_head(parent, 3)
    child = fake.open_shard(parent=parent, created_ms=int((now - 27 * 3600) * 1000))
    for i in range(3):
        fake.put(child, make_stream_record(keys={"pk": f"c{i}"}, new_image={"pk": "c"}, created=now - 20 * 3600 + i * 60))
    since = datetime.fromtimestamp(now - 26 * 3600, tz=timezone.utc)
    dry = dry_run([DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)],
                  StartSpec("time", since=since), None, idle_reads=2)
    assert {r.shard_id: r.ended for r in dry.shards} == {parent: "shard_end", child: "caught_up"} and dry.ok, dry
    report, sink, _ = run_replay(tmp_path, fake, StartSpec("time", since=since), until=None)
    assert report.ok, report
    assert {r.shard_id: r.ended for r in report.shards}[parent] == "shard_end"
    assert sorted(e.keys["pk"] for e in sink.flushed) == ["c0", "c1", "c2"]
