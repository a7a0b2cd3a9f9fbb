"""``start_position: LATEST`` survives a hand-off (issue 13, item 5).

Worker A starts a shard at LATEST, records are written, A stops renewing (a crash, as far as the
lease table can tell) before its first sequence-number checkpoint, and worker B takes the lease
over when it expires: B must deliver every record written after A started — and, LATEST still
meaning "only new records", none of those written long before.

Two cases, each on the streams double and on DynamoDB Local:

- A had read nothing yet (its lease says ``AT_TIMESTAMP:…``): B reads from TRIM_HORIZON and skips
  the records created before the bound;
- A had read and delivered records but not checkpointed (its lease says
  ``AT_SEQUENCE_NUMBER:<first record A read>``): B resumes at that record.

A is driven below the worker (its coordinator never renews: the process that "died"); B is a full
:class:`pipeline.runtime.worker.Worker` that takes the lease once it expired.
"""

from __future__ import annotations

import threading
import time

import pytest
import structlog

from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.events import LATEST
from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.runtime.shard_consumer import AT_SEQUENCE_PREFIX, AT_TIMESTAMP_PREFIX, ShardConsumer, ShardSettings
from pipeline.sink import SinkContext
from pipeline.testing import RecordingSink, make_stream_record
from pipeline.runtime.worker import Worker
from tests.helpers import wait_until
from tests.stacks import make_worker
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq

FAILOVER_S = 0.6


def _open(sink: RecordingSink) -> RecordingSink:
    sink.open(SinkContext(sink_name=sink.name, worker_id="test", logger=structlog.get_logger()))
    return sink


class DeadAfterStart:
    """Worker A below the worker: a coordinator that never renews and one shard consumer that never
    checkpoints by itself (checkpoint interval 1 h)."""

    def __init__(self, source, store, tmp_path):
        self.store = store
        self.sink = _open(RecordingSink("a"))
        self.stop_event = threading.Event()
        self.coordinator = LeaseCoordinator(store, worker_id="worker-a", stream_arns=[source.stream_arn],
                                            failover_time_s=FAILOVER_S, logger=structlog.get_logger())
        self.coordinator.sync_shards(source.table, source.stream_arn, source.list_shards(), LATEST)
        (self.lease,) = self.coordinator.acquire()
        assert self.lease.checkpoint == LATEST
        fanout = FanOut([SinkRunner(self.sink, FailurePolicy())], DirectoryDeadLetterQueue(tmp_path / "dlq-a"),
                        stop_event=self.stop_event, logger=structlog.get_logger())
        self.consumer = ShardConsumer(self.lease.lease_key, source=source, coordinator=self.coordinator,
                                      fanout=fanout, dead_letter=DirectoryDeadLetterQueue(tmp_path / "dlq-a"),
                                      settings=ShardSettings(idle_interval_ms=10, checkpoint_interval_s=3600),
                                      stop_event=self.stop_event, logger=structlog.get_logger())
        self.consumer.start()

    def checkpoint(self) -> str:
        return self.store.get_lease(self.lease.lease_key).checkpoint

    def wait_started(self) -> None:
        """A started reading: its LATEST iterator was taken (and, with the fix, LATEST was resolved)."""
        wait_until(lambda: self.consumer.stats.get_records_calls > 0, "worker A's first GetRecords", timeout=15)

    def die(self) -> None:
        """Stop without a checkpoint: the lease is taken by B first, so A's final flush cannot write."""
        self.stop_event.set()
        self.consumer.join(10)
        assert not self.consumer.is_alive()


def worker_b(source, store_path, sink, tmp_path) -> Worker:
    return make_worker(source, tmp_path, sink, store=SQLiteLeaseStore(store_path),
                       dead_letter=DirectoryDeadLetterQueue(tmp_path / "dlq-b"), worker_id="worker-b",
                       logger=structlog.get_logger(), start_position="LATEST",
                       max_records=ShardSettings.max_records_per_call, failover_time_s=FAILOVER_S)


def take_over_and_collect(a: DeadAfterStart, source, store_path, tmp_path, expected: set[str],
                          more_after_takeover=None) -> RecordingSink:
    """B takes A's expired lease; A then stops (its final checkpoint fails: the lease is B's).
    Returns B's sink once it holds ``expected`` sequence numbers (or after 10 s)."""
    sink = RecordingSink("b")
    b = worker_b(source, store_path, sink, tmp_path)
    thread = threading.Thread(target=b.run)
    thread.start()
    try:
        wait_until(lambda: (a.store.get_lease(a.lease.lease_key).owner == "worker-b"), "B took A's lease", timeout=15)
        a.die()
        assert a.consumer.outcome in ("lease_lost", "stopped")
        if more_after_takeover is not None:
            more_after_takeover()
        try:
            wait_until(lambda: expected <= {e.sequence_number for e in sink.written}, "B delivered them", timeout=10)
        except AssertionError:
            pass  # the assertions of the caller say what is missing
    finally:
        b.stop()
        thread.join(15)
    return sink


# -- the streams double ------------------------------------------------------------------------


def _records(start: int, n: int, created: float) -> list[dict]:
    return [make_stream_record(event_name="INSERT", keys={"pk": f"k{i}"}, new_image={"pk": f"k{i}"},
                               sequence_number=seq(1, i), created=created) for i in range(start, start + n)]


def _double(tmp_path):
    fake = FakeStreams()
    fake.add_shard("shardId-1", _records(0, 3, created=time.time() - 3600), closed=False)  # an hour old
    source = DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)
    store_path = tmp_path / "leases.sqlite"
    store = SQLiteLeaseStore(store_path)
    store.ensure_table()
    return fake, source, store, store_path


def test_double_takeover_before_a_read_anything_delivers_every_record_written_after_a_started(tmp_path):
    fake, source, store, store_path = _double(tmp_path)
    a = DeadAfterStart(source, store, tmp_path)
    a.wait_started()
    assert a.checkpoint().startswith(AT_TIMESTAMP_PREFIX), "LATEST is made concrete before anything is read"
    a.die()  # nothing read: its last flush has nothing to write
    assert a.checkpoint().startswith(AT_TIMESTAMP_PREFIX)
    fake.append("shardId-1", _records(3, 4, created=time.time()))  # written after A started, never read by A
    new = {seq(1, i) for i in range(3, 7)}
    sink = take_over_and_collect(a, source, store_path, tmp_path, new)
    delivered = {e.sequence_number for e in sink.written}
    assert new <= delivered, f"lost on hand-off: {sorted(new - delivered)}"
    assert not delivered & {seq(1, i) for i in range(3)}, "records from an hour before the start are not delivered"
    assert not a.sink.written


def test_double_takeover_after_a_delivered_unchecked_records_resumes_at_a_first_record(tmp_path):
    fake, source, store, store_path = _double(tmp_path)
    a = DeadAfterStart(source, store, tmp_path)
    a.wait_started()
    fake.append("shardId-1", _records(3, 2, created=time.time()))
    wait_until(lambda: len(a.sink.written) == 2, "A delivered the first two new records")
    assert a.checkpoint() == AT_SEQUENCE_PREFIX + seq(1, 3), "the first record A read is pinned before delivery"
    new = {seq(1, i) for i in range(3, 7)}
    sink = take_over_and_collect(a, source, store_path, tmp_path, new,
                                 more_after_takeover=lambda: fake.append("shardId-1", _records(5, 2, time.time())))
    delivered = {e.sequence_number for e in sink.written}
    assert new <= delivered, f"lost on hand-off: {sorted(new - delivered)}"
    assert not delivered & {seq(1, i) for i in range(3)}
    # AT_SEQUENCE_NUMBER: B started at A's first record, not at TRIM_HORIZON
    b_iterators = [c for c in fake.calls_of("GetShardIterator") if c["ShardIteratorType"] == "AT_SEQUENCE_NUMBER"]
    assert b_iterators and b_iterators[-1]["SequenceNumber"] == seq(1, 3)


def test_skip_bound_is_never_after_a_record_created_in_the_start_second(tmp_path, monkeypatch):
    """The bound of the AT_TIMESTAMP checkpoint lies LATEST_CLOCK_MARGIN_S before the start's
    second: a record stamped in the very second A started (rounded down) is delivered."""
    import pipeline.runtime.shard_consumer as sc

    fake, source, store, store_path = _double(tmp_path)
    start = time.time()
    a = DeadAfterStart(source, store, tmp_path)
    a.wait_started()
    taken = time.time()  # the LATEST iterator was taken between start and now (seconds later when loaded)
    bound = int(a.checkpoint()[len(AT_TIMESTAMP_PREFIX):])
    assert bound <= int(taken) - sc.LATEST_CLOCK_MARGIN_S  # the margin before the iterator's moment
    assert bound < int(start)  # so a record stamped in the start second (rounded down) is never skipped
    a.die()
    fake.append("shardId-1", _records(3, 1, created=float(int(start))))  # ApproximateCreationDateTime rounded down
    sink = take_over_and_collect(a, source, store_path, tmp_path, {seq(1, 3)})
    assert seq(1, 3) in {e.sequence_number for e in sink.written}


# -- DynamoDB Local ----------------------------------------------------------------------------


def _put(client, table: str, keys) -> None:
    for k in keys:
        client.put_item(TableName=table, Item={"pk": {"S": k}, "v": {"N": "1"}})


def _real(make_table, dynamodb_local, tmp_path, aws_env):
    client, table, arn = make_table("latest")
    aws = AwsConfig(region="us-east-1", endpoint_url=dynamodb_local.endpoint)
    source = DynamoDBStreamSource(aws, stream_arn=arn, read_path="boto3")
    store_path = tmp_path / "leases.sqlite"
    store = SQLiteLeaseStore(store_path)
    store.ensure_table()
    return client, table, source, store, store_path


@pytest.mark.parametrize("a_reads_first", [False, True], ids=["before-a-read", "after-a-delivered"])
def test_dynamodb_local_takeover_delivers_every_record_written_after_a_started(
        make_table, dynamodb_local, tmp_path, aws_env, a_reads_first):
    client, table, source, store, store_path = _real(make_table, dynamodb_local, tmp_path, aws_env)
    # DynamoDB Local rounds ApproximateCreationDateTime down to the minute (measured), so records
    # written just before A started may be delivered too (the default margin is 60 s: allowed,
    # at-least-once); that old records are left out is shown on the double above
    a = DeadAfterStart(source, store, tmp_path)
    a.wait_started()
    if not a_reads_first:
        a.die()  # A dies before anything is written after its start: it read nothing
    _put(client, table, ["new-0", "new-1"])
    if a_reads_first:
        wait_until(lambda: len(a.sink.written) == 2, "A delivered the new records", timeout=15)
        assert a.checkpoint().startswith(AT_SEQUENCE_PREFIX)
    else:
        assert a.checkpoint().startswith(AT_TIMESTAMP_PREFIX)
    expected_keys = {"new-0", "new-1", "new-2"}

    def keys(sink) -> set[str]:
        return {e.keys["pk"] for e in sink.written}

    sink = RecordingSink("b")
    b = worker_b(source, store_path, sink, tmp_path)
    thread = threading.Thread(target=b.run)
    thread.start()
    try:
        wait_until(lambda: store.get_lease(a.lease.lease_key).owner == "worker-b", "B took A's lease", timeout=15)
        a.die()
        _put(client, table, ["new-2"])
        try:
            wait_until(lambda: expected_keys <= keys(sink), "B delivered every new record", timeout=15)
        except AssertionError:
            pass
    finally:
        b.stop()
        thread.join(15)
    assert expected_keys <= keys(sink), f"lost on hand-off: {sorted(expected_keys - keys(sink))}"
    assert not a_reads_first or keys(a.sink) == {"new-0", "new-1"}


def test_an_exported_concrete_latest_checkpoint_imports_back():
    """`checkpoints export` writes what the lease holds, AT_TIMESTAMP:/AT_SEQUENCE_NUMBER: included;
    `checkpoints import` takes those back (they used to be refused as malformed)."""
    from pipeline.ops.checkpoint_moves import SNAPSHOT_FORMAT, new_move, parse_snapshot

    arn = "arn:aws:dynamodb:us-east-1:000000000000:table/orders/stream/2026-01-01T00:00:00.000"
    forms = [AT_TIMESTAMP_PREFIX + "1764720000", AT_SEQUENCE_PREFIX + seq(1, 3)]
    snapshot = {"format": SNAPSHOT_FORMAT, "leases": [
        {"lease_key": f"orders:x:shardId-{i}", "table": "orders", "stream_arn": arn, "shard_id": f"shardId-{i}",
         "checkpoint": checkpoint, "parent_shard_ids": []} for i, checkpoint in enumerate(forms)]}
    assert [lease.checkpoint for lease in parse_snapshot(snapshot)] == forms
    assert [new_move(checkpoint, "t").checkpoint for checkpoint in forms] == forms
    with pytest.raises(Exception, match="malformed"):
        parse_snapshot({**snapshot, "leases": [{**snapshot["leases"][0], "checkpoint": AT_TIMESTAMP_PREFIX + "soon"}]})


# -- a LATEST start on a quiet shard, handed off more than 24 h later (review 13, R3) --------------

def _clocked(monkeypatch) -> list[float]:
    """shard_consumer's wall clock made settable (``clock[0]``, epoch s), and its LATEST bound
    moved at every caught-up pass (no 10 min wait)."""
    import types

    import pipeline.runtime.shard_consumer as sc

    clock = [time.time()]
    monkeypatch.setattr(sc, "time", types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic,
                                                          sleep=time.sleep))
    monkeypatch.setattr(sc, "LATEST_BOUND_INTERVAL_S", 0.0, raising=False)
    return clock


def test_a_quiet_latest_shard_handed_off_after_24_h_delivers_its_first_change_without_a_gap(tmp_path, monkeypatch):
    """A LATEST start on an open shard that gets no write for 25 h: while its reader stays caught
    up it moves the ``AT_TIMESTAMP:`` bound forward (to the caught-up time − 300 s). The next owner
    reads from TRIM_HORIZON, the old record is trimmed, and the first change since the start is
    delivered — no gap. Old code: the bound stayed at the start, 25 h old, and the new owner
    stopped the shard with a gap under ``on_trimmed: fail`` (exit 1)."""
    from tests.stacks import Running

    clock = _clocked(monkeypatch)
    fake = FakeStreams()
    shard = fake.open_shard(created_ms=int((clock[0] - 3600) * 1000))
    fake.put(shard, make_stream_record(keys={"pk": "old"}, new_image={"pk": "old"}, created=clock[0] - 3600))
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()

    def bound() -> float | None:
        leases = store.list_leases()
        cp = leases[0].checkpoint if leases else ""
        return float(cp[len(AT_TIMESTAMP_PREFIX):]) if cp.startswith(AT_TIMESTAMP_PREFIX) else None

    first = Running(make_worker(fake, tmp_path, RecordingSink(), store=store, on_trimmed="fail",
                                start_position=LATEST, logger=structlog.get_logger()))
    wait_until(lambda: bound() is not None, "LATEST made concrete")
    clock[0] += 25 * 3600  # a day passes, nothing is written
    wait_until(lambda: bound() >= clock[0] - 3600, "the bound moved while caught up")  # 300 s before the jump's time
    assert first.stop() == 0
    fake.trim_head(shard, 1)
    fake.put(shard, make_stream_record(keys={"pk": "new"}, new_image={"pk": "new"}, created=clock[0] + 1))
    sink = RecordingSink()
    second = Running(make_worker(fake, tmp_path, sink, store=store, on_trimmed="fail", start_position=LATEST,
                                 logger=structlog.get_logger()))
    wait_until(lambda: [e.keys["pk"] for e in sink.written] == ["new"], "the first change since the start")
    assert second.stop() == 0
    assert store.list_gaps() == []


def test_latest_start_checkpoints_keep_the_version_floor(tmp_path):
    """The ``AT_TIMESTAMP:`` checkpoint of a LATEST start (and the bound moves and the
    ``AT_SEQUENCE_NUMBER:`` pin) store the shard's version floor, as every checkpoint does: the
    parent lease may be deleted once the child checkpointed past its start, and a later reader
    then takes the floor from the child's lease. Old code wrote them without it: a later reader
    found no floor and no parent, computed 0, and its versions fell below the parent's."""
    from pipeline.checkpoint import Lease, lease_key_for
    from pipeline.codec import child_version_floor
    from pipeline.events import SHARD_END
    from tests.stacks import Running

    fake = FakeStreams()
    parent = fake.open_shard()
    fake.shards[parent].closed = True
    child = fake.open_shard(parent=parent)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    key = lambda shard: lease_key_for("orders", STREAM_ARN, shard)  # noqa: E731
    store.create_lease_if_absent(Lease(lease_key=key(parent), table="orders", stream_arn=STREAM_ARN, shard_id=parent,
                                       checkpoint=SHARD_END, version_floor=3, version_high=7))
    store.create_lease_if_absent(Lease(lease_key=key(child), table="orders", stream_arn=STREAM_ARN, shard_id=child,
                                       checkpoint=LATEST, parent_shard_ids=(parent,)))
    running = Running(make_worker(fake, tmp_path, RecordingSink(), store=store, logger=structlog.get_logger()))
    wait_until(lambda: store.get_lease(key(child)).checkpoint.startswith(AT_TIMESTAMP_PREFIX), "LATEST made concrete")
    assert store.get_lease(key(child)).version_floor == child_version_floor([(3, 7)]) == 8
    fake.put(child, make_stream_record(keys={"pk": "a"}, new_image={"pk": "a"}))
    wait_until(lambda: not store.get_lease(key(child)).checkpoint.startswith(AT_TIMESTAMP_PREFIX),
               "first record pinned")
    assert running.stop() == 0
    assert store.get_lease(key(child)).version_floor == 8
