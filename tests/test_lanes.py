"""Per-sink lanes (issue 15, items 1–2; :mod:`pipeline.runtime.lanes`): a slow or blocked sink holds
only its own lane — and the checkpoint — while the other sinks deliver on; lanes and the read
budget bound what is held; the checkpoint is the lowest position every sink made durable; SIGTERM
drains every lane before the final checkpoint.

Real Worker, DynamoDBStreamSource and SQLite lease store over the streams API double
(tests/streams_double.py); the real-server versions are in tests/test_lanes_e2e.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import structlog

from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.errors import FatalSinkError, LeaseLostError, RetriableSinkError
from pipeline.events import Batch
from pipeline.runtime.fanout import FailurePolicy
from pipeline.runtime.lanes import LaneSettings
from pipeline.runtime.shard_consumer import ShardSettings
from pipeline.runtime.worker import Worker
from pipeline.testing import RecordingSink
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq
from test_worker_source import Running, recs
from tests.helpers import wait_until

SHARD = "shardId-00000001700000000000-0000lane"


class GateSink(RecordingSink):
    """A buffering sink (durable only at ``flush``) whose writes wait while ``gate`` is closed;
    ``flushed_seqs`` lists what it made durable, in order."""

    def __init__(self, name: str):
        super().__init__(name)
        self.gate = threading.Event()
        self.gate.set()
        self.in_write = threading.Event()

    def write(self, batch: Batch) -> None:
        self.in_write.set()
        assert self.gate.wait(30), "the test never opened the gate"
        super().write(batch)

    def flushed_seqs(self) -> list[str]:
        with self._lock:
            return [e.sequence_number for e in self.flushed]

    def written_seqs(self) -> list[str]:
        with self._lock:
            return [e.sequence_number for e in self.written]


def lane_worker(fake: FakeStreams, tmp_path, sinks: list, *, pages_in_flight: int = 0,
                lanes: dict[str, LaneSettings] | None = None, policies: dict[str, FailurePolicy] | None = None,
                checkpoint_interval_s: float = 0.0, exit_when_idle: bool = False) -> Worker:
    SQLiteLeaseStore(tmp_path / "l.sqlite").ensure_table()
    return Worker(
        source=DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake),
        lease_store=SQLiteLeaseStore(tmp_path / "l.sqlite"), sinks=sinks,
        dead_letter=DirectoryDeadLetterQueue(tmp_path / "dlq"), worker_id="w-lanes",
        logger=structlog.get_logger("test_lanes"),
        shard_settings=ShardSettings(max_records_per_call=2, idle_interval_ms=10,
                                     checkpoint_interval_s=checkpoint_interval_s),
        discovery_interval_s=0.05, failover_time_s=3.0, shutdown_grace_s=10.0,
        policies=policies or {s.name: FailurePolicy(initial_backoff_s=0.001, max_backoff_s=0.01) for s in sinks},
        max_pages_in_flight=pages_in_flight, lane_settings=lanes, exit_when_idle=exit_when_idle)


def checkpoint(tmp_path) -> str:
    (lease,) = SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases()
    return lease.checkpoint


def covered(cp: str, all_seqs: list[str]) -> int:
    """How many of ``all_seqs`` a checkpoint covers."""
    if cp == "SHARD_END":
        return len(all_seqs)
    return 0 if cp not in all_seqs else all_seqs.index(cp) + 1


def test_a_stuck_sink_holds_only_its_lane_and_the_checkpoint(tmp_path):
    """The slow sink is stuck in its first write: the other sink still receives and flushes the
    whole shard, and the checkpoint does not pass what the slow sink made durable (nothing)."""
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 20), closed=True)
    all_seqs = [seq(1, i) for i in range(20)]
    slow, fast = GateSink("slow"), GateSink("fast")
    slow.gate.clear()
    worker = lane_worker(fake, tmp_path, [slow, fast], exit_when_idle=True)
    running = Running(worker)
    assert slow.in_write.wait(10)
    wait_until(lambda: fast.flushed_seqs() == all_seqs, "the fast sink got and flushed the whole shard", timeout=20)
    (consumer,) = worker.consumers.values()
    assert consumer.stats.records_read == 20
    # the checkpoint is the minimum of what every sink made durable: the slow sink has nothing
    assert checkpoint(tmp_path) == "TRIM_HORIZON"
    rows = {row.sink: row for row in worker.lanes.status()}
    assert rows["fast"].records == 0 and rows["fast"].undurable_records == 0
    assert rows["fast"].durable_position == all_seqs[-1]
    assert rows["slow"].records == 20 and rows["slow"].durable_position is None and rows["slow"].age_s >= 0

    slow.gate.set()
    assert running.join(20) == 0
    assert slow.flushed_seqs() == all_seqs, "in sequence order, exactly once"
    assert fast.written_seqs() == all_seqs
    assert checkpoint(tmp_path) == "SHARD_END"


def test_the_checkpoint_never_passes_what_the_slowest_sink_made_durable(tmp_path):
    """A sink that takes a while per write (and is durable only when flushed) next to a fast one:
    sampled all along, every checkpoint is covered by both sinks' flushed events."""
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 30), closed=True)
    all_seqs = [seq(1, i) for i in range(30)]

    class Sleepy(GateSink):
        def write(self, batch: Batch) -> None:
            time.sleep(0.05)
            super().write(batch)

    slow, fast = Sleepy("slow"), GateSink("fast")
    worker = lane_worker(fake, tmp_path, [fast, slow], exit_when_idle=True,
                         lanes={"slow": LaneSettings(max_records=4, coalesce_max_records=1)})
    running = Running(worker)
    violations, samples = [], []
    while running.thread.is_alive():
        try:
            cp = checkpoint(tmp_path)
        except ValueError:
            continue  # no lease yet
        # read the checkpoint first: what the sinks flushed only grows afterwards
        slow_durable, fast_durable = set(slow.flushed_seqs()), set(fast.flushed_seqs())
        n = covered(cp, all_seqs)
        samples.append(n)
        if not set(all_seqs[:n]) <= slow_durable or not set(all_seqs[:n]) <= fast_durable:
            violations.append((cp, len(slow_durable), len(fast_durable)))
        time.sleep(0.01)
    assert running.join(5) == 0
    assert not violations, violations
    assert len(set(samples)) > 2, f"the checkpoint should have moved in steps: {sorted(set(samples))}"
    assert slow.flushed_seqs() == all_seqs and checkpoint(tmp_path) == "SHARD_END"


def test_a_full_lane_makes_the_reader_wait(tmp_path):
    """Backpressure: with the slow sink's lane bounded to 4 records and no read budget, the reader
    stops reading once that lane is full (the batch being written counts): the fast sink is at
    most a lane ahead, and the reader holds one more page, waiting for room."""
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 40), closed=True)
    slow, fast = GateSink("slow"), GateSink("fast")
    slow.gate.clear()
    worker = lane_worker(fake, tmp_path, [slow, fast], exit_when_idle=True,
                         lanes={"slow": LaneSettings(max_records=4, coalesce_max_records=2)})
    running = Running(worker)
    assert slow.in_write.wait(10)
    # the lane (4 records, the one being written included) + one page waiting for room: 6 read
    wait_until(lambda: len(fast.written_seqs()) >= 4, "the fast sink got what fits in the slow lane", timeout=20)
    (consumer,) = worker.consumers.values()
    time.sleep(1.0)  # give a reader that would ignore the bound the time to read on
    assert consumer.stats.records_read <= 6, consumer.stats.records_read
    assert len(fast.written_seqs()) <= 4
    rows = {row.sink: row for row in worker.lanes.status()}
    assert rows["slow"].records <= 4 and rows["slow"].bytes > 0
    slow.gate.set()
    assert running.join(20) == 0
    assert slow.flushed_seqs() == [seq(1, i) for i in range(40)]


def test_the_read_budget_still_bounds_pages_not_yet_written_to_every_sink(tmp_path):
    """``worker.max_pages_in_flight`` = 2 pages of 2 records: a page keeps its share until every
    sink wrote it, so with the slow sink stuck the worker holds at most 2 pages (4 records) across
    its shards, however large the lanes are."""
    fake = FakeStreams()
    shards = [f"{SHARD}{n}" for n in range(3)]
    for no, shard in enumerate(shards, start=1):
        fake.add_shard(shard, recs(no, 10), closed=True)
    slow, fast = GateSink("slow"), GateSink("fast")
    slow.gate.clear()
    worker = lane_worker(fake, tmp_path, [slow, fast], pages_in_flight=2, exit_when_idle=True)
    running = Running(worker)
    assert slow.in_write.wait(10)
    wait_until(lambda: len(fast.written_seqs()) >= 4, "the fast sink got what the budget lets through", timeout=20)
    time.sleep(1.0)
    assert worker.read_budget.used <= 4
    assert len(fast.written_seqs()) <= 4, "the budget bounds what was read and is not yet in every sink"
    slow.gate.set()
    assert running.join(30) == 0
    assert len(slow.flushed_seqs()) == 30 and worker.read_budget.used == 0


def test_block_policy_retries_hold_only_that_lane(tmp_path):
    """``on_failure: block``: a sink failing (retriable) keeps retrying its batch; the other sink
    delivers on; once the failures stop, everything arrives and the checkpoint moves."""
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 10), closed=True)
    all_seqs = [seq(1, i) for i in range(10)]
    failing, fast = GateSink("failing"), GateSink("fast")
    failing.fail_next = [RetriableSinkError("down")] * 10_000
    worker = lane_worker(fake, tmp_path, [failing, fast], exit_when_idle=True,
                         policies={"failing": FailurePolicy("block", initial_backoff_s=0.01, max_backoff_s=0.02),
                                   "fast": FailurePolicy()})
    running = Running(worker)
    wait_until(lambda: fast.flushed_seqs() == all_seqs, "the other sink delivered the whole shard", timeout=20)
    wait_until(lambda: worker.runners[0].stats.retries > 3, "the failing sink keeps retrying", timeout=20)
    assert checkpoint(tmp_path) == "TRIM_HORIZON", "block holds the checkpoint"
    with failing._lock:
        failing.fail_next.clear()
    assert running.join(20) == 0
    assert failing.flushed_seqs() == all_seqs and checkpoint(tmp_path) == "SHARD_END"


class DownSink(RecordingSink):
    """Every write fails (retriable) while ``down`` is set; ``attempts`` counts writes per shard."""

    def __init__(self, name: str):
        super().__init__(name)
        self.down = threading.Event()
        self.down.set()
        self.attempts: dict[str, int] = {}

    def write(self, batch: Batch) -> None:
        with self._lock:
            self.attempts[batch.shard_id] = self.attempts.get(batch.shard_id, 0) + 1
        if self.down.is_set():
            raise RetriableSinkError("down")
        super().write(batch)


def test_a_blocked_retry_ends_when_the_lease_is_lost_and_writes_nothing_more(tmp_path):
    """``on_failure: block`` retries a failing sink for ever — but only while the shard is ours.
    Another worker takes the lease (through the lease store) while the sink is down: the old
    owner's retry loop ends (its reader ends ``lease_lost``), the sink thread goes on with the other
    shard, and once the sink is back nothing of the lost shard is written here (it would be stale:
    the new owner reads it from the checkpoint). Nothing of it is checkpointed by the old owner."""
    from pipeline.checkpoint import lease_key_for

    lost, kept = SHARD, "shardId-00000001700000000000-0000kept"
    fake = FakeStreams()
    fake.add_shard(lost, recs(1, 4), closed=True)
    fake.add_shard(kept, [], closed=False)
    sink = DownSink("blocked")
    outcomes: list[tuple[str, str]] = []
    worker = lane_worker(fake, tmp_path, [sink],
                         policies={"blocked": FailurePolicy("block", initial_backoff_s=0.01, max_backoff_s=0.02)})
    worker.on_consumer_done = lambda c: outcomes.append((c.shard_id, c.outcome))
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    key = lease_key_for("orders", STREAM_ARN, lost)
    stop_renewing = threading.Event()

    def other_worker() -> None:  # takes the lease and keeps it alive, as a live worker would
        while not stop_renewing.is_set():
            lease = store.get_lease(key)
            with contextlib.suppress(LeaseLostError):  # a race with the old owner's renewal: try again
                if lease.owner != "w-other":
                    store.take_lease(lease, "w-other")
                else:
                    store.renew_lease(lease)
            stop_renewing.wait(0.05)

    running = Running(worker)
    thief = threading.Thread(target=other_worker, daemon=True)
    try:
        wait_until(lambda: sink.attempts.get(lost, 0) >= 3, "the sink is retried for the shard", timeout=20)
        thief.start()
        wait_until(lambda: (lost, "lease_lost") in outcomes, "the old owner's reader ended lease_lost", timeout=20)
        sink.down.clear()  # the sink is back
        fake.append(kept, recs(2, 2))
        wait_until(lambda: len([e for e in sink.written if e.source.shard_id == kept]) == 2,
                   "the sink thread went on with the shard still owned", timeout=20)
    finally:
        running.worker.stop()
        running.join(20)
        stop_renewing.set()
        thief.join(5)
    stale = [e.sequence_number for e in sink.written if e.source.shard_id == lost]
    assert stale == [], f"the old owner wrote {stale} after it had lost the shard's lease"
    assert store.get_lease(key).checkpoint == "TRIM_HORIZON"


def test_a_fatal_sink_error_stops_the_shard_without_checkpointing_past_it(tmp_path):
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 10), closed=True)
    broken, fast = GateSink("broken"), GateSink("fast")
    broken.fail_next = [FatalSinkError("unusable")]
    worker = lane_worker(fake, tmp_path, [broken, fast])
    code = Running(worker).join(20)
    assert code == 1
    assert worker.failed and worker.failed[0][1] == "failed" and "unusable" in worker.failed[0][2]
    assert checkpoint(tmp_path) == "TRIM_HORIZON"


def test_sigterm_drains_every_lane_before_the_final_checkpoint(tmp_path):
    """Stop while the slow sink's lane still holds most of the shard: the worker writes and
    flushes every lane, checkpoints the last position read and exits 0 within the grace period."""
    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 20), closed=False)
    all_seqs = [seq(1, i) for i in range(20)]
    slow, fast = GateSink("slow"), GateSink("fast")
    slow.gate.clear()
    worker = lane_worker(fake, tmp_path, [slow, fast], checkpoint_interval_s=3600)
    running = Running(worker)
    wait_until(lambda: fast.written_seqs() == all_seqs, "the fast sink got the shard", timeout=20)
    worker.stop()
    time.sleep(0.2)
    assert running.thread.is_alive(), "shutdown waits for the slow lane"
    slow.gate.set()
    assert running.join(20) == 0
    assert slow.flushed_seqs() == all_seqs and fast.flushed_seqs() == all_seqs
    (lease,) = SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases()
    assert lease.checkpoint == all_seqs[-1] and not lease.owner
    assert slow.closed and fast.closed


def test_lane_metrics_show_per_sink_lag(tmp_path):
    """``ddb_cdc_lane_*{sink,table,shard}`` and ``ddb_cdc_sink_age_seconds{sink}`` at scrape time."""
    from prometheus_client import CollectorRegistry

    from pipeline.metrics import WorkerCollector

    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 6), closed=True)
    slow, fast = GateSink("slow"), GateSink("fast")
    slow.gate.clear()
    worker = lane_worker(fake, tmp_path, [slow, fast], exit_when_idle=True)
    running = Running(worker)
    wait_until(lambda: len(fast.flushed_seqs()) == 6, "the fast sink is current", timeout=20)
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: [worker]))
    labels = {"sink": "slow", "table": worker.source.table, "shard": SHARD}

    def value(name: str, **extra: Any) -> float | None:
        return registry.get_sample_value(name, {**labels, **extra})

    assert value("ddb_cdc_lane_undurable_records") == 6
    assert value("ddb_cdc_lane_records") == 6
    assert value("ddb_cdc_lane_bytes") > 0
    assert value("ddb_cdc_lane_records", sink="fast") == 0
    assert value("ddb_cdc_lane_undurable_records", sink="fast") == 0
    assert registry.get_sample_value("ddb_cdc_sink_age_seconds", {"sink": "slow"}) > 0
    slow.gate.set()
    assert running.join(20) == 0


def test_status_shows_per_sink_lanes_from_the_workers_heartbeat(tmp_path):
    """``ddb-cdc status`` (gather_status / render_status): per sink and shard, behind, fill, not
    durable and durable position, as the live worker announced them."""
    import io

    from rich.console import Console

    from pipeline.ops.status import gather_status, render_status, status_to_dict

    fake = FakeStreams()
    fake.add_shard(SHARD, recs(1, 6), closed=True)
    slow, fast = GateSink("slow"), GateSink("fast")
    slow.gate.clear()
    worker = lane_worker(fake, tmp_path, [slow, fast], exit_when_idle=True)
    running = Running(worker)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")

    def lanes_reported() -> list:
        report = gather_status(store, failover_time_s=3.0)
        return [r for r in report.sink_lanes if r.sink == "fast" and r.undurable_records == 0
                and r.durable_position == seq(1, 5)]

    wait_until(lambda: bool(lanes_reported()), "the worker announced its lanes", timeout=20)
    report = gather_status(store, failover_time_s=3.0)
    rows = {r.sink: r for r in report.sink_lanes}
    assert rows["slow"].shard_id == SHARD and rows["slow"].records == 6 and rows["slow"].undurable_records == 6
    assert rows["slow"].durable_position is None and rows["slow"].behind_ms > 0
    assert rows["fast"].records == 0 and rows["fast"].behind_ms == 0
    assert status_to_dict(report)["sink_lanes"][0]["sink"] == "fast"
    out = io.StringIO()
    render_status(report, console=Console(file=out, width=250))
    text = out.getvalue()
    assert "Sink lanes" in text and "6 rec /" in text
    slow.gate.set()
    assert running.join(20) == 0


def test_idle_wait_grows_while_a_shard_stays_empty_and_resets_when_records_flow():
    from pipeline.runtime.shard_consumer import idle_wait_s

    waits = [idle_wait_s(n, 250, 2000) for n in range(1, 9)]
    assert waits == [0.25, 0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert idle_wait_s(1, 250, 2000) == 0.25  # the counter restarts at 1 after a page with records
    assert [idle_wait_s(n, 250, 250) for n in (1, 5, 50)] == [0.25, 0.25, 0.25]  # fixed wait
    assert idle_wait_s(10**6, 250, 2000) == 2.0


def test_an_idle_shard_polls_less_and_still_delivers_new_records(tmp_path):
    """Adaptive idle polling: an empty open shard is polled ever more slowly (base 10 ms, at most
    200 ms: a fixed 10 ms wait would make ~100 calls a second); a record added later is still
    delivered."""
    fake = FakeStreams()
    fake.add_shard(SHARD, [], closed=False)
    sink = GateSink("sink")
    worker = lane_worker(fake, tmp_path, [sink])
    worker.shard_settings.idle_interval_ms, worker.shard_settings.max_idle_interval_ms = 10, 200
    running = Running(worker)
    wait_until(lambda: len(fake.calls_of("GetRecords")) >= 5, "the shard is polled", timeout=20)
    first = len(fake.calls_of("GetRecords"))
    time.sleep(2.0)
    calls = len(fake.calls_of("GetRecords")) - first
    assert calls <= 25, f"{calls} GetRecords calls in 2 s on an idle shard (max wait 200 ms: about 10)"
    fake.append(SHARD, recs(1, 1))
    wait_until(lambda: sink.written_seqs() == [seq(1, 0)], "the new record delivered", timeout=20)
    assert running.stop() == 0


def _one_event_batch(shard_id: str, i: int) -> Batch:
    """A batch of one INSERT of item ``{shard_id}-{i}`` at sequence number seq(1, i) of ``shard_id``."""
    from pipeline.testing import make_batch, make_stream_record

    return make_batch([make_stream_record(keys={"pk": f"{shard_id}-{i}"}, new_image={"pk": f"{shard_id}-{i}"},
                                          sequence_number=seq(1, i))], shard_id=shard_id)


def _x_and_y_written_then_y_lost(tmp_path, sink):
    """Real FanOut + Lanes over one ``sink``: shards X and Y each get one batch, written (not
    flushed); then Y's lease is lost and its reader detaches. Returns (lanes, x, runner); the
    caller stops ``lanes``."""
    import structlog as _structlog

    from pipeline.runtime.fanout import FanOut, SinkRunner
    from pipeline.runtime.lanes import Lanes

    runner = SinkRunner(sink, FailurePolicy(initial_backoff_s=0.001, max_backoff_s=0.01))
    fanout = FanOut([runner], DirectoryDeadLetterQueue(tmp_path / "dlq"), stop_event=threading.Event(),
                    logger=_structlog.get_logger("test_lanes"))
    lanes = Lanes(fanout)
    y_owned = threading.Event()
    y_owned.set()
    x = lanes.attach("demo-table", "shardId-X", owns=lambda: True)
    y = lanes.attach("demo-table", "shardId-Y", owns=y_owned.is_set)
    y.put(_one_event_batch("shardId-Y", 1), seq(1, 1))
    x.put(_one_event_batch("shardId-X", 2), seq(1, 2))
    wait_until(lambda: len(sink.written) == 2, "both batches written, neither flushed")
    y_owned.clear()  # Y's lease is lost; its reader ends and detaches its lanes
    y.detach()
    return lanes, x, runner


def test_a_partial_flush_asked_for_by_one_shard_writes_nothing_of_a_detached_shard(tmp_path):
    """Review 13, R2: a sink holds unflushed events of shards X and Y; Y's lease is lost and its
    reader detaches its lanes; X asks for its checkpoint flush and the sink names a Y event
    retriable. The fan-out must leave Y's events out (the new owner reads them again from Y's
    checkpoint), not write them under X's ownership; the runner's record drops Y at the detach."""
    from pipeline.errors import PartialSinkError

    class DropsY(RecordingSink):
        failed_once = False

        def flush(self):
            with self._lock:
                ys = [e for e in self._pending if e.source.shard_id == "shardId-Y"]
                if ys and not self.failed_once:
                    self.failed_once = True
                    self.flushed.extend(e for e in self._pending if e.source.shard_id != "shardId-Y")
                    self._pending.clear()
                    raise PartialSinkError("y dropped", retriable=[(ys[0], "throttled")])
            super().flush()

    sink = DropsY("buffering")
    lanes, x, runner = _x_and_y_written_then_y_lost(tmp_path, sink)
    try:
        assert [e.source.shard_id for e in runner.unflushed.snapshot()[1]] == ["shardId-X"]
        assert x.drain() == seq(1, 2)
        assert sorted(e.source.shard_id for e in sink.written) == ["shardId-X", "shardId-Y"], \
            "an event of shard Y was written after Y's lease was lost"
        assert list(DirectoryDeadLetterQueue(tmp_path / "dlq").list()) == []
    finally:
        lanes.stop()


def test_the_old_readers_late_detach_does_not_forget_the_new_readers_unflushed_events(tmp_path):
    """Lanes.attach detaches a straggling reader's lanes for the new reader of the shard; the old
    reader's own detach (its finally) comes later and must not drop the new reader's record."""
    import structlog as _structlog

    from pipeline.runtime.fanout import FanOut, SinkRunner
    from pipeline.runtime.lanes import Lanes
    from pipeline.testing import make_batch, make_stream_record

    sink = RecordingSink("buffering")
    runner = SinkRunner(sink, FailurePolicy(initial_backoff_s=0.001, max_backoff_s=0.01))
    lanes = Lanes(FanOut([runner], DirectoryDeadLetterQueue(tmp_path / "dlq"), stop_event=threading.Event(),
                         logger=_structlog.get_logger("test_lanes")))
    try:
        old = lanes.attach("demo-table", "shardId-Y")
        new = lanes.attach("demo-table", "shardId-Y")
        new.put(make_batch([make_stream_record(keys={"pk": "a"}, new_image={"pk": "a"}, sequence_number=seq(1, 1))],
                           shard_id="shardId-Y"), seq(1, 1))
        wait_until(lambda: len(sink.written) == 1, "the new reader's batch written")
        old.detach()
        assert [e.sequence_number for e in runner.unflushed.snapshot()[1]] == [seq(1, 1)]
        assert new.drain() == seq(1, 1)
    finally:
        lanes.stop()


def test_a_detached_shards_buffered_events_are_dropped_by_the_sink_before_another_shards_flush(tmp_path):
    """A buffering sink holds unflushed events of shards X and Y; Y's lease is lost and its reader
    detaches. X's next flush must not make Y's buffered events durable: the old owner would write
    them after the new owner started on Y. The detach makes the sink thread call the sink's
    ``reset_shard`` for Y before anything else."""
    class Buffering(RecordingSink):
        def reset_shard(self, table, shard_id):
            with self._lock:
                self._pending = [e for e in self._pending if e.source.shard_id != shard_id]

    sink = Buffering("buffering")
    lanes, x, _ = _x_and_y_written_then_y_lost(tmp_path, sink)
    try:
        assert x.drain() == seq(1, 2)
        assert [e.source.shard_id for e in sink.flushed] == ["shardId-X"], \
            "shard Y's buffered events were made durable after Y's lease was lost"
    finally:
        lanes.stop()


def test_a_flush_right_after_a_write_resets_a_shard_detached_during_that_write(tmp_path):
    """The sink thread is inside shard X's write when Y's reader detaches (lease lost); X's flush
    comes right after that write, before the thread's next pass. That flush must drop Y's
    buffered events first (review of 3ba0045: the reset ran only at the top of the next pass)."""
    import structlog as _structlog

    from pipeline.runtime.fanout import FanOut, SinkRunner
    from pipeline.runtime.lanes import Lanes

    class Buffering(RecordingSink):
        def __init__(self, name):
            super().__init__(name)
            self.in_x, self.go = threading.Event(), threading.Event()

        def write(self, batch):
            if batch.shard_id == "shardId-X":
                self.in_x.set()
                assert self.go.wait(10)
            super().write(batch)

        def reset_shard(self, table, shard_id):
            with self._lock:
                self._pending = [e for e in self._pending if e.source.shard_id != shard_id]

    sink = Buffering("buffering")
    runner = SinkRunner(sink, FailurePolicy(initial_backoff_s=0.001, max_backoff_s=0.01))
    fanout = FanOut([runner], DirectoryDeadLetterQueue(tmp_path / "dlq"), stop_event=threading.Event(),
                    logger=_structlog.get_logger("test_lanes"))
    lanes = Lanes(fanout)
    try:
        x = lanes.attach("demo-table", "shardId-X", owns=lambda: True)
        y = lanes.attach("demo-table", "shardId-Y", owns=lambda: True)
        y.put(_one_event_batch("shardId-Y", 1), seq(1, 1))
        wait_until(lambda: len(sink.written) == 1, "Y's batch written, not flushed")
        x.put(_one_event_batch("shardId-X", 2), seq(1, 2))
        assert sink.in_x.wait(10), "the sink thread is inside X's write"
        y.detach()  # Y's lease was lost meanwhile
        with lanes.lock:
            lanes.sinks[0].request_flush()  # a flush is due (a checkpoint tick) while the write runs
        sink.go.set()
        assert x.drain() == seq(1, 2)
        assert [e.source.shard_id for e in sink.flushed] == ["shardId-X"], \
            "shard Y's buffered events were made durable by X's flush after Y's lease was lost"
    finally:
        lanes.stop()
