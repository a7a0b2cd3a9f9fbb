"""Per-sink lanes (issue 15): each sink receives each shard's batches through its own bounded buffer.

Without lanes the fan-out gives a batch to the sinks one after another and the shard's next batch
waits until every sink returned, so every sink's latency is the slowest sink's. With lanes:

- a shard reader (:class:`~pipeline.runtime.shard_consumer.ShardConsumer`) puts each decoded batch
  into one **lane per sink** (:meth:`ShardLanes.put`) and goes on reading; the same batch object is
  shared by the lanes (references, not copies);
- one **sink thread per sink** (:class:`SinkLane`) takes batches from that sink's lanes — round
  robin over the shards, in sequence order within a shard — and writes them through the fan-out's
  rules (:meth:`pipeline.runtime.fanout.FanOut.deliver_to`: retries, dead-lettering, ``on_failure``).
  Consecutive batches of one shard waiting in a lane are merged into one write of at most
  :data:`COALESCE_MAX_RECORDS` events, so a sink that fell behind catches up with larger requests;
- a lane is **bounded** by records and by bytes (``sinks[].lane_max_records`` /
  ``sinks[].lane_max_bytes``, :class:`LaneSettings`; bytes are the DynamoDB ``SizeBytes`` of the
  events). When a lane is full the shard's reader waits (**backpressure**) — it holds no share of the
  read budget meanwhile — so a slow sink fills only its own lanes and the memory stays bounded. An
  empty lane accepts any one batch, so a page larger than the bound cannot dead-lock the shard;
- each sink thread **flushes** its sink when a shard asks for a checkpoint (every
  ``source.checkpoint_interval_s``) or a shard drains (:meth:`ShardLanes.drain`); a lane's
  *durable* position is the last batch written before a flush that succeeded;
- the **checkpoint** of a shard is the lowest position every sink made durable
  (:meth:`ShardLanes.durable_position`): it never passes an event some sink has not flushed (or
  dead-lettered). At SHARD_END, at the end of a replay window, before a checkpoint move and at
  shutdown the reader waits until every lane is written and flushed (:meth:`ShardLanes.drain`).

Failures keep their per-sink meaning: ``block`` retries hold only that sink's lane (the others
deliver on until the blocked lane is full, then the reader waits), and so hold the checkpoint.
A :class:`~pipeline.errors.FatalSinkError` or a :class:`~pipeline.runtime.fanout.DeliveryAborted`
(shutdown during retries, or a sink fenced off after the grace period) stops that lane; the
shard's reader raises it at its next put, drain or checkpoint, so nothing past the durable
position is checkpointed. A write or flush retried while the shard's lease is lost (or after its
reader detached) ends with :class:`~pipeline.errors.LeaseLostError` (the reader's ownership check,
:meth:`Lanes.attach`), so a blocked sink's thread does not go on retrying — and later writing —
a shard another worker reads now; it goes on with the other shards' lanes.

Memory bound, combined with ``worker.max_pages_in_flight`` (:mod:`pipeline.runtime.read_budget`):
a page keeps its share of the read budget from GetRecords until *every* sink has written it (or
the lanes dropped it: :class:`_Item`), so across the process at most ``max_pages_in_flight ×
max_records_per_call`` records are fetched and not yet delivered to every sink, whatever the lanes
hold. The lane bounds apply per shard on top of it: at most ``max(lane_max_records)`` records /
``max(lane_max_bytes)`` bytes (plus one batch, see above) — lanes share the batch objects, so a
shard's lanes cost what its slowest sink's lane holds. Whichever bound is reached first makes the
readers wait; with the defaults it is the read budget (``max_pages_in_flight`` 0 = unbounded
leaves only the lanes).

A new reader of a shard (:meth:`Lanes.attach`) drops what the previous reader of that shard left
in the lanes (:meth:`ShardLanes.detach`), and each sink thread calls the sink's ``reset_shard``
before the first batch of the new reader — in the sink's own thread, so never during a write. A
reader that ends (lease lost, SHARD_END, shutdown) detaches too, and each sink thread calls
``reset_shard`` for that shard before its next call (a shutdown may fence the sinks first; after a
clean end nothing is left to drop anyway). Every flush first resets the detached shards and those
whose lease is already lost, so a flush asked for by another shard does not make a lost shard's
buffered events durable; an upload already running when the loss is noticed still completes.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

from pipeline import metrics
from pipeline.errors import LeaseLostError
from pipeline.events import Batch
from pipeline.runtime.fanout import DeliveryAborted, FanOut, SinkFenced, SinkRunner

#: default ``sinks[].lane_max_records``: records waiting in one sink's lane of one shard
DEFAULT_LANE_MAX_RECORDS = 10_000
#: default ``sinks[].lane_max_bytes``: bytes (sum of the events' SizeBytes) in one lane
DEFAULT_LANE_MAX_BYTES = 16 * 1024 * 1024
#: at most this many events of one shard go into one merged ``write`` (a sink that fell behind)
COALESCE_MAX_RECORDS = 1000
#: waits re-check lease ownership and stop this often (s)
_POLL_S = 0.5


@dataclass(frozen=True)
class LaneSettings:
    """Bounds of one sink's lane of one shard: ``max_records`` (≥ 1) and ``max_bytes`` (≥ 1, the
    sum of the events' DynamoDB ``SizeBytes``). A lane holding anything accepts a batch only if
    both stay within bounds; an empty lane accepts any one batch."""

    max_records: int = DEFAULT_LANE_MAX_RECORDS
    max_bytes: int = DEFAULT_LANE_MAX_BYTES
    #: consecutive waiting batches of one shard merged into one write, up to this many events
    #: (1: every batch is written as it was read)
    coalesce_max_records: int = COALESCE_MAX_RECORDS


class _Item:
    """One batch in the lanes of a shard; ``lanes_left`` lanes still have to write it (guarded by
    the :class:`Lanes` lock); its read-budget ``share`` is given back when that reaches 0."""

    __slots__ = ("serial", "batch", "records", "nbytes", "created", "put_at", "share", "lanes_left")

    def __init__(self, serial: int, batch: Batch, records: int, nbytes: int, created: float | None,
                 put_at: float, share: Any, lanes_left: int):
        self.serial = serial
        self.batch = batch
        self.records = records
        self.nbytes = nbytes
        self.created = created  # epoch s: creation time of the batch's oldest event (None: unknown)
        self.put_at = put_at  # epoch s: when the reader put it into the lanes
        self.share = share  # a read_budget.Reservation (or None)
        self.lanes_left = lanes_left

    def done_in_one_lane(self) -> Any:
        """One lane is done with the item (lock held); returns the share to release, if now due."""
        self.lanes_left -= 1
        if self.lanes_left <= 0 and self.share is not None:
            share, self.share = self.share, None
            return share
        return None


def batch_bytes(batch: Batch) -> int:
    """Bytes a batch counts for in a lane: the sum of its events' ``source.size_bytes``
    (DynamoDB ``StreamRecord.SizeBytes`` — DynamoDB Streams API reference, StreamRecord)."""
    total = 0
    for event in batch.events:
        total += int(getattr(event.source, "size_bytes", 0) or 0)
    return total


def _oldest_created(batch: Batch) -> float | None:
    for event in batch.events:
        created = event.source.approximate_creation_time
        if created is not None:
            return created.timestamp()
    return None


class Lane:
    """One sink's buffer for one shard reader. All fields are guarded by the :class:`Lanes` lock.

    Serial numbers count the reader's batches (1, 2, …): ``enqueued`` is the last one put,
    ``written`` the last one the sink took (written, or dead-lettered by the fan-out's rules),
    ``durable`` the last one written before a successful flush.
    """

    def __init__(self, sink: "SinkLane", shard: "ShardLanes"):
        self.sink = sink
        self.shard = shard
        self.items: collections.deque[_Item] = collections.deque()
        self.busy: list[_Item] = []  # being written right now
        self.records = 0  # records queued or being written
        self.nbytes = 0
        self.enqueued = 0
        self.written = 0
        self.durable = 0
        #: records put / written / made durable so far (for the lane's undurable count)
        self.put_records = 0
        self.written_records = 0
        self.durable_records = 0
        self.error: BaseException | None = None
        self.reset_pending = True  # the sink's reset_shard runs before this lane's first write
        self.closed = False

    def owns(self) -> bool:
        """The ownership check of the lane's writes and flushes (FanOut ``owns``): False once the
        reader detached the lane or its shard's lease was lost (read without the lock: a stale
        answer only delays the stop to the next check)."""
        return not self.closed and self.shard.owns()

    def has_room(self, records: int, nbytes: int) -> bool:
        if self.records == 0:
            return True
        limits = self.sink.settings
        return self.records + records <= limits.max_records and self.nbytes + nbytes <= limits.max_bytes

    def oldest_created(self) -> float | None:
        """Creation time (epoch s) of the oldest change in the lane not yet written."""
        for item in (*self.busy, *self.items):
            if item.created is not None:
                return item.created
            return item.put_at
        return None


@dataclass(frozen=True)
class LaneStatus:
    """One lane as metrics and status show it: ``age_s`` (now − creation time of the oldest change
    not yet written to the sink; 0 when empty), ``records`` / ``bytes`` waiting (queued or being
    written), ``undurable_records`` (put but not flushed yet), ``durable_position`` (sequence
    number of the last change the sink made durable; None before the first), and ``error``."""

    sink: str
    table: str
    shard_id: str
    age_s: float
    records: int
    bytes: int
    undurable_records: int
    durable_position: str | None
    error: str | None


class SinkLane(threading.Thread):
    """The thread that feeds one sink from its lanes (see the module doc)."""

    def __init__(self, lanes: "Lanes", runner: SinkRunner, settings: LaneSettings):
        super().__init__(name=f"sink-{runner.name}", daemon=True)
        self.lanes = lanes
        self.runner = runner
        self.settings = settings
        self.cond = threading.Condition(lanes.lock)
        self.members: list[Lane] = []
        self.flush_requested = False
        self.stopping = False
        #: (table, shard_id) of detached shards whose ``reset_shard`` this sink thread owes
        self.resets: list[tuple[str, str]] = []
        self._next = 0

    # -- thread --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave the lanes waiting forever
            with self.cond:
                for lane in self.members:
                    if lane.error is None:
                        lane.error = exc
                    lane.shard.cond.notify_all()
            raise

    def _loop(self) -> None:
        while True:
            with self.cond:
                work = None
                while True:
                    if self.stopping:
                        return
                    resets, self.resets = self.resets, []
                    if resets:
                        break
                    work = self._take()
                    if work is not None or self._flush_due():
                        break
                    self.cond.wait(_POLL_S)
            for table, shard_id in resets:
                # a detached shard: the sink drops what it still buffers of it before any later
                # flush (of another shard) could make it durable after the lease was lost
                self._reset(table, shard_id)
            if work is not None:
                self._write(*work)
            if self._flush_due():
                self._flush()

    def _take(self) -> tuple[Lane, list[_Item], bool] | None:
        """The next lane with work (round robin), its items to write and whether a reset is due
        first (lock held)."""
        count = len(self.members)
        for step in range(count):
            lane = self.members[(self._next + step) % count]
            if lane.closed or lane.error is not None or lane.busy:
                continue
            if not lane.items and not lane.reset_pending:
                continue
            self._next = (self._next + step + 1) % max(1, count)
            items: list[_Item] = []
            records = 0
            cap = self.settings.coalesce_max_records
            while lane.items and (not items or records + lane.items[0].records <= cap):
                item = lane.items.popleft()
                items.append(item)
                records += item.records
            lane.busy = items
            reset, lane.reset_pending = lane.reset_pending, False
            return lane, items, reset
        return None

    def _reset(self, table: str, shard_id: str) -> None:
        """The sink's ``reset_shard`` for a detached shard (its failures are logged by reset_one)."""
        try:
            self.lanes.fanout.reset_one(self.runner, table, shard_id)
        except DeliveryAborted:
            pass  # fenced by the shutdown: no further sink call, nothing is flushed any more

    def _write(self, lane: Lane, items: list[_Item], reset: bool) -> None:
        shard = lane.shard
        error: BaseException | None = None
        try:
            if reset:
                self.lanes.fanout.reset_one(self.runner, shard.table, shard.shard_id)
            events = [ev for item in items for ev in item.batch.events]
            if events:
                last = items[-1].batch
                batch = last if len(items) == 1 else replace(last, events=tuple(events))
                self.lanes.fanout.deliver_to(self.runner, batch, owns=lane.owns)
        except BaseException as exc:  # noqa: BLE001 - handed to the shard's reader, which raises it
            error = exc
        shares = []
        with self.cond:
            lane.busy = []
            for item in items:
                share = item.done_in_one_lane()
                if share is not None:
                    shares.append(share)
                    shard._held.discard(item)
            if error is not None:
                lane.error = error  # the lane stops here: its reader raises it and does not checkpoint
            elif items:
                lane.written = items[-1].serial
                lane.written_records += sum(item.records for item in items)
            lane.records -= sum(item.records for item in items)
            lane.nbytes -= sum(item.nbytes for item in items)
            shard.cond.notify_all()
        for share in shares:
            share.release()  # written to every sink: the page's share of the read budget is free

    def _flush_due(self) -> bool:
        """A flush was asked for and some lane has written batches not flushed yet (lock held or not:
        a racy read only delays the flush to the next pass)."""
        return self.flush_requested and any(
            lane.written > lane.durable for lane in self.members if not lane.closed and lane.error is None)

    def _flush(self) -> None:
        with self.cond:
            self.flush_requested = False
            # first the resets owed to detached shards, and to shards whose lease is already lost
            # while their reader has not detached yet: a flush asked for by another shard must not
            # make what the sink buffers of them durable after the loss
            resets, self.resets = self.resets, []
            resets += [(lane.shard.table, lane.shard.shard_id) for lane in self.members
                       if not lane.closed and not lane.shard.owns()]
            snapshot = [(lane, lane.written, lane.written_records) for lane in self.members
                        if not lane.closed and lane.error is None and lane.written > lane.durable]
        for table, shard_id in dict.fromkeys(resets):
            self._reset(table, shard_id)
        if not snapshot:
            return
        lanes = [lane for lane, _, _ in snapshot]
        # retried while any shard it flushes for is still owned here; what a partial flush writes
        # again is retried per shard under that shard's own check (the one its lane wrote it under)
        try:
            self.lanes.fanout.flush_one(self.runner, owns=lambda: any(lane.owns() for lane in lanes))
        except BaseException as exc:  # noqa: BLE001 - every lane of this sink stops with it
            with self.cond:
                # lease loss stops only the lanes flushed for (none of them owned any more)
                for lane in (lanes if isinstance(exc, LeaseLostError) else self.members):
                    if lane.error is None:
                        lane.error = exc
                    lane.shard.cond.notify_all()
            return
        with self.cond:
            for lane, written, written_records in snapshot:
                if written > lane.durable:
                    lane.durable, lane.durable_records = written, written_records
                lane.shard.cond.notify_all()

    # -- called by readers (lock held) -----------------------------------------------------------

    def request_flush(self) -> None:
        self.flush_requested = True
        self.cond.notify_all()


class ShardLanes:
    """One shard reader's lanes, one per sink (made by :meth:`Lanes.attach`)."""

    def __init__(self, lanes: "Lanes", table: str, shard_id: str, owns: Callable[[], bool] | None = None):
        self.lanes = lanes
        self.table = table
        self.shard_id = shard_id
        #: the reader's ownership check (True while it holds the shard's lease); see Lanes.attach
        self.owns: Callable[[], bool] = owns if owns is not None else (lambda: True)
        self.cond = threading.Condition(lanes.lock)
        self.members: list[Lane] = []
        self.serial = 0
        self._positions: collections.deque[tuple[int, str]] = collections.deque()
        self._durable: str | None = None
        self._durable_serial = 0
        self._held: set[_Item] = set()  # items whose read-budget share is not given back yet
        self._detached = False

    def put(self, batch: Batch, position: str | None, *, abandon: Callable[[], bool] = lambda: False,
            share: Any = None, tick: Callable[[], Any] | None = None) -> None:
        """Give ``batch`` (one shard's events in sequence order; it may be empty — it then only
        carries ``position``) to every sink's lane, waiting while any lane is full.

        ``position``: the sequence number a checkpoint may name once every sink made this batch
        durable (None: the batch adds no position). Raises the error that stopped a lane
        (:class:`~pipeline.errors.FatalSinkError`, :class:`~pipeline.runtime.fanout.DeliveryAborted`,
        …), or LeaseLostError when ``abandon()`` (polled every 0.5 s while waiting) turns true.
        ``share`` (a :class:`~pipeline.runtime.read_budget.Reservation`, or None) passes to the
        lanes with the batch: it is released once every sink has written the batch (or the lanes
        were detached) — so ``worker.max_pages_in_flight`` keeps bounding what was fetched and is
        not yet delivered to every sink. If this raises, the caller still owns ``share``.
        ``tick()`` is called (outside the lock) every 0.5 s while waiting — the reader checkpoints
        what the sinks made durable meanwhile; what it raises ends the wait.
        """
        records = len(batch.events)
        nbytes = batch_bytes(batch)
        created = _oldest_created(batch)
        waited = None
        while True:
            with self.cond:
                self._raise_errors()
                if all(lane.has_room(records, nbytes) for lane in self.members):
                    self._enqueue(batch, position, share, records, nbytes, created)
                    break
                if waited is None:
                    waited = time.monotonic()
                self.cond.wait(_POLL_S)
            if abandon():
                raise LeaseLostError(f"shard {self.shard_id}: the lease was lost while a sink's lane was full")
            if tick is not None:
                tick()
        if waited is not None:
            metrics.LANE_WAIT_SECONDS.labels(table=self.table, shard=self.shard_id).inc(time.monotonic() - waited)

    def _enqueue(self, batch: Batch, position: str | None, share: Any, records: int, nbytes: int,
                 created: float | None) -> None:
        """Append the batch to every lane (lock held)."""
        self.serial += 1
        item = _Item(self.serial, batch, records, nbytes, created, time.time(), share, len(self.members))
        if share is not None and not self.members:
            share.release()
        elif share is not None:
            self._held.add(item)
        for lane in self.members:
            lane.items.append(item)
            lane.records += records
            lane.put_records += records
            lane.nbytes += nbytes
            lane.enqueued = self.serial
            lane.sink.cond.notify_all()
        if position is not None:
            self._positions.append((self.serial, position))

    def check(self) -> None:
        """Raise the error that stopped one of these lanes, if any (as :meth:`put`)."""
        with self.cond:
            self._raise_errors()

    def request_flush(self) -> None:
        """Ask every sink with unflushed batches of this shard to flush soon (does not wait)."""
        with self.cond:
            for lane in self.members:
                if lane.written > lane.durable or lane.items or lane.busy:
                    lane.sink.request_flush()

    def durable_position(self) -> str | None:
        """The lowest position every sink made durable (the checkpoint this shard may write), or
        None before any. Raises the error that stopped a lane (as :meth:`put`)."""
        with self.cond:
            self._raise_errors()
            return self._durable_locked()

    def _durable_locked(self) -> str | None:
        low = min((lane.durable for lane in self.members), default=self.serial)
        while self._positions and self._positions[0][0] <= low:
            self._durable_serial, self._durable = self._positions.popleft()
        return self._durable

    def all_durable(self) -> bool:
        """True when every batch put so far is durable in every sink."""
        with self.cond:
            return all(lane.durable >= self.serial for lane in self.members)

    def drain(self, *, abandon: Callable[[], bool] = lambda: False) -> str | None:
        """Wait until every batch put so far is written to and flushed by every sink; returns the
        durable position (as :meth:`durable_position`). Raises the error that stopped a lane, or
        LeaseLostError when ``abandon()`` (polled every 0.5 s) turns true."""
        with self.cond:
            while True:
                self._raise_errors()
                pending = [lane for lane in self.members if lane.durable < self.serial]
                if not pending:
                    return self._durable_locked()
                for lane in pending:
                    if lane.written >= self.serial:
                        lane.sink.request_flush()
                self.cond.wait(_POLL_S)
                if abandon():
                    raise LeaseLostError(f"shard {self.shard_id}: the lease was lost while the lanes drained")

    def detach(self) -> None:
        """The reader ends: drop what its lanes still queue (a new reader reads it again from the
        checkpoint) and stop feeding them; each sink's runner forgets the shard's unflushed events
        (:meth:`~pipeline.runtime.fanout.UnflushedEvents.forget_shard`: no flush re-sends or
        dead-letters them here). A write in progress finishes in its sink thread (what it records
        is written under this reader's ownership check, now False, so no flush uses it either).
        Idempotent: a second call (the reader's own, after :meth:`Lanes.attach` detached it for
        a new reader) changes nothing — it must not forget the new reader's events."""
        with self.cond:
            if self._detached:
                return
            self._detached = True
            for lane in self.members:
                lane.sink.runner.unflushed.forget_shard(self.table, self.shard_id)
                # and the sink drops what it buffers of the shard, in its own thread, before any
                # later call: a flush for another shard must not make it durable after a lease loss
                lane.sink.resets.append((self.table, self.shard_id))
                lane.sink.cond.notify_all()
            shares = [item.share for item in self._held if item.share is not None]
            for item in self._held:
                item.share = None
            self._held.clear()
            for lane in self.members:
                lane.closed = True
                lane.items.clear()
                lane.records = sum(item.records for item in lane.busy)
                lane.nbytes = sum(item.nbytes for item in lane.busy)
                if lane in lane.sink.members:
                    lane.sink.members.remove(lane)
            self.lanes.shards.discard(self)
        for share in shares:
            share.release()

    def _raise_errors(self) -> None:
        """Raise what stopped a lane; :class:`SinkFenced` once shutdown fenced a sink off (a
        straggling reader then neither waits for the lanes nor checkpoints)."""
        for lane in self.members:
            if lane.error is not None:
                raise lane.error
        for lane in self.members:
            if lane.sink.runner.fenced:
                raise SinkFenced(f"sink {lane.sink.runner.name!r}: shutdown fenced the sinks off "
                                 "(grace period exceeded); nothing more of this shard is checkpointed")

    def status(self, now: float) -> list[LaneStatus]:
        """Each lane's :class:`LaneStatus` (takes the lock)."""
        with self.cond:
            self._durable_locked()
            out = []
            for lane in self.members:
                oldest = lane.oldest_created()
                out.append(LaneStatus(
                    sink=lane.sink.runner.name, table=self.table, shard_id=self.shard_id,
                    age_s=0.0 if oldest is None else max(0.0, now - oldest),
                    records=lane.records, bytes=lane.nbytes,
                    undurable_records=lane.put_records - lane.durable_records,
                    durable_position=self._position_at(lane.durable),
                    error=None if lane.error is None else f"{type(lane.error).__name__}: {lane.error}"[:300]))
            return out

    def _position_at(self, serial: int) -> str | None:
        """The position of the last batch at or before ``serial`` that carried one (lock held;
        ``serial`` ≥ the lowest durable serial, whose position is kept)."""
        best = self._durable
        for pos_serial, position in self._positions:
            if pos_serial > serial:
                break
            best = position
        return best


class Lanes:
    """Every sink's lanes of one worker process, and the sink threads that consume them.

    ``fanout`` delivers to and flushes one sink (its rules apply unchanged); ``settings`` maps a
    sink name to its :class:`LaneSettings` (default for names not in it). :meth:`start` starts one
    thread per sink (after the sinks are open); :meth:`stop` ends them (after the worker fenced the
    sinks: a thread inside a sink call ends when the call returns).
    """

    def __init__(self, fanout: FanOut, settings: dict[str, LaneSettings] | None = None):
        self.fanout = fanout
        self.lock = threading.Lock()
        settings = settings or {}
        self.sinks = [SinkLane(self, runner, settings.get(runner.name, LaneSettings())) for runner in fanout.runners]
        self.shards: set[ShardLanes] = set()
        self._started = False

    def start(self) -> None:
        """Start the sink threads (idempotent)."""
        if self._started:
            return
        self._started = True
        for sink in self.sinks:
            sink.start()

    def stop(self) -> None:
        """Tell the sink threads to end (they do not start another call); does not wait."""
        with self.lock:
            for sink in self.sinks:
                sink.stopping = True
                sink.cond.notify_all()

    def attach(self, table: str, shard_id: str, *, owns: Callable[[], bool] | None = None) -> ShardLanes:
        """New lanes for a new reader of ``(table, shard_id)``; the previous reader's lanes of that
        shard (if it did not detach) are detached first. Each sink's ``reset_shard`` runs in its
        sink thread before the new reader's first batch (see the module doc).

        ``owns``: the reader's ownership check (None: always owned). The sink threads pass it into
        the fan-out's retries (``FanOut.deliver_to`` / ``flush_one``): once it is False — or the lanes
        were detached — a write retried for ever under ``on_failure: block`` ends with
        LeaseLostError, nothing more of the shard is written and the reader ends ``lease_lost``."""
        self.start()
        with self.lock:
            stale = [s for s in self.shards if (s.table, s.shard_id) == (table, shard_id)]
        for old in stale:
            old.detach()
        shard = ShardLanes(self, table, shard_id, owns)
        with self.lock:
            for sink in self.sinks:
                lane = Lane(sink, shard)
                shard.members.append(lane)
                sink.members.append(lane)
                sink.cond.notify_all()
            self.shards.add(shard)
        return shard

    def status(self, now: float | None = None) -> list[LaneStatus]:
        """Every attached lane's :class:`LaneStatus`, sorted by sink, table, shard."""
        now = time.time() if now is None else now
        with self.lock:
            shards = list(self.shards)
        out = [row for shard in shards for row in shard.status(now)]
        return sorted(out, key=lambda r: (r.sink, r.table, r.shard_id))

    def sink_ages(self, now: float | None = None) -> dict[str, float]:
        """Per sink: the largest lane age (s) over its lanes (0 when every lane is empty)."""
        ages = {sink.runner.name: 0.0 for sink in self.sinks}
        for row in self.status(now):
            ages[row.sink] = max(ages[row.sink], row.age_s)
        return ages

    def shard_lag(self, table: str, shard_id: str, now: float | None = None) -> tuple[float, str | None]:
        """(age s, sink) of the slowest sink's lane of ``(table, shard_id)``: (0.0, None) when every
        lane of the shard is empty."""
        now = time.time() if now is None else now
        with self.lock:
            shards = [s for s in self.shards if (s.table, s.shard_id) == (table, shard_id)]
        best: tuple[float, str | None] = (0.0, None)
        for shard in shards:
            for row in shard.status(now):
                if row.age_s > best[0]:
                    best = (row.age_s, row.sink)
        return best

    def busy(self) -> dict[str, int]:
        """Sink name → calls in progress (for the shutdown log)."""
        return {sink.runner.name: sink.runner.in_flight for sink in self.sinks if sink.runner.in_flight}


#: at most this many lanes are reported in a worker's announcement, the most behind first (each
#: heartbeat writes them to the lease table: about 100 bytes per lane)
MAX_ANNOUNCED_LANES = 100


def encode_lane_status(rows: Sequence[LaneStatus]) -> str:
    """Lanes as compact JSON text for a worker's announcement (``WorkerInfo.sink_lanes``): a list of
    ``[sink, table, shard, age_ms, records, bytes, undurable_records, durable_position, error]``,
    the lanes most behind first, at most :data:`MAX_ANNOUNCED_LANES`."""
    import json

    ordered = sorted(rows, key=lambda r: (-r.age_s, -r.undurable_records, r.sink, r.shard_id))[:MAX_ANNOUNCED_LANES]
    return json.dumps([[r.sink, r.table, r.shard_id, int(r.age_s * 1000), r.records, r.bytes, r.undurable_records,
                        r.durable_position, r.error] for r in ordered], separators=(",", ":"))


def decode_lane_status(text: str | None) -> list[LaneStatus]:
    """:func:`encode_lane_status` backwards; malformed text gives [] (status must not crash)."""
    import json

    if not text:
        return []
    try:
        return [LaneStatus(sink=str(r[0]), table=str(r[1]), shard_id=str(r[2]), age_s=float(r[3]) / 1000.0,
                           records=int(r[4]), bytes=int(r[5]), undurable_records=int(r[6]),
                           durable_position=None if r[7] is None else str(r[7]),
                           error=None if r[8] is None else str(r[8]))
                for r in json.loads(text)]
    except (ValueError, TypeError, IndexError, KeyError):
        return []


def lane_settings_from(configs: Iterable[Any]) -> dict[str, LaneSettings]:
    """``{sink name: LaneSettings}`` from sink configurations with ``lane_max_records`` /
    ``lane_max_bytes`` (:class:`pipeline.config.SinkConfig`)."""
    return {c.name: LaneSettings(max_records=c.lane_max_records, max_bytes=c.lane_max_bytes) for c in configs}


__all__: Sequence[str] = ["Lanes", "ShardLanes", "LaneSettings", "LaneStatus", "batch_bytes",
                          "DEFAULT_LANE_MAX_RECORDS", "DEFAULT_LANE_MAX_BYTES", "COALESCE_MAX_RECORDS",
                          "lane_settings_from", "encode_lane_status", "decode_lane_status", "DeliveryAborted"]
