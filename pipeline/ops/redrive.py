"""Re-deliver dead-lettered entries (``ddb-cdc dlq redrive``), idempotently, in order.

:func:`redrive` takes the entries of a dead-letter destination (all of them, or those named by
``ids``), optionally only those of some sinks (``sink_filter``), and re-delivers each through the
ordinary sink contract (``open`` → ``write`` → ``flush`` → ``close``), one event per batch:

- ``delivery`` entries: the change event is rebuilt with
  :func:`pipeline.render.event_from_record_dict` and given to **the sink named in the entry only**.
  An entry whose sink is not configured any more is *skipped* (reported, left in place).
- ``decode`` entries: the raw record (stored through :func:`pipeline.deadletter.jsonable`) is
  turned back with :func:`unjsonable` and decoded again with :func:`pipeline.codec.decode_record`.
  If it still fails the entry is *kept* ("still undecodable: <error>"); if it decodes now, the
  event goes to every configured sink (or the ``--sink`` ones). When ``--sink`` left some
  configured sinks out, a ``delivery`` entry is put for each of those before the ``decode`` entry
  is removed, so no sink loses the change.

An entry is deleted only after every sink it was given to returned from ``flush`` (durable); it is
*kept* on any error. A kept entry that was actually attempted is re-put with ``attempts + 1``,
``last_failure`` = now and ``error`` = the new reason (the first error is kept in
``extra["first_error"]``); its id does not change (ids are deterministic). Entries that were not
attempted (their sink could not be opened, stopped on a fatal error, or an older change of the
same item failed first) are left exactly as they were.

Order
-----
Entries are grouped per sink and, within a sink, per shard (stream ARN + shard id, groups ordered
by their first sequence number), and applied in sequence-number order (compared as integers). If
one change of an item fails for a sink, later changes of **the same item** (``key_id``) for that
sink are held back (kept, not attempted) in this run, so a redrive never applies a newer change
and then leaves an older one behind to be applied by a later redrive on top of it — for sinks
that are not version-aware this keeps the order of what redrive itself applies.

What holds per built-in sink when a dead-lettered (older) change is redriven after newer changes
of the same item were delivered:

- **opensearch**: every action carries ``version=event.version, version_type=external``; the
  version never decreases along the changes of one item. OpenSearch applies a write only when its
  version is higher than the stored one and answers 409 otherwise, which the sink counts as
  success: an older INSERT/MODIFY never overwrites a newer document, an older REMOVE never deletes
  a newer document, and the entry is removed (the redrive is idempotent). Limit: after a delete,
  OpenSearch remembers the deleted version only for ``index.gc_deletes`` (60 s by default); an
  older INSERT/MODIFY redriven later than that after a newer REMOVE finds no tombstone and
  re-creates the document. Raise ``index.gc_deletes`` for as long as entries may wait in the
  dead-letter destination, or look at the item's current state before redriving such entries.
- **redis_cache**: invalidation is order-insensitive: a redrive deletes the cache keys of the old
  and new images again, and deleting a key twice (or a key that is gone) is harmless; the next
  read repopulates from the table.
- **s3_audit**: an append-only log: a redriven event is written in a new, later object
  (``{first_seq}-{last_seq}`` keys); nothing is overwritten. Readers that rebuild state must order
  events by sequence number per shard lineage (and deduplicate by ``(shard_id,
  sequence_number)``), not by object write time.
- **plugins**: nothing is enforced for them; a plugin that stores state per item must compare
  ``event.version`` with what it stored and ignore older changes (and treat the same version as
  already applied) to be safe under redrive and replays.

This module never imports boto3; the CLI builds the sinks and the dead-letter destination.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from pipeline.codec import decode_record
from pipeline.deadletter import DeadLetterEntry, delivery_entry, utc_now
from pipeline.errors import CdcError, FatalSinkError
from pipeline.events import Batch, ChangeEvent, sequence_key
from pipeline.render import event_from_record_dict
from pipeline.runtime.sink_lifecycle import open_sink

__all__ = ["EntryResult", "RedriveReport", "redrive", "unjsonable", "render_report"]

DELIVERED = "delivered"
KEPT = "kept"
SKIPPED = "skipped"
MISSING = "missing"
WOULD_DELIVER = "would_deliver"

#: Keys of a raw stream record whose ISO text was a datetime before :func:`jsonable`.
_DATETIME_KEYS = frozenset({"ApproximateCreationDateTime"})


def unjsonable(value: Any, *, _key: str | None = None) -> Any:
    """Inverse of :func:`pipeline.deadletter.jsonable` for stored raw records.

    ``{"__bytes__": base64}`` → bytes; the ISO text of ``ApproximateCreationDateTime`` → an aware
    datetime (other strings cannot be told apart from ISO-looking text, so they stay strings —
    :func:`pipeline.codec.parse_creation_time` accepts both anyway); maps and lists recursively.
    Decimals and sets were rendered as text and lists, and come back as such (a raw stream record
    has neither outside AttributeValues, where numbers are text already).
    """
    if isinstance(value, Mapping):
        if len(value) == 1 and "__bytes__" in value and isinstance(value["__bytes__"], str):
            try:
                return base64.b64decode(value["__bytes__"], validate=True)
            except (binascii.Error, ValueError):
                return dict(value)
        return {k: unjsonable(v, _key=k) for k, v in value.items()}
    if isinstance(value, list):
        return [unjsonable(v) for v in value]
    if _key in _DATETIME_KEYS and isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return value
    return value


@dataclass
class EntryResult:
    """What redrive did with one entry.

    ``status``: ``delivered`` (re-delivered and removed), ``kept`` (still failing; left in the
    destination), ``skipped`` (not attempted, e.g. its sink is not configured), ``missing`` (an
    ``--id`` that does not exist) or ``would_deliver`` (dry run). ``sinks`` are the sinks it was
    (or would be) given to.
    """

    entry_id: str
    kind: str
    status: str
    sinks: tuple[str, ...] = ()
    shard_id: str = ""
    sequence_number: str | None = None
    key_id: str | None = None
    reason: str = ""


@dataclass
class RedriveReport:
    """Per-entry results and counts; ``exit_code`` is 0 when nothing is kept or missing."""

    results: list[EntryResult] = field(default_factory=list)
    dry_run: bool = False

    def _count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def delivered(self) -> int:
        return self._count(DELIVERED)

    @property
    def kept(self) -> int:
        return self._count(KEPT)

    @property
    def skipped(self) -> int:
        return self._count(SKIPPED)

    @property
    def missing(self) -> int:
        return self._count(MISSING)

    @property
    def would_deliver(self) -> int:
        return self._count(WOULD_DELIVER)

    @property
    def ok(self) -> bool:
        return self.kept == 0 and self.missing == 0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def by_id(self) -> dict[str, EntryResult]:
        return {r.entry_id: r for r in self.results}

    def summary(self) -> str:
        if self.dry_run:
            text = (f"dry run: {self.would_deliver} would be delivered, {self.kept} would be kept, "
                    f"{self.skipped} skipped; nothing was changed")
        else:
            text = f"redrive: {self.delivered} delivered, {self.kept} kept, {self.skipped} skipped"
        if self.missing:
            text += f", {self.missing} not found"
        return text


@dataclass
class _Plan:
    """One selected entry on its way: the event and the sinks it goes to, and their outcomes."""

    entry: DeadLetterEntry
    entry_id: str
    event: ChangeEvent
    targets: tuple[str, ...]
    leave_for: tuple[str, ...] = ()  # configured sinks not selected: get a delivery entry instead
    ok: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    attempted: bool = False


def redrive(dlq: Any, sinks_by_name: Mapping[str, Any], *, sink_filter: set[str] | None = None,
            ids: set[str] | None = None, logger: Any, dry_run: bool = False, aws: Any = None,
            worker_id: str = "ddb-cdc-redrive", configured_sinks: Iterable[str] | None = None) -> RedriveReport:
    """Re-deliver dead-lettered entries; see the module doc for the rules.

    - ``dlq``: a :class:`pipeline.deadletter.DeadLetterQueue`.
    - ``sinks_by_name``: configured sink instances by name, not yet opened; only those that have
      entries to redrive are opened (with a :class:`SinkContext` carrying ``aws``) and closed after.
    - ``sink_filter``: only entries of these sinks (and decode entries go only to these sinks);
      None = every sink in ``sinks_by_name``.
    - ``ids``: only these entry ids (unknown ids are reported ``missing``); None = every entry.
    - ``dry_run``: decode and plan, report what would happen, open no sink and change nothing.
    - ``configured_sinks``: every sink name of the configuration (default: ``sinks_by_name``'s);
      a decode entry redriven to only some of them leaves delivery entries for the others.

    Returns a :class:`RedriveReport`; raises only for errors of the dead-letter destination itself
    while listing it.
    """
    report = RedriveReport(dry_run=dry_run)
    selected = set(sinks_by_name) if sink_filter is None else set(sink_filter) & set(sinks_by_name)
    all_sinks = list(configured_sinks) if configured_sinks is not None else list(sinks_by_name)

    entries: list[tuple[str, DeadLetterEntry]] = []
    if ids:
        for entry_id in sorted(ids):
            entry = dlq.get(entry_id)
            if entry is None:
                report.results.append(EntryResult(entry_id, "?", MISSING, reason="no such entry"))
            else:
                entries.append((entry_id, entry))
    else:
        entries = [(entry.id, entry) for entry in dlq.list()]

    plans: list[_Plan] = []
    for entry_id, entry in entries:
        result = _plan(entry_id, entry, sinks_by_name, selected, sink_filter, all_sinks,
                       explicit=bool(ids), dry_run=dry_run, dlq=dlq, logger=logger)
        if isinstance(result, _Plan):
            plans.append(result)
        elif result is not None:
            report.results.append(result)

    if dry_run:
        for p in plans:
            note = f"to {', '.join(p.targets)}"
            if p.leave_for:
                note += f"; delivery entries would be left for {', '.join(p.leave_for)}"
            report.results.append(_result(p, WOULD_DELIVER, note))
        return report

    for sink_name in [n for n in sinks_by_name if any(n in p.targets for p in plans)]:
        jobs = _ordered([p for p in plans if sink_name in p.targets])
        _deliver_to_sink(sink_name, sinks_by_name[sink_name], jobs, aws=aws, worker_id=worker_id,
                         dlq=dlq, logger=logger)

    for p in plans:
        report.results.append(_finish(p, dlq, logger))
    return report


def _result(p: _Plan, status: str, reason: str) -> EntryResult:
    return EntryResult(p.entry_id, p.entry.kind, status, p.targets, p.entry.shard_id,
                       p.event.sequence_number, p.event.key_id, reason)


def _plan(entry_id: str, entry: DeadLetterEntry, sinks_by_name: Mapping[str, Any], selected: set[str],
          sink_filter: set[str] | None, all_sinks: list[str], *, explicit: bool, dry_run: bool,
          dlq: Any, logger: Any) -> _Plan | EntryResult | None:
    """A :class:`_Plan` for an entry to redrive, an :class:`EntryResult` for one that is not, or
    None for an entry the filter leaves out (not reported unless named by ``--id``)."""
    base = dict(entry_id=entry_id, kind=entry.kind, shard_id=entry.shard_id, sequence_number=entry.sequence_number)
    if entry.kind == "delivery":
        sink = entry.sink or ""
        if sink_filter is not None and sink not in sink_filter:
            return EntryResult(**base, status=SKIPPED, sinks=(sink,), reason="not selected by --sink") if explicit else None
        if sink not in sinks_by_name:
            return EntryResult(**base, status=SKIPPED, sinks=(sink,),
                               reason=f"sink {sink!r} is not configured; add it back or delete the entry")
        try:
            if not isinstance(entry.event, Mapping):
                raise CdcError("the entry holds no event")
            event = event_from_record_dict(entry.event)
        except CdcError as exc:
            return EntryResult(**base, status=KEPT, sinks=(sink,), reason=f"cannot rebuild the event: {exc}")
        return _Plan(entry, entry_id, event, (sink,))
    if entry.kind == "decode":
        try:
            floor = entry.extra.get("version_floor", 0)
            event = decode_record(unjsonable(entry.raw_record), table=entry.table or "",
                                  stream_arn=entry.stream_arn, shard_id=entry.shard_id,
                                  version_floor=floor if isinstance(floor, int) else 0,
                                  eager=True)  # images too: a still-bad image keeps the entry
        except Exception as exc:  # noqa: BLE001 — a hostile record is kept, never the end of the redrive
            reason = f"still undecodable: {exc if isinstance(exc, CdcError) else type(exc).__name__ + ': ' + str(exc)[:200]}"
            if not dry_run:
                _bump(dlq, entry, reason, logger)
            return EntryResult(**base, status=KEPT, reason=reason)
        targets = tuple(n for n in sinks_by_name if n in selected)
        if not targets:
            return EntryResult(**base, status=SKIPPED, key_id=event.key_id, reason="no configured sink selected")
        leave_for = tuple(n for n in all_sinks if n not in targets)
        return _Plan(entry, entry_id, event, targets, leave_for)
    return EntryResult(**base, status=SKIPPED, sinks=((entry.sink,) if entry.sink else ()),
                       reason=f"unknown entry kind {entry.kind!r}")


def _ordered(jobs: list[_Plan]) -> list[_Plan]:
    """Per shard (groups ordered by their first sequence number), in sequence-number order."""
    groups: dict[tuple[str, str], list[_Plan]] = {}
    for p in jobs:
        groups.setdefault((p.event.source.stream_arn, p.event.source.shard_id), []).append(p)
    ordered: list[_Plan] = []
    for group in groups.values():
        group.sort(key=lambda p: sequence_key(p.event.sequence_number))
    for _, group in sorted(groups.items(), key=lambda kv: (sequence_key(kv[1][0].event.sequence_number), kv[0])):
        ordered.extend(group)
    return ordered


def _deliver_to_sink(name: str, sink: Any, jobs: list[_Plan], *, aws: Any, worker_id: str, dlq: Any,
                     logger: Any) -> None:
    log = logger.bind(sink=name) if hasattr(logger, "bind") else logger
    try:
        open_sink(sink, worker_id=worker_id, logger=logger, aws=aws, dead_letter=dlq)
    except FatalSinkError as exc:
        reason = str(exc)
        log.error("dlq_redrive_sink_unavailable", error=reason[:500])
        for p in jobs:
            p.failures[name] = reason
        return
    stopped: str | None = None
    failed_keys: dict[str, str] = {}  # key_id → entry id of the failed older change
    try:
        for p in jobs:
            ev = p.event
            if stopped is not None:
                p.failures[name] = f"not attempted: sink {name!r} stopped after a fatal error ({stopped})"
                continue
            if ev.key_id in failed_keys:
                p.failures[name] = (f"held back: an older change of this item ({failed_keys[ev.key_id]}) "
                                    f"failed for sink {name!r}")
                continue
            batch = Batch(table=ev.source.table, stream_arn=ev.source.stream_arn, shard_id=ev.source.shard_id,
                          events=(ev,), checkpoint_sequence_number=ev.sequence_number, extra={"redrive": True})
            p.attempted = True
            try:
                sink.write(batch)
                sink.flush()
            except Exception as exc:
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]
                p.failures[name] = reason
                failed_keys[ev.key_id] = p.entry_id
                if isinstance(exc, FatalSinkError):
                    stopped = reason[:300]
                continue
            p.ok.add(name)
    finally:
        try:
            sink.close()
        except Exception as exc:  # delivered events were flushed already; closing is housekeeping
            log.warning("dlq_redrive_sink_close_failed", error=f"{type(exc).__name__}: {exc}"[:500])


def _finish(p: _Plan, dlq: Any, logger: Any) -> EntryResult:
    """Delete a fully delivered entry (after leaving delivery entries for unselected sinks);
    keep (and, if attempted, bump) the others."""
    if p.failures or set(p.targets) - p.ok:
        reason = "; ".join(f"{sink}: {why}" for sink, why in p.failures.items()) or "not delivered"
        if p.attempted:
            _bump(dlq, p.entry, reason, logger)
        logger.warning("dlq_redrive_kept", entry_id=p.entry_id, shard_id=p.entry.shard_id,
                       sequence_number=p.event.sequence_number, error=reason[:500])
        return _result(p, KEPT, reason)
    note = ""
    try:
        now = utc_now()
        for sink in p.leave_for:
            dlq.put(delivery_entry(p.event, sink=sink, error=f"decoded by redrive from {p.entry_id}; not yet "
                                   f"delivered to this sink (not selected by --sink)", attempts=0,
                                   first_failure=now, last_failure=now))
        dlq.delete(p.entry_id)
    except Exception as exc:
        reason = f"delivered, but the entry could not be removed: {type(exc).__name__}: {exc}"
        logger.error("dlq_redrive_delete_failed", entry_id=p.entry_id, error=reason[:500])
        return _result(p, KEPT, reason)
    if p.leave_for:
        note = f"delivery entries left for {', '.join(p.leave_for)}"
    logger.info("dlq_redrive_delivered", entry_id=p.entry_id, sinks=list(p.targets), shard_id=p.entry.shard_id,
                sequence_number=p.event.sequence_number, key_id=p.event.key_id)
    return _result(p, DELIVERED, note)


def _bump(dlq: Any, entry: DeadLetterEntry, reason: str, logger: Any) -> None:
    """Re-put a kept entry with attempts + 1, last_failure = now and the new error (same id)."""
    try:
        entry.extra.setdefault("first_error", entry.error)
        entry.attempts += 1
        entry.last_failure = utc_now().isoformat()
        entry.error = reason[:4000]
        dlq.put(entry)
    except Exception as exc:  # the entry stays as it was: still kept, nothing lost
        logger.warning("dlq_redrive_update_failed", entry_id=entry.id, error=f"{type(exc).__name__}: {exc}"[:500])


def render_report(report: RedriveReport, console: Any = None) -> None:
    """Print ``report`` with rich: one row per entry (id, kind, sinks, shard, sequence, status,
    reason), then the summary line. ``console`` defaults to stdout (wide when not a terminal)."""
    import os

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(highlight=False, width=250)
    if report.results:
        table = Table(box=box.SIMPLE_HEAD)
        for name in ("entry", "kind", "sinks", "shard", "sequence", "status", "reason"):
            table.add_column(name, no_wrap=name not in ("reason",), overflow="fold")
        for r in report.results:
            table.add_row(*(Text(cell) for cell in (
                r.entry_id, r.kind, ", ".join(r.sinks) or "-", r.shard_id or "-", r.sequence_number or "-",
                r.status, r.reason or "")))
        console.print(table)
    else:
        console.print("no dead-letter entries selected")
    console.print(Text(report.summary()))
