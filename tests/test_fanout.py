"""pipeline.runtime.fanout.FanOut: order, retries, partial failures, dead-lettering, failure policies,
shutdown during retries, serialisation of non-thread-safe sinks."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from decimal import Decimal

import pytest
import structlog

from pipeline.codec import decode_item
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.errors import (
    FatalSinkError,
    PartialSinkError,
    PermanentSinkError,
    RetriableSinkError,
)
from pipeline.events import Batch
from pipeline.runtime.fanout import DeliveryAborted, FailurePolicy, FanOut, SinkRunner
from pipeline.sink import Sink
from pipeline.testing import RecordingSink, make_batch, make_stream_record, sample_batch

SHARD = "shardId-00000001700000000000-aaaaaaaa"


def fast(on_failure: str = "block", budget: float = 300.0) -> FailurePolicy:
    return FailurePolicy(on_failure=on_failure, retry_budget_s=budget, initial_backoff_s=0.001, max_backoff_s=0.01)


def batch_of(n: int, *, start: int = 1, shard_id: str = SHARD) -> Batch:
    records = []
    for i in range(start, start + n):
        k = {"pk": f"item#{i}"}
        records.append(make_stream_record(
            event_name="MODIFY", keys=k,
            old_image={**k, "n": Decimal(i), "state": "old"},
            new_image={**k, "n": Decimal(i + 1), "state": "new", "blob": b"\x00\xff"},
            sequence_number=f"{i:021d}"))
    return make_batch(records, shard_id=shard_id)


def seqs(events) -> list[str]:
    return [e.sequence_number for e in events]


@pytest.fixture
def stop() -> threading.Event:
    return threading.Event()


@pytest.fixture
def dlq(tmp_path) -> DirectoryDeadLetterQueue:
    return DirectoryDeadLetterQueue(tmp_path / "dlq")


def make_fanout(runners, dlq, stop) -> FanOut:
    return FanOut(runners, dlq, stop_event=stop, logger=structlog.get_logger("test_fanout"))


class ScriptedSink(Sink):
    """Calls ``script(sink, batch, call_no)`` on every write; records every batch it was given."""

    def __init__(self, name: str, script):
        super().__init__(name)
        self.script = script
        self.calls: list[tuple[str, ...]] = []
        self.delivered: list = []

    def write(self, batch: Batch) -> None:
        self.calls.append(tuple(seqs(batch.events)))
        self.script(self, batch, len(self.calls))


# ---------------------------------------------------------------------------------------------


def test_every_sink_receives_the_batch_in_order(dlq, stop):
    sinks = [RecordingSink("a"), RecordingSink("b"), RecordingSink("c")]
    fanout = make_fanout([SinkRunner(s, fast()) for s in sinks], dlq, stop)
    b1, b2 = batch_of(5, start=1), batch_of(3, start=6)
    fanout.deliver(b1)
    fanout.deliver(b2)
    fanout.flush()
    expected = [f"{i:021d}" for i in range(1, 9)]
    for sink in sinks:
        assert seqs(sink.written) == expected
        assert seqs(sink.flushed) == expected
        assert sink.written[0] is b1.events[0]  # the events themselves, not copies
    assert [r.stats.delivered for r in fanout.runners] == [8, 8, 8]
    assert [r.stats.flushes for r in fanout.runners] == [1, 1, 1]
    assert list(dlq.list()) == []


def test_retriable_error_twice_then_success_delivers_once(dlq, stop):
    sink = RecordingSink("rec")
    sink.fail_next = [RetriableSinkError("timeout 1"), RetriableSinkError("timeout 2")]
    runner = SinkRunner(sink, fast())
    fanout = make_fanout([runner], dlq, stop)
    batch = batch_of(4)
    fanout.deliver(batch)
    assert seqs(sink.written) == seqs(batch.events)  # once, not three times
    assert runner.stats.retries == 2
    assert runner.stats.delivered == 4
    assert runner.stats.dead_lettered == 0
    assert list(dlq.list()) == []


def test_partial_error_dead_letters_permanent_and_resends_retriable_with_the_later_events(dlq, stop):
    batch = batch_of(5)
    perm_ev, retry_ev = batch.events[1], batch.events[3]

    def script(sink, b, call_no):
        if call_no == 1:
            raise PartialSinkError("2 of 5 failed",
                                   permanent=[(perm_ev, "mapper_parsing_exception: bad field")],
                                   retriable=[(retry_ev, "es_rejected_execution_exception")])
        sink.delivered.extend(b.events)

    sink = ScriptedSink("search", script)
    runner = SinkRunner(sink, fast())
    make_fanout([runner], dlq, stop).deliver(batch)

    # first call got everything; the retry got the retriable event and every later one, in order
    assert sink.calls == [tuple(seqs(batch.events)), tuple(seqs(batch.events[3:]))]
    assert sink.delivered == list(batch.events[3:])
    assert runner.stats.dead_lettered == 1
    assert runner.stats.delivered == 4  # 2 before the retriable one on the first call + the 2 re-sent
    entries = list(dlq.list())
    assert len(entries) == 1
    entry = entries[0]
    assert entry.kind == "delivery"
    assert entry.sink == "search"
    assert "mapper_parsing_exception: bad field" in entry.error
    assert entry.shard_id == SHARD
    assert entry.sequence_number == perm_ev.sequence_number
    assert entry.stream_arn == perm_ev.source.stream_arn
    assert entry.attempts >= 1
    assert entry.first_failure and entry.last_failure
    # the full event, images included, decodable back to the same values
    assert entry.event["source"]["sequence_number"] == perm_ev.sequence_number
    assert entry.event["source"]["shard_id"] == SHARD
    assert decode_item(entry.event["before"]) == dict(perm_ev.before)
    assert decode_item(entry.event["after"]) == dict(perm_ev.after)
    assert decode_item(entry.event["after"])["blob"] == b"\x00\xff"
    assert entry.event["operation"] == "MODIFY"
    # and its JSON form carries the position too
    assert entry.to_dict()["position"] == {"stream_arn": perm_ev.source.stream_arn, "shard_id": SHARD,
                                           "sequence_number": perm_ev.sequence_number}


def end_state(events) -> dict:
    """Per item, its state after ``events`` were applied in the order given (last writer wins, as
    a sink without versions does): the after image, or None once removed."""
    state: dict = {}
    for ev in events:
        state[ev.key_id] = None if ev.operation.value == "REMOVE" else dict(ev.after)
    return state


def test_partial_retry_resends_every_later_event_of_the_batch_so_an_item_ends_at_its_last_change(dlq, stop):
    """Per-shard order (pipeline/sink.py): the sink refuses the INSERT of an item (retriable) and
    applies its MODIFY and REMOVE. Retrying the INSERT alone would re-create the removed item (a
    ghost); the retry re-sends it with every later event of the batch, in sequence order."""
    batch = sample_batch()  # INSERT, MODIFY, REMOVE of one item
    insert = batch.events[0]

    def script(sink, b, call_no):
        if call_no == 1:
            sink.delivered.extend(ev for ev in b.events if ev is not insert)
            raise PartialSinkError("1 of 3 failed", retriable=[(insert, "429 too many requests")])
        sink.delivered.extend(b.events)

    sink = ScriptedSink("cache", script)
    runner = SinkRunner(sink, fast())
    make_fanout([runner], dlq, stop).deliver(batch)
    assert sink.calls == [tuple(seqs(batch.events))] * 2  # the retry: the INSERT and everything after it
    assert end_state(sink.delivered) == {insert.key_id: None}, "the removed item came back"
    assert runner.stats.delivered == 3 and list(dlq.list()) == []


def test_permanent_error_dead_letters_every_event_with_deterministic_ids(dlq, stop):
    def script(sink, b, call_no):
        raise PermanentSinkError("403 index is read-only")

    sink = ScriptedSink("search", script)
    runner = SinkRunner(sink, fast())
    fanout = make_fanout([runner], dlq, stop)
    batch = batch_of(3)
    fanout.deliver(batch)
    assert len(sink.calls) == 1  # permanent: not retried
    entries = sorted(dlq.list(), key=lambda e: e.sequence_number)
    assert [e.sequence_number for e in entries] == seqs(batch.events)
    assert runner.stats.dead_lettered == 3
    for entry, event in zip(entries, batch.events):
        again = dlq.get(entry.id)
        assert again is not None and again.to_dict() == entry.to_dict()
        assert again.sink == "search" and "403 index is read-only" in again.error
        assert decode_item(again.event["after"]) == dict(event.after)
        assert decode_item(again.event["before"]) == dict(event.before)
    assert dlq.get("no-such-entry") is None

    # the same events dead-lettered again (e.g. replay after restart): same ids, no new entries
    ids = {e.id for e in entries}
    fanout.deliver(batch)
    assert {e.id for e in dlq.list()} == ids
    assert len(list(dlq.list())) == 3
    # another sink's failure for the same event is a different entry
    other = ScriptedSink("audit", script)
    make_fanout([SinkRunner(other, fast())], dlq, stop).deliver(batch_of(1))
    assert len(list(dlq.list())) == 4


def test_fatal_error_propagates_and_nothing_is_dead_lettered(dlq, stop):
    def script(sink, b, call_no):
        raise FatalSinkError("bucket does not exist")

    first, second = RecordingSink("first"), RecordingSink("second")
    fatal = ScriptedSink("fatal", script)
    fanout = make_fanout([SinkRunner(first, fast()), SinkRunner(fatal, fast()), SinkRunner(second, fast())],
                         dlq, stop)
    with pytest.raises(FatalSinkError, match="bucket does not exist"):
        fanout.deliver(batch_of(2))
    assert len(fatal.calls) == 1
    assert second.written == []  # the shard stops at the fatal sink
    assert list(dlq.list()) == []


def test_block_policy_retries_past_the_budget_and_dead_letters_nothing(dlq, stop):
    failures = 10
    timeline = []

    def script(sink, b, call_no):
        timeline.append(time.monotonic())
        if call_no <= failures:
            if call_no == 1:
                time.sleep(0.06)  # the budget (0.05 s) is spent already after the first attempt
            raise RetriableSinkError(f"unavailable #{call_no}")
        sink.delivered.extend(b.events)

    sink = ScriptedSink("blocky", script)
    runner = SinkRunner(sink, fast("block", budget=0.05))
    batch = batch_of(3)
    make_fanout([runner], dlq, stop).deliver(batch)
    assert len(sink.calls) == failures + 1
    assert timeline[-1] - timeline[0] > 0.05
    assert sink.delivered == list(batch.events)
    assert runner.stats.retries == failures
    assert runner.stats.dead_lettered == 0
    assert list(dlq.list()) == []


def test_dead_letter_policy_dead_letters_the_rest_after_the_budget(dlq, stop):
    batch = batch_of(4)
    delivered_ev = batch.events[0]

    def script(sink, b, call_no):
        if call_no == 1:  # first event goes through, the rest is to be retried
            raise PartialSinkError("3 failed", retriable=[(ev, "429") for ev in b.events[1:]])
        raise RetriableSinkError("still unavailable")

    sink = ScriptedSink("lossy", script)
    runner = SinkRunner(sink, fast("dead_letter", budget=0.05))
    started = time.monotonic()
    make_fanout([runner], dlq, stop).deliver(batch)  # returns
    elapsed = time.monotonic() - started
    assert 0.05 <= elapsed < 2.0
    assert len(sink.calls) >= 2
    assert all(call == tuple(seqs(batch.events[1:])) for call in sink.calls[1:])
    entries = list(dlq.list())
    assert sorted(e.sequence_number for e in entries) == seqs(batch.events[1:])
    assert delivered_ev.sequence_number not in {e.sequence_number for e in entries}
    for entry in entries:
        assert entry.sink == "lossy"
        assert "retry budget" in entry.error and "still unavailable" in entry.error
        assert entry.attempts == len(sink.calls)
    assert runner.stats.dead_lettered == 3


def test_stop_event_during_retries_aborts_delivery(dlq, stop):
    def script(sink, b, call_no):
        if call_no == 3:
            stop.set()
        raise RetriableSinkError("down")

    sink = ScriptedSink("down", script)
    after = RecordingSink("after")
    fanout = make_fanout([SinkRunner(sink, fast("dead_letter", budget=60)), SinkRunner(after, fast())], dlq, stop)
    with pytest.raises(DeliveryAborted):
        fanout.deliver(batch_of(2))
    assert len(sink.calls) == 3
    assert after.written == []
    assert list(dlq.list()) == []  # aborted events are not dead-lettered: they are read again


def test_lease_loss_ends_blocked_write_and_flush_retries_without_another_sink_call(dlq, stop):
    """``owns`` (the shard reader's ownership check) turns False during ``block`` retries: the
    retries end with LeaseLostError — no further write or flush — and later sinks get nothing."""
    from pipeline.errors import LeaseLostError

    owned = threading.Event()
    owned.set()

    def script(sink, b, call_no):
        if call_no == 3:
            owned.clear()  # another worker took the lease meanwhile
        raise RetriableSinkError("down")

    sink, after = ScriptedSink("down", script), RecordingSink("after")
    fanout = make_fanout([SinkRunner(sink, fast("block")), SinkRunner(after, fast())], dlq, stop)
    batch = batch_of(2)
    with pytest.raises(LeaseLostError) as lost:
        fanout.deliver(batch, owns=owned.is_set)
    assert len(sink.calls) == 3 and after.written == []
    assert lost.value.undelivered == batch.events
    assert list(dlq.list()) == []  # read again by the new owner, not dead-lettered

    class DownFlush(RecordingSink):
        flushes = 0

        def flush(self):
            self.flushes += 1
            if self.flushes == 2:
                owned.clear()
            raise RetriableSinkError("down")

    owned.set()
    flushing = DownFlush("flushing")
    fanout = make_fanout([SinkRunner(flushing, fast("block"))], dlq, stop)
    fanout.deliver(batch, owns=owned.is_set)
    with pytest.raises(LeaseLostError):
        fanout.flush(owns=owned.is_set)
    assert flushing.flushes == 2


def test_stop_event_from_another_thread_aborts_a_blocked_delivery(dlq, stop):
    def script(sink, b, call_no):
        raise RetriableSinkError("down")

    sink = ScriptedSink("down", script)
    fanout = make_fanout([SinkRunner(sink, fast("block"))], dlq, stop)
    timer = threading.Timer(0.1, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(DeliveryAborted):
        fanout.deliver(batch_of(2))
    assert time.monotonic() - started < 2.0
    assert len(sink.calls) > 1
    assert list(dlq.list()) == []


def test_unexpected_exception_from_write_is_retried_not_dropped(dlq, stop):
    def script(sink, b, call_no):
        if call_no <= 2:
            raise ValueError("plugin bug")
        sink.delivered.extend(b.events)

    sink = ScriptedSink("plugin", script)
    runner = SinkRunner(sink, fast())
    batch = batch_of(3)
    make_fanout([runner], dlq, stop).deliver(batch)
    assert sink.delivered == list(batch.events)
    assert len(sink.calls) == 3
    assert runner.stats.retries == 2
    assert list(dlq.list()) == []


def test_unexpected_exception_from_write_under_dead_letter_policy_keeps_the_error_text(dlq, stop):
    def script(sink, b, call_no):
        raise ValueError("plugin bug 42")

    sink = ScriptedSink("plugin", script)
    make_fanout([SinkRunner(sink, fast("dead_letter", budget=0.03))], dlq, stop).deliver(batch_of(1))
    [entry] = list(dlq.list())
    assert "plugin bug 42" in entry.error and "ValueError" in entry.error


def test_unexpected_exception_from_flush_is_retried(dlq, stop):
    class FlakyFlush(RecordingSink):
        def __init__(self):
            super().__init__("flaky-flush")
            self.flush_calls = 0

        def flush(self):
            self.flush_calls += 1
            if self.flush_calls <= 2:
                raise ConnectionError("connection reset")
            super().flush()

    sink = FlakyFlush()
    fanout = make_fanout([SinkRunner(sink, fast())], dlq, stop)
    batch = batch_of(2)
    fanout.deliver(batch)
    fanout.flush()
    assert sink.flush_calls == 3
    assert seqs(sink.flushed) == seqs(batch.events)


def test_retriable_error_from_flush_is_retried(dlq, stop):
    class FlakyFlush(RecordingSink):
        def __init__(self):
            super().__init__("flaky-flush")
            self.flush_calls = 0

        def flush(self):
            self.flush_calls += 1
            if self.flush_calls <= 2:
                raise RetriableSinkError("503")
            super().flush()

    sink = FlakyFlush()
    runner = SinkRunner(sink, fast())
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch_of(2))
    fanout.flush()
    assert sink.flush_calls == 3
    assert len(sink.flushed) == 2
    assert runner.stats.retries == 2


def test_non_thread_safe_sink_is_never_called_concurrently(dlq, stop):
    class OverlapDetector(Sink):
        def __init__(self):
            super().__init__("detector")
            self.active = 0
            self.max_active = 0
            self.overlaps = 0
            self.seen: list[str] = []
            self.counter_lock = threading.Lock()

        def write(self, batch):
            with self.counter_lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                if self.active > 1:
                    self.overlaps += 1
            time.sleep(0.002)  # widen the window
            self.seen.extend(seqs(batch.events))
            with self.counter_lock:
                self.active -= 1

        def flush(self):
            self.write(Batch(table="t", stream_arn="a", shard_id="s", events=(), checkpoint_sequence_number=None))

    sink = OverlapDetector()
    assert not getattr(sink, "thread_safe", False)
    fanout = make_fanout([SinkRunner(sink, fast())], dlq, stop)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def shard_thread(t: int) -> None:
        try:
            barrier.wait()
            for j in range(10):
                fanout.deliver(batch_of(2, start=t * 1000 + j * 2 + 1, shard_id=f"shardId-{t}"))
                if j % 3 == 0:
                    fanout.flush()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=shard_thread, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert errors == []
    assert sink.overlaps == 0 and sink.max_active == 1
    assert len(sink.seen) == 4 * 10 * 2
    assert len(set(sink.seen)) == 80


def test_thread_safe_sink_is_called_concurrently(dlq, stop):
    """The counterpart: the overlap detector above can see overlaps (so its assertion means something)."""

    class ThreadSafeDetector(Sink):
        thread_safe = True

        def __init__(self):
            super().__init__("ts")
            self.active = 0
            self.max_active = 0
            self.lock = threading.Lock()

        def write(self, batch):
            with self.lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            time.sleep(0.01)
            with self.lock:
                self.active -= 1

    sink = ThreadSafeDetector()
    fanout = make_fanout([SinkRunner(sink, fast())], dlq, stop)
    barrier = threading.Barrier(4)

    def shard_thread(t: int) -> None:
        barrier.wait()
        for j in range(5):
            fanout.deliver(batch_of(1, start=t * 100 + j + 1, shard_id=f"shardId-{t}"))

    threads = [threading.Thread(target=shard_thread, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sink.max_active > 1


def test_empty_batch_calls_no_sink(dlq, stop):
    def script(sink, b, call_no):  # pragma: no cover - must not be called
        raise AssertionError("called")

    sink = ScriptedSink("x", script)
    make_fanout([SinkRunner(sink, fast())], dlq, stop).deliver(
        Batch(table="t", stream_arn="a", shard_id="s", events=(), checkpoint_sequence_number="1"))
    assert sink.calls == []


def test_stall_and_retries_are_visible_in_metrics(tmp_path):
    """on_failure: block — the stall shows in ddb_cdc_sink_stalled_seconds and retries in a counter."""
    from prometheus_client import REGISTRY

    from pipeline import metrics  # noqa: F401  (registers the metrics)
    from pipeline.deadletter import DirectoryDeadLetterQueue
    from pipeline.errors import RetriableSinkError
    from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
    from pipeline.testing import RecordingSink, sample_batch
    import structlog
    import threading

    sink = RecordingSink("metrics-probe")
    sink.fail_next = [RetriableSinkError("down")] * 3
    fan = FanOut([SinkRunner(sink, FailurePolicy(initial_backoff_s=0.01, max_backoff_s=0.02))],
                 DirectoryDeadLetterQueue(tmp_path), stop_event=threading.Event(), logger=structlog.get_logger())
    batch = sample_batch()
    before = REGISTRY.get_sample_value("ddb_cdc_sink_retries_total", {"sink": "metrics-probe"}) or 0
    fan.deliver(batch)
    assert REGISTRY.get_sample_value("ddb_cdc_sink_retries_total", {"sink": "metrics-probe"}) - before == 3
    assert REGISTRY.get_sample_value("ddb_cdc_sink_stalled_seconds",
                                     {"sink": "metrics-probe", "shard": batch.shard_id}) == 0  # flowing again
    assert REGISTRY.get_sample_value("ddb_cdc_sink_events_delivered_total", {"sink": "metrics-probe"}) >= 3


# -- flush failures: the rule in pipeline/sink.py (issue 13, items 4 and 11) --------------------


class BufferingSink(RecordingSink):
    """A buffering sink: ``flush_errors`` are raised by the next flush calls (keeping the buffer);
    ``discard_unflushed`` drops the buffer."""

    def __init__(self, name: str = "buffering"):
        super().__init__(name)
        self.flush_errors: list[BaseException] = []
        self.flush_calls = 0
        self.discards = 0

    def flush(self):
        self.flush_calls += 1
        if self.flush_errors:
            raise self.flush_errors.pop(0)
        super().flush()

    def discard_unflushed(self):
        with self._lock:
            self._pending.clear()
        self.discards += 1


def test_dead_letter_policy_abandons_a_failing_flush_and_dead_letters_every_unflushed_event(dlq, stop):
    sink = BufferingSink()
    runner = SinkRunner(sink, fast("dead_letter", budget=0.05))
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch_of(3, start=1))
    fanout.flush()  # durable: forgotten by the fan-out
    assert len(runner.unflushed) == 0
    fanout.deliver(batch_of(2, start=4))
    fanout.deliver(batch_of(2, start=6, shard_id="shardId-other"))
    sink.flush_errors = [RetriableSinkError("S3 503")] * 10_000
    fanout.flush()  # returns: the checkpoint may move

    entries = {(e.shard_id, e.sequence_number): e for e in dlq.list()}
    assert sorted(entries) == sorted([(SHARD, f"{i:021d}") for i in (4, 5)]
                                     + [("shardId-other", f"{i:021d}") for i in (6, 7)])
    assert all(e.sink == "buffering" and "S3 503" in e.error and "flush failed" in e.error for e in entries.values())
    assert all(e.attempts > 1 for e in entries.values())
    assert sink.discards == 1 and sink._pending == []
    assert len(runner.unflushed) == 0 and runner.stats.dead_lettered == 4
    # after the outage: new events are flushed, the dead-lettered ones are not flushed as well
    sink.flush_errors = []
    fanout.deliver(batch_of(1, start=8))
    fanout.flush()
    assert seqs(sink.flushed) == [f"{i:021d}" for i in (1, 2, 3, 8)]


def test_permanent_error_from_flush_dead_letters_unflushed_events_under_dead_letter_only(dlq, stop):
    sink = BufferingSink()
    fanout = make_fanout([SinkRunner(sink, fast("dead_letter"))], dlq, stop)
    fanout.deliver(batch_of(2))
    sink.flush_errors = [PermanentSinkError("KMS key disabled")]
    fanout.flush()
    assert sink.flush_calls == 1  # not retried
    assert sorted(e.sequence_number for e in dlq.list()) == seqs(batch_of(2).events)
    assert "flush refused" in next(iter(dlq.list())).error

    blocked = BufferingSink("blocked")
    blocked.flush_errors = [PermanentSinkError("KMS key disabled")]
    fanout = make_fanout([SinkRunner(blocked, fast("block"))], dlq, stop)
    fanout.deliver(batch_of(1, start=9))
    with pytest.raises(FatalSinkError, match="cannot flush"):
        fanout.flush()
    assert blocked.discards == 0


@pytest.mark.parametrize("policy", ["block", "dead_letter"])
def test_the_record_of_unflushed_events_ends_with_each_successful_flush(dlq, stop, policy):
    """Every policy keeps the events given since the last successful flush (a partial flush
    re-sends the later ones of a shard from it); a successful flush forgets them."""
    runner = SinkRunner(RecordingSink(), fast(policy))
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch_of(5))
    assert len(runner.unflushed) == 5
    fanout.flush()
    assert len(runner.unflushed) == 0


def test_events_dead_lettered_by_write_are_not_dead_lettered_again_by_a_failed_flush(dlq, stop):
    batch = batch_of(3)
    bad = batch.events[1]

    class Picky(BufferingSink):
        def write(self, b):
            super().write(replace(b, events=tuple(e for e in b.events if e is not bad)))
            if any(e is bad for e in b.events):
                raise PartialSinkError("1 refused", permanent=[(bad, "mapper_parsing_exception")])

    sink = Picky()
    fanout = make_fanout([SinkRunner(sink, fast("dead_letter", budget=0.02))], dlq, stop)
    fanout.deliver(batch)
    sink.flush_errors = [RetriableSinkError("down")] * 10_000
    fanout.flush()
    errors = {e.sequence_number: e.error for e in dlq.list()}
    assert sorted(errors) == seqs(batch.events)
    assert "mapper_parsing_exception" in errors[bad.sequence_number]  # its own entry, not overwritten
    assert all("flush failed" in errors[e.sequence_number] for e in batch.events if e is not bad)


def test_shutdown_during_flush_retries_aborts_and_dead_letters_nothing(dlq, stop):
    class StopOnFlush(BufferingSink):
        def flush(self):
            stop.set()
            raise RetriableSinkError("down")

    sink = StopOnFlush()
    runner = SinkRunner(sink, fast("dead_letter", budget=300))
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch_of(2))
    with pytest.raises(DeliveryAborted):
        fanout.flush()
    assert list(dlq.list()) == [] and sink.discards == 0 and len(runner.unflushed) == 2


def test_a_write_during_a_flush_of_a_thread_safe_sink_is_not_forgotten_by_that_flush(dlq, stop):
    """The flush forgets only events accepted before it started; an event a concurrent write
    gave the sink while the flush was uploading stays recorded (and is dead-lettered if the next
    flush fails)."""
    in_flush, release = threading.Event(), threading.Event()

    class SlowFlush(BufferingSink):
        def flush(self):
            if self.flush_calls == 0:
                with self._lock:
                    snapshot = list(self._pending)
                    self._pending.clear()
                self.flush_calls += 1
                in_flush.set()
                release.wait(5)
                self.flushed.extend(snapshot)  # uploads what it had when it started
                return
            super().flush()

    sink = SlowFlush()
    runner = SinkRunner(sink, fast("dead_letter", budget=0.02))
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch_of(1, start=1))
    flusher = threading.Thread(target=fanout.flush)
    flusher.start()
    assert in_flush.wait(5)
    fanout.deliver(batch_of(1, start=2))  # thread-safe sink: runs while the flush is in progress
    release.set()
    flusher.join(5)
    assert [e.sequence_number for e in runner.unflushed.snapshot()[1]] == [f"{2:021d}"]
    sink.flush_errors = [RetriableSinkError("down")] * 10_000
    fanout.flush()
    assert [e.sequence_number for e in dlq.list()] == [f"{2:021d}"]


def test_discard_waits_for_a_write_in_progress_and_holds_new_calls_back(dlq, stop):
    """SinkRunner.exclusive: the dead-lettering + discard step of an abandoned flush never runs
    while a write of a thread-safe sink is in progress, so no event can be put into the buffer
    after the snapshot and then dropped with it."""
    in_write, release = threading.Event(), threading.Event()

    class SlowWrite(BufferingSink):
        def write(self, b):
            if b.events[0].sequence_number == f"{2:021d}":
                in_write.set()
                release.wait(5)
            super().write(b)

    sink = SlowWrite()
    runner = SinkRunner(sink, fast("dead_letter", budget=0.02))
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch_of(1, start=1))
    writer = threading.Thread(target=fanout.deliver, args=(batch_of(1, start=2),))
    writer.start()
    assert in_write.wait(5)
    sink.flush_errors = [RetriableSinkError("down")] * 10_000
    flusher = threading.Thread(target=fanout.flush)
    flusher.start()
    wait_for(lambda: runner._exclusive == 1, "the abandonment waits for the write in progress")
    assert sink.discards == 0 and list(dlq.list()) == []
    release.set()
    writer.join(5)
    flusher.join(5)
    assert not flusher.is_alive() and sink.discards == 1
    # the slow write finished before the snapshot: both events are dead-lettered, none is lost
    assert sorted(e.sequence_number for e in dlq.list()) == [f"{1:021d}", f"{2:021d}"]


def wait_for(predicate, what: str, timeout: float = 5.0) -> None:
    from tests.helpers import wait_until

    wait_until(predicate, what, timeout=timeout, interval=0.005)


# -- a partial or abandoned flush writes nothing of a shard this worker no longer owns ----------


class DropsFirstEventOf(BufferingSink):
    """A buffering sink whose first flush drops the first buffered event of ``shard_id`` and names
    it retriable (making everything else durable)."""

    def __init__(self, shard_id: str):
        super().__init__()
        self.victim_shard = shard_id
        self.failed_once = False

    def flush(self):
        with self._lock:
            victims = [e for e in self._pending if e.source.shard_id == self.victim_shard]
            if victims and not self.failed_once:
                self.failed_once = True
                self.flushed.extend(e for e in self._pending if e is not victims[0])
                self._pending.clear()
                raise PartialSinkError("1 dropped", retriable=[(victims[0], "throttled")])
        super().flush()


def test_a_partial_flush_does_not_rewrite_events_of_a_shard_whose_lease_was_lost(dlq, stop):
    """Without lanes: shard X's reader flushes the sink, which drops an event of shard Y; Y's
    lease was lost meanwhile. Y's event (and its later ones) is left out — the new owner reads it
    again from Y's checkpoint — not written under X's ownership."""
    sink = DropsFirstEventOf("shardId-Y")
    runner = SinkRunner(sink, fast())
    fanout = make_fanout([runner], dlq, stop)
    y_owned = threading.Event()
    y_owned.set()
    fanout.deliver(batch_of(2, start=1, shard_id="shardId-Y"), owns=y_owned.is_set)
    fanout.deliver(batch_of(2, start=3, shard_id="shardId-X"), owns=lambda: True)
    y_owned.clear()  # Y's lease is lost
    fanout.flush(owns=lambda: True)  # X's checkpoint flush
    assert [e.source.shard_id for e in sink.written] == ["shardId-Y"] * 2 + ["shardId-X"] * 2
    assert list(dlq.list()) == [] and len(runner.unflushed) == 0


def test_a_partial_flush_still_rewrites_an_owned_shard_in_order(dlq, stop):
    """The other side of the rule: Y still owned → its dropped event and every later one of Y are
    written again, under Y's own ownership check."""
    sink = DropsFirstEventOf("shardId-Y")
    fanout = make_fanout([SinkRunner(sink, fast())], dlq, stop)
    fanout.deliver(batch_of(2, start=1, shard_id="shardId-Y"), owns=lambda: True)
    fanout.deliver(batch_of(1, start=3, shard_id="shardId-X"), owns=lambda: True)
    fanout.flush(owns=lambda: True)
    assert seqs(sink.written[3:]) == [f"{i:021d}" for i in (1, 2)]
    assert sorted(set(seqs(sink.flushed))) == [f"{i:021d}" for i in (1, 2, 3)]


def test_reset_shard_forgets_the_shards_unflushed_events_so_an_abandoned_flush_skips_them(dlq, stop):
    """A forward checkpoint move (a new reader, reset_shard) skips shard Y's events after the old
    position; a later abandoned flush (``on_failure: dead_letter``) must not dead-letter them (a
    redrive would write back what the operator skipped)."""
    sink = BufferingSink()
    runner = SinkRunner(sink, fast("dead_letter", budget=0.02))
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch_of(2, start=1, shard_id="shardId-Y"))
    fanout.deliver(batch_of(1, start=3, shard_id="shardId-X"))
    fanout.reset_shard("demo-table", "shardId-Y")
    assert [e.source.shard_id for e in runner.unflushed.snapshot()[1]] == ["shardId-X"]
    sink.flush_errors = [RetriableSinkError("down")] * 10_000
    fanout.flush()
    assert [(e.shard_id, e.sequence_number) for e in dlq.list()] == [("shardId-X", f"{3:021d}")]
    assert runner.stats.dead_lettered == 1


def test_an_abandoned_flush_does_not_dead_letter_events_of_a_shard_whose_lease_was_lost(dlq, stop):
    sink = BufferingSink()
    runner = SinkRunner(sink, fast("dead_letter", budget=0.02))
    fanout = make_fanout([runner], dlq, stop)
    y_owned = threading.Event()
    y_owned.set()
    fanout.deliver(batch_of(2, start=1, shard_id="shardId-Y"), owns=y_owned.is_set)
    fanout.deliver(batch_of(1, start=3, shard_id="shardId-X"), owns=lambda: True)
    y_owned.clear()
    sink.flush_errors = [RetriableSinkError("down")] * 10_000
    fanout.flush(owns=lambda: True)
    assert [(e.shard_id, e.sequence_number) for e in dlq.list()] == [("shardId-X", f"{3:021d}")]
    assert sink.discards == 1 and len(runner.unflushed) == 0


def test_events_dead_lettered_when_the_write_budget_ran_out_are_not_counted_again_by_an_abandoned_flush(dlq, stop):
    """``dead_letter``: a partial write names event 1 retriable; events 2, 3 the sink took are
    re-sent with it; the budget runs out and all three are dead-lettered. The abandoned flush that
    follows must not dead-letter (and count) 2 and 3 a second time."""
    batch = batch_of(3)
    first = batch.events[0]

    class RefusesTheFirst(BufferingSink):
        def write(self, b):
            super().write(replace(b, events=tuple(e for e in b.events if e.sequence_number != first.sequence_number)))
            if any(e.sequence_number == first.sequence_number for e in b.events):
                raise PartialSinkError("1 throttled", retriable=[(first, "429")])

    sink = RefusesTheFirst()
    runner = SinkRunner(sink, fast("dead_letter", budget=0.02))
    fanout = make_fanout([runner], dlq, stop)
    fanout.deliver(batch)
    assert sorted(e.sequence_number for e in dlq.list()) == seqs(batch.events)
    assert runner.stats.dead_lettered == 3
    sink.flush_errors = [RetriableSinkError("down")] * 10_000
    fanout.flush()
    assert sorted(e.sequence_number for e in dlq.list()) == seqs(batch.events)
    assert runner.stats.dead_lettered == 3 and sink.discards == 1


def test_a_rewrite_whose_shard_loses_its_lease_during_retries_ends_and_the_flush_goes_on(dlq, stop):
    """Y is owned when the partial flush names its event, then its lease is lost while the re-write
    is retried (``block``): the re-write of Y ends (nothing more of Y written), and the flush asked
    for by X goes on and succeeds — it does not end with Y's LeaseLostError."""
    y_owned = threading.Event()
    y_owned.set()

    class DownForY(DropsFirstEventOf):
        rewrites = 0

        def write(self, b):
            if self.failed_once and b.shard_id == "shardId-Y":
                self.rewrites += 1
                y_owned.clear()  # the lease is lost while the re-write is retried
                if self.rewrites > 20:  # the old code retried it for ever under X's ownership
                    raise FatalSinkError("Y re-written after its lease was lost")
                raise RetriableSinkError("throttled")
            super().write(b)

    sink = DownForY("shardId-Y")
    fanout = make_fanout([SinkRunner(sink, fast())], dlq, stop)
    fanout.deliver(batch_of(1, start=1, shard_id="shardId-Y"), owns=y_owned.is_set)
    fanout.deliver(batch_of(1, start=2, shard_id="shardId-X"), owns=lambda: True)
    fanout.flush(owns=lambda: True)
    assert sink.rewrites == 1
    assert [(e.source.shard_id, e.sequence_number) for e in sink.flushed] == [("shardId-X", f"{2:021d}")]
    assert list(dlq.list()) == []
