"""Lineage clean-up and load balancing, driven through the DynamoDB Streams API double.

DynamoDB Local never splits shards nor trims them, so parents leaving the stream are produced by
the double; balancing runs several in-process workers on one SQLite lease file.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import structlog

from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.events import SHARD_END
from pipeline.testing import RecordingSink, make_stream_record
from pipeline.runtime.worker import Worker
from connectors.dynamodb_streams.testing import FakeStreams, seq
from tests import stacks
from tests.helpers import wait_until as _wait_until


def wait_until(predicate, what: str) -> None:
    """This module's polling bounds: 15.0 s, every 0.02 s."""
    _wait_until(predicate, what, timeout=15.0, interval=0.02)


def recs(shard_no: int, n: int) -> list[dict]:
    return [make_stream_record(event_name="INSERT", keys={"pk": f"s{shard_no}-{i}"},
                               new_image={"pk": f"s{shard_no}-{i}"}, sequence_number=seq(shard_no, i))
            for i in range(n)]




def make_worker(fake: FakeStreams, path, sink, worker_id: str, *, failover_time_s: float = 0.6) -> Worker:
    return stacks.make_worker(fake, path.parent, sink, worker_id=worker_id, store=SQLiteLeaseStore(path),
                              dead_letter=DirectoryDeadLetterQueue(path.parent / f"dlq-{worker_id}"),
                              logger=structlog.get_logger(), max_records=5, failover_time_s=failover_time_s)


def test_finished_parent_lease_is_removed_only_after_children_started_and_parent_left(tmp_path):
    fake = FakeStreams()
    fake.add_shard("shardId-P", recs(1, 3), closed=True)
    fake.add_shard("shardId-C", recs(2, 2), parent="shardId-P", closed=False)
    fake.add_shard("shardId-lonely", recs(3, 2), closed=True)  # closed, no children (yet)
    store_path = tmp_path / "l.sqlite"
    SQLiteLeaseStore(store_path).ensure_table()
    sink = RecordingSink()
    worker = make_worker(fake, store_path, sink, "w1")
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        store = SQLiteLeaseStore(store_path)
        wait_until(lambda: len(sink.written) == 7, "all 7 records delivered")
        leases = {lease.shard_id: lease for lease in store.list_leases()}
        wait_until(lambda: store.get_lease(leases["shardId-C"].lease_key).checkpoint == seq(2, 1),
                   "child checkpointed")
        # the parent is finished but still listed by DescribeStream: kept
        time.sleep(0.3)
        leases = {lease.shard_id: lease for lease in store.list_leases()}
        assert leases["shardId-P"].checkpoint == SHARD_END
        assert "shardId-P" in leases
        # the parent leaves the stream (trimmed after 24 h); its child has started: removed
        with fake._lock:
            del fake.shards["shardId-P"]
            del fake.shards["shardId-lonely"]
        wait_until(lambda: "shardId-P" not in {lease.shard_id for lease in store.list_leases()},
                   "parent lease removed")
        # a finished shard without children is kept, even after it left the stream
        time.sleep(0.3)
        remaining = {lease.shard_id: lease for lease in store.list_leases()}
        assert remaining["shardId-lonely"].checkpoint == SHARD_END
        # the child is not blocked by its parent's missing lease and goes on
        fake.append("shardId-C", recs(2, 4)[2:])
        wait_until(lambda: len(sink.written) == 9, "child keeps flowing after its parent's lease is gone")
    finally:
        worker.stop()
        thread.join(10)
    assert worker.failed == []
    order = [e.sequence_number for e in sink.written]
    assert order.index(seq(1, 2)) < order.index(seq(2, 0)), "child after its parent's last record"


def test_two_workers_split_six_shards_and_a_third_takes_its_share(tmp_path):
    fake = FakeStreams(page_size=4)
    for n in range(6):
        fake.add_shard(f"shardId-{n}", recs(n + 1, 2), closed=False)
    store_path = tmp_path / "l.sqlite"
    SQLiteLeaseStore(store_path).ensure_table()
    store = SQLiteLeaseStore(store_path)
    sinks = {w: RecordingSink(w) for w in ("w1", "w2", "w3")}
    workers = {w: make_worker(fake, store_path, sinks[w], w) for w in ("w1", "w2")}
    threads = {w: threading.Thread(target=workers[w].run) for w in workers}

    def owners() -> Counter:
        return Counter(lease.owner for lease in store.list_leases())

    for t in threads.values():
        t.start()
    try:
        wait_until(lambda: sorted(owners().values()) == [3, 3] and None not in owners(), "3/3 split")
        workers["w3"] = make_worker(fake, store_path, sinks["w3"], "w3")
        threads["w3"] = threading.Thread(target=workers["w3"].run)
        threads["w3"].start()
        wait_until(lambda: sorted(owners().values()) == [2, 2, 2], "2/2/2 after a third worker joined")
        # graceful hand-off: w1 stops and releases; the others take its leases at once
        workers["w1"].stop()
        threads["w1"].join(10)
        started = time.monotonic()
        wait_until(lambda: sorted(owners().values()) == [3, 3] and "w1" not in owners(), "w1's leases taken")
        assert time.monotonic() - started < 0.6 + 0.5, "taken within about one renewal interval, not failover_time"
    finally:
        for w, worker in workers.items():
            worker.stop()
        for t in threads.values():
            t.join(10)
    # every record delivered at least once across the workers, none lost
    delivered = {e.sequence_number for s in sinks.values() for e in s.written}
    assert delivered == {seq(n + 1, i) for n in range(6) for i in range(2)}
