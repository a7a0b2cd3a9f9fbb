"""Replay from the S3 audit archive, the pure part: key layout, ordering, de-duplication, time
window, batching, counting. No boto3 here; :mod:`connectors.s3.archive` lists and reads S3 and hands
this module plain :class:`ArchiveObject` descriptions and a function that reads one of them.

What the archive is (written by the ``s3_audit`` sink, see :mod:`connectors.s3.audit`)::

    {prefix}/{table}/dt=YYYY-MM-DD/{shard_id}/{first_seq}-{last_seq}.jsonl.gz

and, for snapshot events, ``{prefix}/{table}/snapshot={id}/seg{NNNNN}/{first}-{last}.jsonl.gz``
(each segment read as one shard, before the table's stream shards);

one gzip object per upload of one shard's buffer, one typed JSON line per change event, ``dt`` the
UTC date of the object's *first* event (``dt=unknown`` when it had no creation time). Each object's
user metadata ``parent-shard-ids`` names the shard's parents (comma-joined; may be empty).

Order. Shards are replayed one at a time, one table after the other (tables in name order):

- by lineage: within a table, a shard comes after every parent that is in the archive (Kahn's
  topological order); a shard whose parents are all absent from the archive (or that has none) is
  a root. Among shards that are ready at the same time, the one with the smaller first sequence
  number (as an integer) goes first, then the smaller shard id. Should the metadata ever form a
  cycle, the smallest remaining shard is released so that every shard is still replayed once;
- within a shard, events by sequence number (as integers), each distinct event once.

All changes of one item pass through one shard lineage in order, so every item's changes are
delivered in the order they happened.

De-duplication is per event, by (stream ARN, shard id, sequence number), never by object ranges.
The archive is at-least-once and its objects need not hold contiguous runs: a restarted worker
re-uploads events under other keys (overlaps, repeats), a redriven dead letter is its own object
(``103-103`` inside ``100-105``, which does not hold 103: nesting with a hole), a reader that
skipped a trimmed gap leaves a hole. Every distinct archived event is delivered exactly once per
shard, in sequence order; the copies in other objects count as ``duplicates``. Copies written by the
worker are identical (decoded from the same stream record); should two copies of one event differ
(e.g. processors changed between runs), the one in the object that sorts first by (first sequence
number, last sequence number, key) is delivered and ``archive_copies_differ`` is logged as a
warning. Sequence numbers the archive does not hold are not known to exist and cannot be replayed.

Memory stays bounded however large the archive: shards are replayed one at a time, and within a
shard the objects (sorted by their key's first sequence number) are merged with a heap: an object
is opened (a GetObject stream) only when the merge reaches its first sequence number, and closed
when its last line was read. At any moment the open objects are those whose key range holds the
current position — one in a plain archive, a few where objects overlap — each holding a gzip
window and one parsed line; plus one batch. Every line of an object must lie in its key's range and
rise strictly (as the sink writes them); anything else is an ArchiveError, never a silent
mis-order.

Time window. ``since`` ≤ ``source.approximate_creation_time`` ≤ ``until``, both bounds inclusive,
either may be None (open). Events before ``since`` count as ``skipped_before``, after ``until`` as
``skipped_after``. Events without a creation time cannot be placed in time: they are delivered
(and counted as delivered). Naive datetimes are taken as UTC.

Delivery. Batches of at most :data:`BATCH_MAX_EVENTS` events of one shard
(``checkpoint_sequence_number`` = the last event's sequence number); the caller's ``flush`` runs
every :data:`FLUSH_EVERY_BATCHES` batches and at the end. A shard is reported ``archive_end`` only
after a flush that covers its last batch succeeded. Events keep their archived ``version``, so
sinks with external versioning (OpenSearch) never let a replayed change overwrite a newer one.
"""

from __future__ import annotations

import heapq
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from pipeline.errors import CdcError, ConfigError, DecodeError
from pipeline.lineage import parents_first
from pipeline.events import Batch, ChangeEvent
from pipeline.render import event_from_record_dict
from pipeline.replay.report import ReplayReport, ShardReplay
from pipeline.errors import ArchiveError  # noqa: F401 (defined in the one error tree)
from pipeline.snapshot.items import parse_snapshot_shard_id, snapshot_shard_id

#: Most events in one Batch (the same bound as one GetRecords call).
BATCH_MAX_EVENTS = 1000
#: The sinks are flushed after this many batches (and at the end of the replay).
FLUSH_EVERY_BATCHES = 20
#: File name ending of audit objects.
OBJECT_SUFFIX = ".jsonl.gz"

_SNAPSHOT_KEY_RE = re.compile(
    r"^(?P<table>[^/]+)/snapshot=(?P<id>[^/]+)/seg(?P<segment>[0-9]{5})/(?P<first>[0-9]+)-(?P<last>[0-9]+)\.jsonl\.gz$"
)
_KEY_RE = re.compile(
    r"^(?P<table>[^/]+)/dt=(?P<day>[^/]+)/(?P<shard>[^/]+)/(?P<first>[0-9]+)-(?P<last>[0-9]+)\.jsonl\.gz$"
)



@dataclass(frozen=True, slots=True)
class ArchiveObject:
    """One audit object: its full S3 ``key``, the ``table`` and ``shard_id`` from the key,
    ``first_seq`` / ``last_seq`` (decimal strings), ``day`` (the ``dt`` partition; None for
    ``dt=unknown``) and ``size`` (stored, i.e. compressed, bytes; 0 when unknown)."""

    key: str
    table: str
    shard_id: str
    first_seq: str
    last_seq: str
    day: date | None
    size: int = 0

    @property
    def sort_key(self) -> tuple[int, int, str]:
        """(first sequence number, last sequence number, key), numbers as integers."""
        return int(self.first_seq), int(self.last_seq), self.key


@dataclass
class ArchiveShard:
    """One archived shard: its objects sorted by :attr:`ArchiveObject.sort_key` and its parents
    (from object metadata; empty = none known)."""

    table: str
    shard_id: str
    objects: list[ArchiveObject] = field(default_factory=list)
    parent_shard_ids: tuple[str, ...] = ()

    @property
    def first_sequence_key(self) -> int:
        """The smallest first sequence number of its objects, as an integer."""
        return int(self.objects[0].first_seq) if self.objects else 0


# -- keys and partitions ------------------------------------------------------------------------


def partition_day(name: str) -> date | None:
    """``"dt=2024-05-01"`` (or ``"2024-05-01"``, slashes around ignored) → that date;
    ``"dt=unknown"`` → None. Raises ValueError for anything else."""
    text = name.strip("/")
    text = text[3:] if text.startswith("dt=") else text
    if text == "unknown":
        return None
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(f"not a day partition: {name!r} (expected dt=YYYY-MM-DD or dt=unknown)")
    return date.fromisoformat(text)


def day_may_hold(day: date | None, since: datetime | None, until: datetime | None) -> bool:
    """Can objects of the ``dt=day`` partition hold events in [since, until]?

    An object sits under the UTC date of its first event and may run past midnight, so a
    partition is skipped only when ``day`` < ``since``'s UTC date − 1 day or ``day`` >
    ``until``'s UTC date. ``dt=unknown`` (None) is always read.
    """
    if day is None:
        return True
    if since is not None and day < _utc(since).date() - timedelta(days=1):
        return False
    if until is not None and day > _utc(until).date():
        return False
    return True


def parse_object_key(key: str, prefix: str) -> ArchiveObject | None:
    """Parse an audit object key below ``prefix`` (no leading/trailing ``/``; may be ``""``).

    Returns None for keys that are not audit objects (other files, another layout, a malformed
    ``dt``). ``size``: pass it on with :func:`dataclasses.replace` if known.
    """
    base = f"{prefix}/" if prefix else ""
    if not key.startswith(base):
        return None
    match = _KEY_RE.match(key[len(base):])
    if match is None:
        snap = _SNAPSHOT_KEY_RE.match(key[len(base):])
        if snap is None:
            return None
        return ArchiveObject(key=key, table=snap["table"], shard_id=snapshot_shard_id(snap["id"], int(snap["segment"])),
                             first_seq=snap["first"], last_seq=snap["last"], day=None)
    try:
        day = partition_day(match["day"])
    except ValueError:
        return None
    return ArchiveObject(key=key, table=match["table"], shard_id=match["shard"], first_seq=match["first"],
                         last_seq=match["last"], day=day)


def group_objects(objects: Iterable[ArchiveObject]) -> list[ArchiveShard]:
    """Group objects by (table, shard id); each shard's objects sorted by first sequence number
    (as an integer), then last, then key. Shards come back in (table, shard id) order."""
    shards: dict[tuple[str, str], ArchiveShard] = {}
    for obj in objects:
        shard = shards.setdefault((obj.table, obj.shard_id), ArchiveShard(obj.table, obj.shard_id))
        shard.objects.append(obj)
    for shard in shards.values():
        shard.objects.sort(key=lambda o: o.sort_key)
    return [shards[k] for k in sorted(shards)]


def order_shards(shards: Iterable[ArchiveShard]) -> list[ArchiveShard]:
    """Shards in replay order: tables by name; within a table, parents before children
    (topological, :func:`pipeline.lineage.parents_first`), ties by (first sequence number as int,
    shard id). A parent that is not among ``shards`` is ignored (the child is a root). A cycle is
    broken at its smallest shard. Snapshot segments (``snapshot=…`` folders) come before the
    table's stream shards: they are the base state, and every later stream change outranks them
    (pipeline.snapshot.version)."""
    by_table: dict[str, list[ArchiveShard]] = {}
    for shard in shards:
        by_table.setdefault(shard.table, []).append(shard)
    ordered: list[ArchiveShard] = []
    for table in sorted(by_table):
        # snapshot segments before stream shards, then by first sequence number
        ordered += parents_first(by_table[table], shard_id=lambda s: s.shard_id,
                                 parents=lambda s: s.parent_shard_ids,
                                 rank=lambda s: (parse_snapshot_shard_id(s.shard_id) is None,
                                                 s.first_sequence_key, s.shard_id))
    return ordered


# -- window -------------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def normalize_window(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """Both bounds as aware UTC datetimes (naive ones are taken as UTC).

    Raises ConfigError when ``since`` is after ``until``.
    """
    since = _utc(since) if since is not None else None
    until = _utc(until) if until is not None else None
    if since is not None and until is not None and since > until:
        raise ConfigError([f"--since {since.isoformat()} is after --until {until.isoformat()}: swap them"])
    return since, until


# -- reading one shard --------------------------------------------------------------------------


def shard_events(shard: ArchiveShard, read_object: Callable[[ArchiveObject], Iterable[Mapping[str, Any]]],
                 row: ShardReplay, *, since: datetime | None, until: datetime | None,
                 on_object: Callable[[ArchiveObject], None] | None = None, logger: Any = None) -> Iterator[ChangeEvent]:
    """The shard's events to deliver: every distinct archived event once, in sequence order, inside
    the window (see the module doc: de-duplication per event, the heap merge, memory).

    ``read_object(obj)`` yields the object's lines as dicts (the audit line shape,
    :func:`pipeline.render.event_to_record_dict`); it is called lazily, when the merge reaches
    ``obj.first_seq``, and its iterator is closed when exhausted or when this generator is closed.
    Counts ``duplicates`` (copies of an event already delivered or skipped), ``skipped_before`` and
    ``skipped_after`` into ``row`` (delivered events are counted by the caller); fills
    ``row.stream_arn`` from the first event. ``on_object(obj)`` runs after each object is read to
    its end. ``logger`` (structlog, optional) gets ``archive_copies_differ`` warnings.

    Raises ArchiveError for a line that is not a change event, or whose sequence number lies
    outside its object's key range or does not rise within the object (never skipped silently);
    whatever ``read_object`` raises passes through.
    """
    objects = list(shard.objects)
    heap: list[tuple[int, int, int, ChangeEvent, Mapping[str, Any]]] = []  # (seq, object index, line, event, record)
    open_objects: dict[int, _OpenObject] = {}

    def pull(index: int) -> None:
        """Read the next line of object ``index`` onto the heap, or close the object at its end."""
        current = open_objects[index]
        obj = current.obj
        for record in current.lines:
            current.line += 1
            try:
                event = event_from_record_dict(record)
                seq = int(event.sequence_number)
            except (DecodeError, ValueError, TypeError) as exc:
                raise ArchiveError(f"{obj.key} line {current.line}: not a change event ({exc}): "
                                   "the object is corrupt or not written by the s3_audit sink") from None
            if not current.low <= seq <= current.high:
                raise ArchiveError(f"{obj.key} line {current.line}: sequence number {event.sequence_number} is "
                                   "outside the object's key range: the object is corrupt or not written by the "
                                   "s3_audit sink")
            if current.last_seq is not None and seq <= current.last_seq:
                raise ArchiveError(f"{obj.key} line {current.line}: sequence number {event.sequence_number} does "
                                   "not rise within the object: the object is corrupt or not written by the "
                                   "s3_audit sink")
            current.last_seq = seq
            heapq.heappush(heap, (seq, index, current.line, event, record))
            return
        del open_objects[index]
        current.close()
        if on_object is not None:
            on_object(obj)

    next_object = 0
    current_seq: int | None = None
    copies: dict[str, tuple[int, dict]] = {}  # stream ARN → (object index, record) of the current seq's first copy
    try:
        while True:
            # open every object whose range starts at or before the smallest line on the heap, so
            # no copy of that sequence number (nor a smaller one) is still unread
            while next_object < len(objects) and (not heap or int(objects[next_object].first_seq) <= heap[0][0]):
                index = next_object
                next_object += 1
                open_objects[index] = _OpenObject(objects[index], iter(read_object(objects[index])))
                pull(index)
            if not heap:
                break
            seq, index, _number, event, record = heapq.heappop(heap)
            pull(index)
            arn = event.source.stream_arn
            if seq != current_seq:
                current_seq, copies = seq, {}
            first_copy = copies.get(arn)
            if first_copy is not None:
                row.duplicates += 1
                if first_copy[1] != record and logger is not None:
                    logger.warning("archive_copies_differ", table=shard.table, shard_id=shard.shard_id,
                                   sequence_number=event.sequence_number, delivered_from=objects[first_copy[0]].key,
                                   ignored_from=objects[index].key)
                continue
            copies[arn] = (index, record)
            if not row.stream_arn:
                row.stream_arn = arn
            created = event.source.approximate_creation_time
            if created is not None:
                created = _utc(created)
                if since is not None and created < since:
                    row.skipped_before += 1
                    continue
                if until is not None and created > until:
                    row.skipped_after += 1
                    continue
            yield event
    finally:
        for current in open_objects.values():
            current.close()


@dataclass
class _OpenObject:
    """Internal: an object being merged — its lines (an iterator), the key range as integers, the
    number and sequence number of the last line read."""

    obj: ArchiveObject
    lines: Iterator[Mapping[str, Any]]
    line: int = 0
    last_seq: int | None = None

    @property
    def low(self) -> int:
        return int(self.obj.first_seq)

    @property
    def high(self) -> int:
        return int(self.obj.last_seq)

    def close(self) -> None:
        close = getattr(self.lines, "close", None)
        if close is not None:
            close()  # a GetObject stream: give the connection back


def batches(events: Iterable[ChangeEvent], *, table: str, shard_id: str,
            size: int = BATCH_MAX_EVENTS) -> Iterator[Batch]:
    """Cut ``events`` (one shard's, in order) into Batches of at most ``size`` (1..1000) events.

    Each batch's ``stream_arn`` is its first event's, ``checkpoint_sequence_number`` its last
    event's sequence number; ``extra`` says ``{"replay": "archive"}``.
    """
    if not 1 <= size <= BATCH_MAX_EVENTS:
        raise ValueError(f"batch size must be 1..{BATCH_MAX_EVENTS}, got {size}")
    chunk: list[ChangeEvent] = []

    def cut() -> Batch:
        return Batch(table=table, stream_arn=chunk[0].source.stream_arn, shard_id=shard_id, events=tuple(chunk),
                     checkpoint_sequence_number=chunk[-1].sequence_number, extra={"replay": "archive"})

    for event in events:
        chunk.append(event)
        if len(chunk) >= size:
            yield cut()
            chunk = []
    if chunk:
        yield cut()


# -- the whole replay ---------------------------------------------------------------------------


def _progress(console: Any, enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if console is None and enabled:
        console = Console(stderr=True)  # stdout stays for the summary / JSON
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("objects"),
                    TextColumn("{task.fields[changes]} changes"), TimeElapsedColumn(),
                    console=console, disable=not enabled)


def replay_archive(shards: Sequence[ArchiveShard], *,
                   read_object: Callable[[ArchiveObject], Iterable[Mapping[str, Any]]],
                   deliver: Callable[[Batch], None] | None, flush: Callable[[], None] | None,
                   since: datetime | None, until: datetime | None, dry_run: bool, sink_names: Sequence[str],
                   logger: Any, console: Any = None, progress: bool = True,
                   stop_event: threading.Event | None = None, batch_size: int = BATCH_MAX_EVENTS,
                   flush_every: int = FLUSH_EVERY_BATCHES) -> ReplayReport:
    """Replay ``shards`` (already in :func:`order_shards` order) and return the report.

    ``deliver(batch)`` gives one batch to every sink (e.g. :meth:`pipeline.runtime.fanout.FanOut.deliver`),
    ``flush()`` makes everything delivered durable; both are unused when ``dry_run`` (read and
    count only). ``since`` / ``until``: the window (see the module doc). ``logger``: structlog.
    ``console``: rich console of the progress bar over objects (default: stderr); ``progress``:
    show it. ``stop_event`` set (or Ctrl-C) → stop between batches, flush; the shard in progress and the
    rest end ``stopped``. An error from reading (ArchiveError) or delivering (FatalSinkError,
    DeliveryAborted, …) ends the shard in progress ``failed`` with the error text and the rest
    ``stopped``; after a read error the sinks are flushed, after a sink error they are not (and
    finished shards not yet covered by a flush end ``failed`` too). Nothing is raised. ``elapsed_s`` covers this call; ``dead_lettered`` is left 0
    for the caller (who owns the fan-out's counters).
    """
    since, until = normalize_window(since, until)
    started = time.monotonic()
    report = ReplayReport(mode="archive", dry_run=dry_run, sinks=list(sink_names), since=since, until=until)
    rows = [ShardReplay(table=s.table, stream_arn="", shard_id=s.shard_id,
                        parent_shard_id=",".join(s.parent_shard_ids) or None) for s in shards]
    report.shards = rows
    stop_event = stop_event or threading.Event()
    unflushed: list[ShardReplay] = []  # finished shards whose last batch no flush has covered yet
    batches_since_flush = 0

    def do_flush() -> None:
        nonlocal batches_since_flush
        if flush is not None and not dry_run:
            flush()
        for done in unflushed:
            done.ended = "archive_end"
        unflushed.clear()
        batches_since_flush = 0

    current: ShardReplay | None = None
    with _progress(console, progress) as bar:
        task = bar.add_task("archive", total=sum(len(s.objects) for s in shards), changes=0)
        delivered_total = 0
        try:
            for shard, row in zip(shards, rows):
                current = row
                if stop_event.is_set():
                    raise _Stopped()
                bar.update(task, description=f"{shard.table} {shard.shard_id}")
                events = shard_events(shard, read_object, row, since=since, until=until,
                                      on_object=lambda _o: bar.advance(task), logger=logger)
                for batch in _closing(batches(events, table=shard.table, shard_id=shard.shard_id, size=batch_size),
                                      events):
                    if stop_event.is_set():
                        raise _Stopped()
                    if not dry_run and deliver is not None:
                        deliver(batch)
                        batches_since_flush += 1
                    for event in batch.events:
                        row.count(event)
                    delivered_total += len(batch.events)
                    bar.update(task, changes=delivered_total)
                    if batches_since_flush >= flush_every:
                        do_flush()
                unflushed.append(row)
                logger.info("archive_shard_read", table=shard.table, shard_id=shard.shard_id,
                            parent_shard_ids=list(shard.parent_shard_ids), delivered=row.delivered,
                            duplicates=row.duplicates, skipped_before=row.skipped_before,
                            skipped_after=row.skipped_after, dry_run=dry_run)
            current = None
            do_flush()
        except (_Stopped, KeyboardInterrupt):
            _end_rest(rows, current, "stopped", "interrupted")
            _flush_after_error(do_flush, report, unflushed, logger)
        except Exception as exc:  # ArchiveError, FatalSinkError, DeliveryAborted, a sink's bug
            text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CdcError) else str(exc)
            if current is None:  # the final flush failed: nothing since the last flush is durable
                for done in unflushed:
                    done.ended, done.error = "failed", f"flush failed: {text}"
                unflushed.clear()
                report.problems.append(f"final flush failed: {text}")
            else:
                _end_rest(rows, current, "failed", text)
                if isinstance(exc, ArchiveError):  # the sinks are fine: make finished shards durable
                    _flush_after_error(do_flush, report, unflushed, logger)
                else:  # a sink failed: flushing it again could block; finished shards are not durable
                    for done in unflushed:
                        done.ended, done.error = "failed", f"not flushed after a sink error: {text}"
                    unflushed.clear()
            logger.error("archive_replay_failed", error=text[:500],
                         shard_id=current.shard_id if current is not None else None)
    report.elapsed_s = time.monotonic() - started
    return report


def _closing(items: Iterator[Batch], events: Iterator[ChangeEvent]) -> Iterator[Batch]:
    """``items``, closing ``events`` (and so the open GetObject streams) when done or abandoned."""
    try:
        yield from items
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


class _Stopped(Exception):
    """Internal: the stop event was set."""


def _end_rest(rows: list[ShardReplay], current: ShardReplay | None, how: str, error: str) -> None:
    """Mark ``current`` ``how`` with ``error``, and every shard not yet started ``stopped``."""
    reached = current is None
    for row in rows:
        if row is current:
            row.ended, row.error = how, error
            reached = True
        elif reached and not row.ended:
            row.ended = "stopped"


def _flush_after_error(do_flush: Callable[[], None], report: ReplayReport, unflushed: list[ShardReplay],
                       logger: Any) -> None:
    """Flush what was delivered before an error, so finished shards can still count as complete."""
    try:
        do_flush()
    except Exception as exc:  # noqa: BLE001 - reported, the replay is already failing
        text = f"{type(exc).__name__}: {exc}"
        for row in unflushed:
            row.ended, row.error = "failed", f"flush failed: {text}"
        unflushed.clear()
        report.problems.append(f"flush after the error failed: {text}")
        logger.error("archive_replay_flush_failed", error=text[:500])
