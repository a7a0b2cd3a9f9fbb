"""The run loop of one shard: read → decode → fan out → flush → checkpoint.

Runs in its own thread while this worker holds the shard's lease. The checkpoint moves only
after every sink has been given every event up to it *and* flushed (``FanOut.flush``), so it
never passes an event some sink has not made durable. Delivery is at-least-once: after a crash
the events since the last checkpoint are read again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

from pipeline import metrics
from pipeline.codec import decode_record, record_sequence_number
from pipeline.deadletter import DeadLetterQueue, decode_entry
from pipeline.errors import DecodeError, FatalSinkError, LeaseLostError
from pipeline.events import LATEST, SHARD_END, TRIM_HORIZON, Batch, ChangeEvent
from pipeline.fanout import DeliveryAborted, FanOut
from pipeline.leases import LeaseCoordinator
from pipeline.checkpoint import Gap
from pipeline.source import (
    IteratorExpiredError,
    ShardNotFoundError,
    ShardVanishedError,
    StreamSource,
    TrimmedDataError,
)


@dataclass
class ShardSettings:
    """Per-shard loop settings (from ``source`` in the configuration): limit, idle wait in ms,
    checkpoint interval in s."""

    max_records_per_call: int = 1000
    idle_interval_ms: int = 250
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


class ShardConsumer(threading.Thread):
    """Reads one shard to SHARD_END or until stopped / the lease is lost.

    ``outcome`` after the thread ends: ``shard_end``, ``stopped``, ``lease_lost``, ``trimmed`` or
    ``failed`` (with ``error`` set).
    """

    def __init__(self, lease_key: str, *, source: StreamSource, coordinator: LeaseCoordinator,
                 fanout: FanOut, dead_letter: DeadLetterQueue, settings: ShardSettings,
                 stop_event: threading.Event, logger: Any, clock: Callable[[], float] = time.monotonic):
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
        self.clock = clock
        self.log = logger.bind(shard_id=lease.shard_id)
        self.stats = ShardStats()
        self.outcome: str | None = None
        self.error: BaseException | None = None
        self._done_position: str | None = None  # last sequence number given to every sink
        self._checkpointed: str = lease.checkpoint
        self._pending_gap: Gap | None = None  # a skipped gap whose first position after is not known yet

    # -- thread entry --------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.outcome = self._run()
        except LeaseLostError as exc:
            self.outcome, self.error = "lease_lost", exc
            self.log.warning("shard_lease_lost", error=str(exc))
        except DeliveryAborted as exc:
            self.outcome, self.error = "stopped", exc
            self.log.warning("shard_delivery_aborted", error=str(exc),
                             checkpoint=self._checkpointed)
        except TrimmedDataError as exc:
            self.outcome, self.error = "trimmed", exc
            self.log.error("shard_trimmed_data", error=str(exc), checkpoint=self._checkpointed,
                           hint="the checkpoint is behind the stream's 24 h trim horizon: records were lost "
                                "before this worker read them; nothing was skipped silently, the shard is stopped")
        except FatalSinkError as exc:
            self.outcome, self.error = "failed", exc
            self.log.error("shard_failed", error=str(exc))
        except Exception as exc:  # keep the worker alive; report the shard
            self.outcome, self.error = "failed", exc
            self.log.exception("shard_failed", error=f"{type(exc).__name__}: {exc}")

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> str:
        lease = self.coordinator.get(self.lease_key)
        if lease is None:
            raise LeaseLostError(f"lease {self.lease_key} is not held")
        if lease.finished:
            return "shard_end"
        try:
            iterator = self._iterator_for(lease.checkpoint)
        except TrimmedDataError as exc:
            iterator = self._handle_gap(exc)
            if iterator is None:
                return "shard_end"
        last_checkpoint_at = self.clock()
        idle_s = self.settings.idle_interval_ms / 1000.0
        while True:
            if self.stop_event.is_set():
                self._flush_and_checkpoint()
                return "stopped"
            if not self.coordinator.owns(self.lease_key, self.token):
                raise LeaseLostError(f"lease {self.lease_key} was lost")
            try:
                try:
                    result = self.source.get_records(iterator, self.settings.max_records_per_call)
                except IteratorExpiredError:
                    self.log.info("shard_iterator_expired", after_sequence_number=self._resume_position())
                    iterator = self._iterator_for(self._resume_position())
                    continue
                except ShardNotFoundError as exc:
                    raise ShardVanishedError(f"shard {self.shard_id} is no longer in the stream: {exc}") from exc
            except TrimmedDataError as exc:
                iterator = self._handle_gap(exc)
                if iterator is None:
                    return "shard_end"
                continue
            self.stats.get_records_calls += 1
            if result.records:
                self._process(result.records, shard_end=result.next_iterator is None)
            else:
                self.coordinator.report_behind(self.lease_key, 0)  # caught up
            if result.next_iterator is None:
                self._flush_and_checkpoint(shard_end=True)
                self.log.info("shard_end_reached", records_read=self.stats.records_read)
                return "shard_end"
            iterator = result.next_iterator
            if self.clock() - last_checkpoint_at >= self.settings.checkpoint_interval_s:
                self._flush_and_checkpoint()
                last_checkpoint_at = self.clock()
            if not result.records:
                self.stop_event.wait(idle_s)

    def _handle_gap(self, exc: TrimmedDataError) -> str | None:
        """Record the gap, log it, count it; then stop (``on_trimmed: fail``: re-raise) or go on.

        With ``skip``: a trimmed position goes on from TRIM_HORIZON (returns that iterator); a
        vanished shard is checkpointed as SHARD_END so its children can start (returns None).
        Nothing is ever skipped without a recorded gap.
        """
        policy = self.settings.on_trimmed
        vanished = isinstance(exc, ShardVanishedError)
        gap = Gap(stream_arn=self.source.stream_arn, table=self.source.table, shard_id=self.shard_id,
                  last_checkpoint=self._resume_position(), first_position_after=None,
                  detected_at=datetime.now(timezone.utc).isoformat(), policy=policy,
                  error=f"{type(exc).__name__}: {exc}"[:1000])
        self.coordinator.record_gap(gap)
        self.stats.gaps += 1
        metrics.GAPS.labels(table=self.source.table, shard=self.shard_id).inc()
        self.log.error("trimmed_data_gap", last_checkpoint=gap.last_checkpoint, policy=policy,
                       shard_vanished=vanished, error=gap.error,
                       hint="records between the last checkpoint and the stream's trim horizon were lost "
                            "before this worker read them; the gap is recorded in the lease table")
        if policy != "skip":
            raise exc
        if vanished:
            self._flush_and_checkpoint(shard_end=True)
            return None
        self._pending_gap = gap
        return self.source.get_iterator(self.shard_id, TRIM_HORIZON)

    def _process(self, records, *, shard_end: bool) -> None:
        events: list[ChangeEvent] = []
        last_seq = None
        table, arn = self.source.table, self.source.stream_arn
        for record in records:
            seq = record_sequence_number(record)
            try:
                events.append(decode_record(record, table=table, stream_arn=arn, shard_id=self.shard_id))
            except DecodeError as exc:
                self.stats.decode_errors += 1
                metrics.DECODE_ERRORS.labels(table=table).inc()
                entry_id = self.dead_letter.put(decode_entry(record, table=table, stream_arn=arn,
                                                             shard_id=self.shard_id, sequence_number=seq,
                                                             error=str(exc)))
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
                      checkpoint_sequence_number=last_seq, shard_end=shard_end)
        self.fanout.deliver(batch)
        created = next((ev.source.approximate_creation_time for ev in reversed(events)
                        if ev.source.approximate_creation_time is not None), None)
        if created is not None:
            self.coordinator.report_behind(self.lease_key, max(0, int((time.time() - created.timestamp()) * 1000)))
        if last_seq is not None:
            self._done_position = last_seq
            self.stats.last_sequence_number = last_seq
            self.stats.last_record_time = time.time()

    def _flush_and_checkpoint(self, *, shard_end: bool = False) -> None:
        target = SHARD_END if shard_end else self._done_position
        if target is None or target == self._checkpointed:
            return
        self.fanout.flush()
        self.coordinator.checkpoint(self.lease_key, target, token=self.token)
        self.stats.checkpoints += 1
        self._checkpointed = target
        self.log.debug("checkpointed", checkpoint=target)

    def _resume_position(self) -> str:
        return self._done_position or self._checkpointed

    def _iterator_for(self, position: str) -> str:
        try:
            if position in (TRIM_HORIZON, LATEST):
                return self.source.get_iterator(self.shard_id, position)
            return self.source.get_iterator(self.shard_id, "AFTER_SEQUENCE_NUMBER", position)
        except ShardNotFoundError as exc:
            raise ShardVanishedError(f"shard {self.shard_id} is no longer in the stream "
                                     f"(checkpoint {position}): {exc}") from exc
