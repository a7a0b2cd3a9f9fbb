"""The worker-wide read budget (``worker.max_pages_in_flight``, pipeline/runtime/read_budget.py): at most N
GetRecords pages fetched and not yet delivered at once, every record still delivered exactly once
in order; idle shards, throttled shards and waiting shards hold no share; stop ends the waits.

Real Worker, DynamoDBStreamSource and SQLite lease store over the API double
(connectors/dynamodb_streams/testing.py); ReadBudget itself is also tested directly."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import structlog

from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.config import WorkerConfig
from pipeline.events import Batch
from pipeline.runtime.read_budget import DEFAULT_MAX_PAGES_IN_FLIGHT, ReadBudget
from pipeline.sink import Sink
from pipeline.runtime.worker import Worker
from connectors.dynamodb_streams.testing import FakeStreams, seq
from test_worker_source import recs
from tests.stacks import Running, make_worker
from tests.helpers import wait_until


def shard_name(no: int) -> str:
    return f"shardId-00000001700000000000-{no:08d}"


class HolderCountingStreams(FakeStreams):
    """Counts the shard readers that hold a page, seen from outside the worker: from the start of a
    GetRecords call until the call returned empty, or until the last sink was given the page's
    last record (:meth:`delivered`). ``max_holders`` is the most at once."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.holders = 0
        self.max_holders = 0
        self._open_pages: set[str] = set()  # last sequence number of each page not yet delivered
        self._count = threading.Lock()
        self.gate: threading.Event | None = None  # GetRecords of ``gated_shard`` waits for it
        self.gated_shard: str | None = None

    def get_records(self, *, ShardIterator: str, Limit: int | None = None) -> dict[str, Any]:
        with self._count:
            self.holders += 1
            self.max_holders = max(self.max_holders, self.holders)
        try:
            if self.gate is not None and ShardIterator.endswith(self.gated_shard or "?"):
                assert self.gate.wait(20), "the gate of the gated shard never opened"
            response = super().get_records(ShardIterator=ShardIterator, Limit=Limit)
        except BaseException:
            with self._count:
                self.holders -= 1
            raise
        with self._count:
            if response["Records"]:
                self._open_pages.add(response["Records"][-1]["dynamodb"]["SequenceNumber"])
            else:
                self.holders -= 1
        return response

    def delivered(self, sequence_numbers: list[str]) -> None:
        with self._count:
            for s in sequence_numbers:
                if s in self._open_pages:
                    self._open_pages.discard(s)
                    self.holders -= 1


class LastSink(Sink):
    """The last sink of the fan-out: keeps each shard's sequence numbers and tells the double which
    pages are delivered; ``delay_s`` per write makes deliveries overlap."""

    thread_safe = True

    def __init__(self, name: str, fake: HolderCountingStreams, delay_s: float = 0.0):
        super().__init__(name)
        self.fake = fake
        self.delay_s = delay_s
        self.by_shard: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def write(self, batch: Batch) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        seqs = [e.sequence_number for e in batch.events]
        with self._lock:
            self.by_shard.setdefault(batch.shard_id, []).extend(seqs)
        self.fake.delivered(seqs)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.by_shard.values())


class FirstSink(Sink):
    thread_safe = True

    def write(self, batch: Batch) -> None:
        time.sleep(0.002)


def budget_worker(fake: FakeStreams, tmp_path, sinks: list[Sink], *, pages: int, max_records: int = 10,
                  idle_interval_ms: int = 10, exit_when_idle: bool = True) -> Worker:
    return make_worker(fake, tmp_path, sinks, logger=structlog.get_logger("test_read_budget"),
                       max_records=max_records, idle_interval_ms=idle_interval_ms, checkpoint_interval_s=0.05,
                       failover_time_s=3.0, fast_retries=True, exit_when_idle=exit_when_idle,
                       max_pages_in_flight=pages)


# ---------------------------------------------------------------------------------------------
# the bound holds, and nothing is lost, repeated or reordered


@pytest.mark.parametrize("pages", [1, 3])
def test_at_most_max_pages_in_flight_readers_hold_a_page(tmp_path, pages):
    fake = HolderCountingStreams(get_records_delay_s=0.005)
    shards = [shard_name(i) for i in range(1, 9)]
    for no, shard in enumerate(shards, start=1):
        fake.add_shard(shard, recs(no, 40), closed=True)  # 4 full pages of 10 each
    last = LastSink("last", fake, delay_s=0.01)
    worker = budget_worker(fake, tmp_path, [FirstSink("first"), last], pages=pages)
    assert Running(worker).join(30) == 0

    assert fake.max_holders <= pages, f"{fake.max_holders} readers held a page at once (limit {pages})"
    assert worker.read_budget.peak_records <= pages * 10
    if pages > 1:
        assert fake.max_holders == pages, "8 shards behind: the bound should have been reached"
    for no, shard in enumerate(shards, start=1):
        assert last.by_shard[shard] == [seq(no, i) for i in range(40)], f"{shard}: not exactly once in order"
    assert worker.read_budget.used == 0


def test_without_a_bound_the_readers_overlap(tmp_path):
    """The control: the same run with max_pages_in_flight 0 has more readers holding a page at once
    (so the test above measures a real bound, not a lack of parallelism)."""
    fake = HolderCountingStreams(get_records_delay_s=0.005)
    for no in range(1, 9):
        fake.add_shard(shard_name(no), recs(no, 40), closed=True)
    last = LastSink("last", fake, delay_s=0.01)
    worker = budget_worker(fake, tmp_path, [FirstSink("first"), last], pages=0)
    assert Running(worker).join(30) == 0
    assert fake.max_holders > 3
    assert last.count() == 8 * 40


# ---------------------------------------------------------------------------------------------
# no share is held while waiting: idle wait, throttling backoff, stop


def test_shards_waiting_between_polls_hold_no_share(tmp_path):
    """5 idle shards wait 60 s after their first (empty) read. A busy shard's first GetRecords is
    held in the double until every idle shard made its first read, so with a budget of 2 pages
    (one held by the busy shard) the idle shards must take turns with the other: if any kept its
    share through its 60 s wait, the others could never read and the busy shard never finish."""
    fake = HolderCountingStreams()
    idle = [shard_name(i) for i in range(1, 6)]
    busy = shard_name(9)
    for shard in idle:
        fake.add_shard(shard, [], closed=False)
    fake.add_shard(busy, recs(9, 30), closed=True)
    fake.gate, fake.gated_shard = threading.Event(), busy

    def idle_shards_read() -> bool:
        read = {c["ShardIterator"].rsplit("-", 1)[-1] for c in fake.calls_of("GetRecords")}
        return all(s.rsplit("-", 1)[-1] in read for s in idle)

    last = LastSink("last", fake)
    worker = budget_worker(fake, tmp_path, [last], pages=2, idle_interval_ms=60_000, exit_when_idle=False)
    running = Running(worker)
    wait_until(idle_shards_read, "every idle shard made its first read", timeout=10)
    fake.gate.set()
    wait_until(lambda: last.count() == 30, "the busy shard delivered", timeout=10)
    assert last.by_shard[busy] == [seq(9, i) for i in range(30)]
    assert worker.read_budget.used == 0
    started = time.monotonic()
    assert running.stop() == 0
    assert time.monotonic() - started < 3, "stop ends the idle waits"


def test_a_throttled_shard_holds_no_share_during_its_backoff(tmp_path):
    """Budget of one page: shard T is throttled 4 times (backoff 0.25 s doubling, ~3.75 s in all);
    shard B reads its 3 pages meanwhile, before T's first successful read."""
    fake = HolderCountingStreams()
    t, b = shard_name(1), shard_name(2)
    fake.add_shard(t, recs(1, 10), closed=True)
    fake.add_shard(b, recs(2, 30), closed=True)
    fake.fail_get_records(t, 0, "LimitExceededException", times=4)
    last = LastSink("last", fake)
    worker = budget_worker(fake, tmp_path, [last], pages=1)
    assert Running(worker).join(30) == 0
    assert last.by_shard[b] == [seq(2, i) for i in range(30)] and last.by_shard[t] == [seq(1, i) for i in range(10)]
    consumer_calls = [c["ShardIterator"].rsplit("-", 1)[-1] for c in fake.calls_of("GetRecords")]
    t_id, b_id = t.rsplit("-", 1)[-1], b.rsplit("-", 1)[-1]
    # T's calls: 4 throttled, then its page; B's 3 pages all come before T's successful call
    last_b = max(i for i, s in enumerate(consumer_calls) if s == b_id)
    last_t = max(i for i, s in enumerate(consumer_calls) if s == t_id)
    assert last_b < last_t, f"B finished after T's backoff: {consumer_calls}"


def test_stop_ends_the_wait_for_a_share(tmp_path):
    """Budget of one page, a sink slow enough that 6 shards queue for it: stop ends every wait at
    once, the worker stops cleanly within its grace period and every checkpoint is a delivered
    record."""
    fake = HolderCountingStreams()
    shards = [shard_name(i) for i in range(1, 7)]
    for no, shard in enumerate(shards, start=1):
        fake.add_shard(shard, recs(no, 50), closed=True)
    last = LastSink("last", fake, delay_s=0.1)
    worker = budget_worker(fake, tmp_path, [last], pages=1, exit_when_idle=False)
    running = Running(worker)
    wait_until(lambda: last.count() >= 20, "a few pages delivered", timeout=10)
    started = time.monotonic()
    assert running.stop() == 0
    assert time.monotonic() - started < 2
    for lease in SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases():
        delivered = last.by_shard.get(lease.shard_id, [])
        assert lease.checkpoint == "TRIM_HORIZON" or lease.checkpoint in delivered
        assert not lease.owner


def test_a_caught_up_shard_asks_for_and_reserves_a_small_page_until_it_is_behind(tmp_path):
    """With max_records_per_call 1000: the first read asks for 1000; after a page of fewer than
    CAUGHT_UP_LIMIT (100) records the shard asks for 100 (and reserves only that); a full
    100-record page means it is behind, so it asks for 1000 again. Meanwhile 10 idle shards' polls
    (20 ms each) overlap within a budget of one 1,000-record page."""
    fake = HolderCountingStreams(get_records_delay_s=0.02)
    shard = shard_name(1)
    fake.add_shard(shard, [], closed=False)
    idle = [shard_name(i) for i in range(2, 12)]
    for s in idle:
        fake.add_shard(s, [], closed=False)
    last = LastSink("last", fake)
    worker = budget_worker(fake, tmp_path, [last], pages=1, max_records=1000, idle_interval_ms=50,
                           exit_when_idle=False)
    running = Running(worker)

    def limits() -> list[int]:
        return [c["Limit"] for c in fake.calls_of("GetRecords") if c["ShardIterator"].endswith(shard)]

    wait_until(lambda: len(limits()) >= 3, "a few empty polls")
    fake.append(shard, recs(1, 250))
    wait_until(lambda: last.count() == 250, "the 250 records delivered")
    assert last.by_shard[shard] == [seq(1, i) for i in range(250)]
    calls = len(limits())
    wait_until(lambda: len(limits()) >= calls + 3, "caught up again: a few more polls")
    assert running.stop() == 0
    seen = limits()
    assert seen[0] == 1000 and seen[1] == 100, seen  # first read full, then caught up
    # the burst: the 100-record probe came back full, so two full-limit calls (150 records, then
    # none: 150 >= 100 still means behind), then caught up again
    i = seen.index(1000, 1)
    assert set(seen[1:i]) == {100}, seen
    assert seen[i:i + 3] == [1000, 1000, 100], seen
    assert worker.read_budget.peak_records <= 1000 and worker.read_budget.used == 0
    assert worker.read_budget.peak_holders >= 2, "caught-up polls should not need a whole page each"


# ---------------------------------------------------------------------------------------------
# ReadBudget itself


def test_budget_reserves_full_pages_and_keeps_only_what_arrived():
    budget = ReadBudget(2, 1000)
    a = budget.reserve(1000)
    b = budget.reserve(1000)
    assert budget.used == 2000
    b.shrink_to(0)  # an empty page: everything back
    assert budget.used == 1000
    a.shrink_to(3)  # a small page keeps 3 records
    assert budget.used == 3
    c = budget.reserve(1000)
    assert budget.used == 1003
    a.release()
    a.release()  # idempotent
    c.release()
    assert budget.used == 0 and budget.holders == 0 and budget.peak_holders == 2


def test_budget_waiters_are_served_in_order_and_stop_ends_a_wait():
    budget = ReadBudget(1, 10)
    first = budget.reserve(10)
    order: list[int] = []
    stop = threading.Event()

    def waiter(n: int) -> None:
        share = budget.reserve(10, stop=stop, poll_s=0.01)
        if share is not None:
            order.append(n)
            share.release()

    threads = []
    for n in range(3):
        threads.append(threading.Thread(target=waiter, args=(n,)))
        threads[-1].start()
        wait_until(lambda: budget.waiting == n + 1, "waiter queued")
    first.release()
    for th in threads:
        th.join(5)
    assert order == [0, 1, 2]

    held = budget.reserve(10)
    blocked = threading.Thread(target=waiter, args=(9,))
    blocked.start()
    stop.set()
    blocked.join(2)
    assert not blocked.is_alive() and 9 not in order
    held.release()
    assert budget.used == 0


def test_budget_of_zero_pages_is_unbounded_and_bad_values_are_refused():
    budget = ReadBudget(0, 1000)
    shares = [budget.reserve(1000) for _ in range(50)]
    assert not budget.bounded and all(s is not None for s in shares)
    assert ReadBudget(1, 10).reserve(500).records == 10  # clamped to the capacity: no deadlock
    with pytest.raises(ValueError):
        ReadBudget(-1, 10)
    with pytest.raises(ValueError):
        ReadBudget(1, 0)


def test_config_default_and_validation():
    assert WorkerConfig().max_pages_in_flight == DEFAULT_MAX_PAGES_IN_FLIGHT == 4
    assert WorkerConfig(max_pages_in_flight=0).max_pages_in_flight == 0
    with pytest.raises(ValueError):
        WorkerConfig(max_pages_in_flight=-1)
