"""One Lambda invocation's records → every sink, fail-fast: the first record not handled and every
later one are the invocation's batchItemFailures.

A record is *handled* when every sink holds it durably (flushed) or it is in the dead-letter
destination (cannot be decoded, or a sink refused it permanently — ``PermanentSinkError``, the
permanent part of a ``PartialSinkError``, or an ``on_failure: dead_letter`` sink's spent retry
budget). The rules of :mod:`pipeline.runtime.fanout` apply unchanged; only the time is bounded:
the invocation has ``write_budget_s`` seconds for writes (retries included) and ``flush_budget_s``
more for the flush, after which retrying stops (``DeliveryAborted``).

Fail-fast (powertools-lambda-python#2850, "stop at the first failure"): the records of a shard are
delivered in order; when a sink has not taken record *k*, sinks after it get only the records
before *k*, and *k* with every later record is reported. Lambda checkpoints before the lowest
reported sequence number and re-sends from there (AWS Lambda developer guide, "Configuring partial
batch response with DynamoDB and Lambda"), so no later change of an item is checkpointed past an
earlier failed one. A sink that had already applied some later records in the same request (a bulk
with one refused document) gets them again; their external versions make that harmless
(OpenSearch refuses the older version, the audit object is rewritten with the same key and bytes,
a cache key is deleted again).

A flush that fails (after its retries, within the budget) puts every record of the invocation in
doubt: all are reported, and the sinks' unflushed buffers are discarded (``discard_unflushed``) so
the retried batch starts clean.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from pipeline import metrics
from pipeline.codec import decode_record
from pipeline.deadletter import DeadLetterQueue, decode_entry
from pipeline.errors import DecodeError
from pipeline.events import Batch, ChangeEvent
from pipeline.runtime.fanout import DeliveryAborted, FanOut, SinkRunner

from connectors.aws_lambda.event import LambdaRecord


@dataclass
class InvocationOutcome:
    """What one invocation did. ``failed_from``: index in ``Records`` of the first record not
    handled (None: all handled); ``failures``: the sequence numbers to report, in record order;
    ``delivered`` / ``dead_lettered`` / ``decode_errors``: counts; ``errors``: one line per cause."""

    records: int
    failed_from: int | None = None
    failures: list[str] = field(default_factory=list)
    delivered: int = 0
    dead_lettered: int = 0
    decode_errors: int = 0
    errors: list[str] = field(default_factory=list)


class _Deadline:
    """A stop event set ``seconds`` from now (a daemon timer); :meth:`cancel` when done."""

    def __init__(self, seconds: float):
        self.event = threading.Event()
        self._timer = threading.Timer(max(0.0, seconds), self.event.set)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()


def deliver_invocation(records: Sequence[LambdaRecord], *, shard_id: str, runners: Sequence[SinkRunner],
                       dead_letter: DeadLetterQueue, logger: Any, write_budget_s: float,
                       flush_budget_s: float) -> InvocationOutcome:
    """Decode ``records``, deliver them to every sink in ``runners`` (in order), flush; return the
    :class:`InvocationOutcome`. Never raises for a record's or a sink's failure (they become
    ``failures``); a dead-letter write that fails makes its record the first failure."""
    outcome = InvocationOutcome(records=len(records))
    cut = len(records)  # index of the first record not handled
    decoded: list[tuple[int, ChangeEvent]] = []
    for rec in records:
        try:
            decoded.append((rec.index, decode_record(rec.record, table=rec.table, stream_arn=rec.stream_arn,
                                                     shard_id=shard_id)))
            continue
        except Exception as exc:  # noqa: BLE001 — whatever one record does, it is that record's failure
            error = exc if isinstance(exc, DecodeError) else DecodeError(f"{type(exc).__name__}: {str(exc)[:200]}")
        metrics.DECODE_ERRORS.labels(table=rec.table).inc()
        try:
            entry_id = dead_letter.put(decode_entry(rec.record, table=rec.table, stream_arn=rec.stream_arn,
                                                    shard_id=shard_id, sequence_number=rec.sequence_number,
                                                    error=str(error)))
        except Exception as exc:  # noqa: BLE001 — the record is neither delivered nor dead-lettered
            outcome.errors.append(f"record {rec.index}: dead-letter write failed: {type(exc).__name__}: {exc}"[:500])
            cut = rec.index
            break
        outcome.decode_errors += 1
        outcome.dead_lettered += 1
        logger.error("record_decode_failed", sequence_number=rec.sequence_number, error=str(error),
                     dead_letter_id=entry_id)

    index_of = {(ev.source.stream_arn, ev.sequence_number): i for i, ev in decoded}
    dead_before = sum(r.stats.dead_lettered for r in runners)
    writes = _Deadline(write_budget_s)
    try:
        fanout = FanOut(runners, dead_letter, stop_event=writes.event, logger=logger)
        for (table, arn), events in _segments(decoded):
            try:
                fanout.reset_shard(table, shard_id)
            except DeliveryAborted as exc:  # the sinks are fenced off (SIGTERM): nothing more goes out
                outcome.errors.append(f"sinks fenced: {exc}"[:500])
                cut = min(cut, events[0][0])
                break
            for runner in runners:
                todo = [ev for i, ev in events if i < cut]
                if not todo:
                    break
                batch = Batch(table=table, stream_arn=arn, shard_id=shard_id, events=tuple(todo),
                              checkpoint_sequence_number=todo[-1].sequence_number)
                try:
                    fanout.deliver_to(runner, batch)
                except Exception as exc:  # noqa: BLE001 — DeliveryAborted, FatalSinkError, a dead-letter failure
                    undelivered = getattr(exc, "undelivered", None) or batch.events
                    first = min(index_of[(ev.source.stream_arn, ev.sequence_number)] for ev in undelivered)
                    why = (f"the invocation's write budget ({write_budget_s:.1f} s) ran out; last error: "
                           if writes.event.is_set() else "")
                    outcome.errors.append(f"sink {runner.name!r} stopped at record {first}: {why}"
                                          f"{type(exc).__name__}: {exc}"[:500])
                    cut = min(cut, first)
    finally:
        writes.cancel()

    flushes = _Deadline(flush_budget_s)
    try:
        FanOut(runners, dead_letter, stop_event=flushes.event, logger=logger).flush()
    except Exception as exc:  # noqa: BLE001 — nothing of this invocation is known to be durable
        why = f"the flush budget ({flush_budget_s:.1f} s) ran out; " if flushes.event.is_set() else ""
        outcome.errors.append(f"flush failed: {why}{type(exc).__name__}: {exc}"[:500])
        cut = 0
        _discard_unflushed(runners, logger)
    finally:
        flushes.cancel()

    outcome.dead_lettered += sum(r.stats.dead_lettered for r in runners) - dead_before
    outcome.delivered = sum(1 for i, _ in decoded if i < cut)
    if cut < len(records):
        outcome.failed_from = cut
        outcome.failures = [r.sequence_number for r in records[cut:] if r.sequence_number is not None]
    return outcome


def _segments(decoded: list[tuple[int, ChangeEvent]]) -> list[tuple[tuple[str, str], list[tuple[int, ChangeEvent]]]]:
    """Consecutive events of one stream (an event source mapping sends one shard per invocation;
    an invocation assembled by hand may mix streams)."""
    out: list[tuple[tuple[str, str], list[tuple[int, ChangeEvent]]]] = []
    for i, ev in decoded:
        key = (ev.source.table, ev.source.stream_arn)
        if not out or out[-1][0] != key:
            out.append((key, []))
        out[-1][1].append((i, ev))
    return out


def _discard_unflushed(runners: Sequence[SinkRunner], logger: Any) -> None:
    """After a failed flush: drop every sink's unflushed buffer (the records are reported and come
    again) and forget the fan-out's unflushed log. A sink without ``discard_unflushed`` keeps its
    buffer; an error is logged, never raised."""
    for runner in runners:
        discard = getattr(runner.sink, "discard_unflushed", None)

        def drop(d=discard, r=runner) -> None:
            marker = r.unflushed.mark()
            if callable(d):
                d()
            r.unflushed.forget_through(marker)

        try:
            runner.exclusive(drop)
        except DeliveryAborted:
            pass
        except Exception as exc:  # noqa: BLE001
            logger.warning("sink_discard_failed", sink=runner.name, error=f"{type(exc).__name__}: {exc}"[:500])
