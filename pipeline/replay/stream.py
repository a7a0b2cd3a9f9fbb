"""Stream replay: a separate, finite consumer in its own lease namespace.

``ddb-cdc replay --from …`` reads the stream again into chosen sinks while the live worker keeps
running. It is an ordinary :class:`pipeline.runtime.worker.Worker` (lineage order, checkpoints, dead
letters, backoff) with three differences:

- its leases live in the namespace ``replay-{id}`` of the same lease store, created up front at
  the positions asked for, so the live consumer's leases and checkpoints are never touched;
- its shard readers have a :class:`pipeline.runtime.shard_consumer.ReadWindow`: records before
  ``since`` are skipped, a shard ends at the first record after ``until`` (default: the moment
  the replay started) or once an open shard is caught up; finished leases are SHARD_END in the
  namespace, and the worker exits when every shard is done;
- it delivers only to the sinks named with ``--sink``.

Start positions (``--from``): ``trim-horizon`` (every shard from its oldest record);
``time T`` (DynamoDB Streams has no AT_TIMESTAMP iterator, so every shard is read from
TRIM_HORIZON and records created before T, by ApproximateCreationDateTime, are skipped; a head
trimmed after T is a gap, see :func:`checks_head`);
``sequence SHARD=SEQ`` (that shard from SEQ, the record included, and its descendants from their
start; other shards are not replayed); ``checkpoint-file FILE`` (an export of
``ddb-cdc checkpoints export``: each exported shard after its checkpoint, shards created since
from their start, ancestors of exported shards not at all).

A replay reader is one more reader of each shard: DynamoDB Streams serves about two readers per
shard before it throttles (LimitExceededException); throttled reads back off and retry.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from pipeline.checkpoint import Lease, lease_key_for
from pipeline.errors import CdcError
from pipeline.events import SHARD_END, TRIM_HORIZON
from pipeline.lineage import ancestors, parents_first
from pipeline.replay.report import ReplayReport, ShardReplay
from pipeline.codec import record_creation_time
from pipeline.checkpoint import AT_TIMESTAMP_PREFIX
from pipeline.runtime.shard_consumer import AT_SEQUENCE_PREFIX, FINISHED_OUTCOMES, ReadWindow, ShardOutcome
from pipeline.source import ShardInfo, StreamSource, TrimmedDataError
from pipeline.errors import ReplayError  # noqa: F401 (defined in the one error tree)



_UNITS_MS = {"nanos": 1e-6, "micros": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0,
             "d": 86_400_000.0}


def time_value_ms(text: str) -> float:
    """An OpenSearch time value (``500ms``, ``60s``, ``12h``, ``2d``; units nanos, micros, ms, s,
    m, h, d — OpenSearch "Common REST parameters", time units) in milliseconds.
    Raises ValueError for anything else."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(nanos|micros|ms|s|m|h|d)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a time value like 60s, 30m or 12h")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def new_replay_id(now: datetime | None = None) -> str:
    """``replay-20261122T101500-ab12cd`` (UTC start time and a random part)."""
    now = now or datetime.now(timezone.utc)
    return f"replay-{now.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class StartSpec:
    """Where a replay starts: ``kind`` is ``trim-horizon``, ``time``, ``sequence`` or
    ``checkpoint-file``; ``sequences`` maps shard id → sequence number (``sequence``);
    ``snapshot`` holds the leases of a checkpoint file; ``since`` the time (``time``)."""

    kind: str
    since: datetime | None = None
    sequences: Mapping[str, str] = field(default_factory=dict)
    snapshot: Sequence[Lease] = ()


def parse_time(text: str, what: str) -> datetime:
    """ISO 8601 → aware datetime (UTC assumed without an offset). Raises ReplayError."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"{what} {text!r} is not an ISO 8601 time (e.g. 2026-11-22T10:15:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def start_positions(spec: StartSpec, source: StreamSource, shards: Sequence[ShardInfo]) -> dict[str, str]:
    """shard id → the replay lease's first checkpoint (SHARD_END: not replayed)."""
    parents = {s.shard_id: s.parent_shard_id for s in shards}
    ids = [s.shard_id for s in shards]
    if spec.kind in ("trim-horizon", "time"):
        return {sid: TRIM_HORIZON for sid in ids}
    if spec.kind == "sequence":
        named = {sid: seq for sid, seq in spec.sequences.items() if sid in parents}
        out = {}
        for sid in ids:
            if sid in named:
                out[sid] = AT_SEQUENCE_PREFIX + named[sid]
            elif ancestors(sid, parents) & set(named):
                out[sid] = TRIM_HORIZON
            else:
                out[sid] = SHARD_END
        return out
    if spec.kind == "checkpoint-file":
        exported = {lease.shard_id: lease.checkpoint for lease in spec.snapshot if lease.stream_arn == source.stream_arn}
        older = set().union(*(ancestors(s, parents) for s in exported)) if exported else set()
        out = {}
        for sid in ids:
            if sid in exported:
                out[sid] = exported[sid]
            elif sid in older or not exported:
                out[sid] = SHARD_END
            else:
                out[sid] = TRIM_HORIZON
        return out
    raise ReplayError(f"unknown --from kind {spec.kind!r}")


def checks_head(spec: StartSpec, start: str) -> bool:
    """True when a replay lease starting at ``start`` must see its shard's head (its lease records
    the shard's StartingSequenceNumber and the reader runs the head check,
    :func:`pipeline.runtime.shard_consumer.head_trimmed`): it is read from TRIM_HORIZON (or an
    exported ``AT_TIMESTAMP:`` checkpoint) and something is asked of its head — records from
    ``--from time T`` on, or a shard read "from its start" (``sequence`` descendants,
    ``checkpoint-file`` shards). Not with ``--from trim-horizon``: the oldest record retained is
    what was asked for. A head trimmed before it was read is then a gap (the row ends ``gap``)."""
    return spec.kind != "trim-horizon" and (start == TRIM_HORIZON or start.startswith(AT_TIMESTAMP_PREFIX))


class StreamReplay:
    """Runs one replay. ``sources``: the configured streams; ``store``: the lease store in the
    replay's namespace (``drop_namespace`` is called after a complete replay); ``make_worker``:
    builds the :class:`~pipeline.runtime.worker.Worker` from keyword arguments (sources, lease_store,
    worker_id, read_window, on_event_counts, on_consumer_done)."""

    def __init__(self, *, sources: Sequence[StreamSource], store: Any, spec: StartSpec,
                 until: datetime | None, sink_names: Sequence[str], replay_id: str,
                 make_worker: Callable[..., Any], logger: Any, idle_reads: int = 5):
        self.sources = list(sources)
        self.store = store
        self.spec = spec
        self.until = until
        self.sink_names = list(sink_names)
        self.replay_id = replay_id
        self.make_worker = make_worker
        self.log = logger
        self.idle_reads = idle_reads
        self._rows: dict[tuple[str, str], ShardReplay] = {}
        self._lock = threading.Lock()
        self.worker: Any = None

    def _row(self, stream_arn: str, table: str, shard_id: str, parent: str | None = None) -> ShardReplay:
        with self._lock:
            row = self._rows.get((stream_arn, shard_id))
            if row is None:
                row = self._rows[(stream_arn, shard_id)] = ShardReplay(table=table, stream_arn=stream_arn,
                                                                       shard_id=shard_id, parent_shard_id=parent)
            return row

    def prepare(self) -> int:
        """Create the namespace's leases at the start positions; returns how many shards will be read.
        Raises ReplayError when ``--from sequence`` names a shard that is in no stream."""
        if self.spec.kind == "sequence":
            known = set()
            for source in self.sources:
                known |= {s.shard_id for s in source.list_shards()}
            missing = sorted(set(self.spec.sequences) - known)
            if missing:
                raise ReplayError(f"--from sequence: shard(s) {', '.join(missing)} not in any configured stream; "
                                  "`ddb-cdc checkpoints list` shows the shards")
        self.store.ensure_table()
        live = self.store.in_namespace("") if hasattr(self.store, "in_namespace") else None
        asked = 0
        for source in self.sources:
            shards = source.list_shards()
            positions = start_positions(self.spec, source, shards)
            for shard in shards:
                start = positions[shard.shard_id]
                row = self._row(source.stream_arn, source.table, shard.shard_id, shard.parent_shard_id)
                if start == SHARD_END:
                    row.ended = "not_asked"
                else:
                    asked += 1
                key = lease_key_for(source.table, source.stream_arn, shard.shard_id)
                # the live lease's version floor, so a replay gives the live versions even when it
                # starts after a split or inside a parent (see pipeline.codec.record_version)
                live_lease = live.get_lease(key) if live is not None else None
                self.store.create_lease_if_absent(Lease(
                    lease_key=key, table=source.table,
                    stream_arn=source.stream_arn, shard_id=shard.shard_id, checkpoint=start,
                    parent_shard_ids=(shard.parent_shard_id,) if shard.parent_shard_id else (),
                    version_floor=live_lease.version_floor if live_lease is not None else None,
                    starting_sequence_number=shard.starting_sequence_number if checks_head(self.spec, start)
                    else None))
        return asked

    def _on_counts(self, consumer: Any, *, delivered, skipped_before: int, skipped_after: int) -> None:
        row = self._row(consumer.source.stream_arn, consumer.source.table, consumer.shard_id)
        with self._lock:
            for event in delivered:
                row.count(event)
            row.skipped_before += skipped_before
            row.skipped_after += skipped_after

    def _on_done(self, consumer: Any) -> None:
        row = self._row(consumer.source.stream_arn, consumer.source.table, consumer.shard_id)
        outcome = consumer.outcome or ShardOutcome.FAILED
        with self._lock:
            if outcome == ShardOutcome.TRIMMED:
                row.ended, row.error = "gap", str(consumer.error or "")[:300]
            elif consumer.stats.gaps:  # on_trimmed: skip went on over a recorded gap: still not complete
                row.ended, row.error = "gap", (f"{consumer.stats.gaps} gap(s) recorded and skipped "
                                               f"(on_trimmed: skip); see the log's trimmed_data_gap")
            elif outcome in FINISHED_OUTCOMES | {ShardOutcome.STOPPED, ShardOutcome.FAILED}:
                row.ended = str(outcome)
                row.error = str(consumer.error or "")[:300] if outcome in (ShardOutcome.FAILED, ShardOutcome.STOPPED) else ""

    def run(self, *, on_tick: Callable[["StreamReplay"], None] | None = None) -> ReplayReport:
        """Run the replay to its end (or until :meth:`stop`); returns the report."""
        started = time.monotonic()
        window = ReadWindow(since=self.spec.since, until=self.until, finish_when_caught_up=True,
                            idle_reads=self.idle_reads)
        self.worker = self.make_worker(lease_store=self.store, worker_id=self.replay_id, read_window=window,
                                       on_event_counts=self._on_counts, on_consumer_done=self._on_done)
        result: dict[str, int] = {}
        thread = threading.Thread(target=lambda: result.setdefault("code", self.worker.run()),
                                  name="replay-worker", daemon=True)
        thread.start()
        while thread.is_alive():
            if on_tick is not None:
                on_tick(self)
            thread.join(0.2)
        if on_tick is not None:
            on_tick(self)
        report = ReplayReport(mode="stream", dry_run=False, sinks=self.sink_names, since=self.spec.since,
                              until=self.until, replay_id=self.replay_id)
        finished = {lease.shard_id: lease for lease in self._safe_leases()}
        for key, row in sorted(self._rows.items(), key=lambda kv: (kv[1].table, kv[1].shard_id)):
            if not row.ended:
                lease = finished.get(row.shard_id)
                row.ended = "shard_end" if lease is not None and lease.finished else "stopped"
            report.shards.append(row)
        report.dead_lettered = sum(r.stats.dead_lettered for r in self.worker.runners)
        report.elapsed_s = time.monotonic() - started
        if result.get("code", 1) != 0 and all(r.complete for r in report.shards):
            report.problems.append("the replay worker stopped with errors (see the log)")
        if report.ok:
            try:
                self.store.drop_namespace()
            except (CdcError, ValueError) as exc:
                self.log.warning("replay_cleanup_failed", replay_id=self.replay_id, error=str(exc))
        else:
            self.log.warning("replay_incomplete", replay_id=self.replay_id,
                             hint=f"its leases are kept in namespace {self.replay_id} of the lease store")
        return report

    def _safe_leases(self) -> list[Lease]:
        try:
            return self.store.list_leases()
        except CdcError:
            return []

    def stop(self) -> None:
        """Stop the replay (flushes, checkpoints in the namespace, exits)."""
        if self.worker is not None:
            self.worker.stop()

    def progress(self) -> tuple[int, int, int]:
        """(changes delivered so far, shards done, shards asked for)."""
        with self._lock:
            rows = list(self._rows.values())
        asked = [r for r in rows if r.ended != "not_asked"]
        return sum(r.delivered for r in rows), sum(1 for r in asked if r.ended), len(asked)


def _topological(shards: Sequence[ShardInfo]) -> list[ShardInfo]:
    """Parents before children, else in listing order (:func:`pipeline.lineage.parents_first`)."""
    return parents_first(shards, shard_id=lambda s: s.shard_id, parents=lambda s: s.parent_shard_id)


def dry_run(sources: Sequence[StreamSource], spec: StartSpec, until: datetime | None, *,
            max_records_per_call: int = 1000, idle_reads: int = 5,
            on_tick: Callable[[int, int, int], None] | None = None) -> ReplayReport:
    """Count per shard what a replay would deliver (and its time range); sends nothing, writes
    no lease. Reads the stream exactly as the replay would (same window rules)."""
    from pipeline.runtime.shard_consumer import shard_closed_epoch
    from pipeline.source import IteratorExpiredError

    started = time.monotonic()
    report = ReplayReport(mode="stream", dry_run=True, sinks=[], since=spec.since, until=until)
    plan = []
    for source in sources:
        shards = _topological(source.list_shards())
        positions = start_positions(spec, source, shards)
        children: dict[str, list[str]] = {}
        for shard in shards:
            if shard.parent_shard_id:
                children.setdefault(shard.parent_shard_id, []).append(shard.shard_id)
        plan.extend((source, shard, positions[shard.shard_id], shard_closed_epoch(children.get(shard.shard_id, ())))
                    for shard in shards)
    asked = sum(1 for _, _, start, _ in plan if start != SHARD_END)
    done = delivered = 0
    for source, shard, start, closed_at in plan:
        row = ShardReplay(table=source.table, stream_arn=source.stream_arn, shard_id=shard.shard_id,
                          parent_shard_id=shard.parent_shard_id)
        report.shards.append(row)
        if start == SHARD_END:
            row.ended = "not_asked"
            continue
        try:
            row.ended = _count_shard(source, shard, start, spec.since, until, row, max_records_per_call, idle_reads,
                                     starting_sequence_number=shard.starting_sequence_number
                                     if checks_head(spec, start) else None, closed_at=closed_at)
        except TrimmedDataError as exc:
            row.ended, row.error = "gap", str(exc)[:300]
        except IteratorExpiredError as exc:  # pragma: no cover - a dry run reads continuously
            row.ended, row.error = "failed", str(exc)[:300]
        done += 1
        delivered += row.delivered
        if on_tick is not None:
            on_tick(delivered, done, asked)
    report.elapsed_s = time.monotonic() - started
    return report


def _count_shard(source: StreamSource, shard: ShardInfo, start: str, since: datetime | None,
                 until: datetime | None, row: ShardReplay, limit: int, idle_reads: int, *,
                 starting_sequence_number: str | None = None, closed_at: float | None = None) -> str:
    """Count one shard for :func:`dry_run`; returns how it ended. With ``starting_sequence_number``
    (:func:`checks_head`) the head check runs as in the replay's reader: a trimmed head ends the
    row as ``gap`` (raises TrimmedDataError). ``closed_at``: when the shard closed (epoch s, from its
    children's ids: :func:`pipeline.runtime.shard_consumer.shard_closed_epoch`), None if unknown."""
    from pipeline.events import LATEST
    from pipeline.runtime.shard_consumer import head_trimmed

    if start in (TRIM_HORIZON, LATEST):
        iterator = source.get_iterator(shard.shard_id, start)
    elif start.startswith(AT_TIMESTAMP_PREFIX):  # a LATEST start made concrete: from TRIM_HORIZON, not before T
        bound = datetime.fromtimestamp(float(start[len(AT_TIMESTAMP_PREFIX):]), tz=timezone.utc)
        since = bound if since is None else max(since, bound)
        iterator = source.get_iterator(shard.shard_id, TRIM_HORIZON)
    elif start.startswith(AT_SEQUENCE_PREFIX):
        iterator = source.get_iterator(shard.shard_id, "AT_SEQUENCE_NUMBER", start[len(AT_SEQUENCE_PREFIX):])
    else:
        iterator = source.get_iterator(shard.shard_id, "AFTER_SEQUENCE_NUMBER", start)
    # the head check of the replay's reader (ShardConsumer._check_head), on the first record with
    # a sequence number or when the shard's reading ends without one
    head_pending = (start == TRIM_HORIZON or start.startswith(AT_TIMESTAMP_PREFIX)) and (
        starting_sequence_number is not None or since is not None)

    def check_head(records: Sequence[Any] | None) -> None:
        nonlocal head_pending
        first = created = None
        if records is not None:
            record = next((r for r in records if str(((r.get("dynamodb") or {}).get("SequenceNumber")) or "")
                           .isdigit()), None)
            if record is None:
                return
            first, created = record["dynamodb"]["SequenceNumber"], record_creation_time(record)
        head_pending = False
        if head_trimmed(shard.shard_id, first_sequence_number=first,
                        first_created=created.timestamp() if created is not None else None,
                        starting_sequence_number=starting_sequence_number,
                        since=since.timestamp() if since is not None else None, now_s=time.time(),
                        closed_at=closed_at):
            raise TrimmedDataError(f"shard {shard.shard_id}: records asked for were trimmed before they were "
                                   f"read (its first readable record: {first or 'none'})")

    empty = 0
    while True:
        result = source.get_records(iterator, limit)
        if head_pending and result.records:
            check_head(result.records)
        if result.records:
            empty = 0
            for record in result.records:
                created = record_creation_time(record)
                if created is not None and until is not None and created > until:
                    row.skipped_after += 1
                    return "until"
                if created is not None and since is not None and created < since:
                    row.skipped_before += 1
                    continue
                row.delivered += 1
                if created is not None:
                    row.first_time = row.first_time or created
                    row.last_time = created
                seq = (record.get("dynamodb") or {}).get("SequenceNumber")
                row.first_sequence_number = row.first_sequence_number or seq
                row.last_sequence_number = seq
        else:
            empty += 1
        ends = result.next_iterator is None or (not result.records and empty >= idle_reads)
        if ends and head_pending and row.delivered + row.skipped_before == 0:
            check_head(None)
        if result.next_iterator is None:
            return "shard_end"
        if not result.records and empty >= idle_reads:
            return "caught_up"
        iterator = result.next_iterator


# --------------------------------------------------------------------------------------------
# Deletes: what a replay into a state-keeping sink (OpenSearch) must know
# --------------------------------------------------------------------------------------------


@dataclass
class SupersededScan:
    """The result of :func:`scan_superseded`: ``keys`` — ``(table, key_id)`` of the items changed
    in the window *and* after ``until``; ``in_window`` — how many distinct items changed in the
    window; ``records`` — records read."""

    keys: set[tuple[str, str]] = field(default_factory=set)
    in_window: int = 0
    records: int = 0


def scan_superseded(sources: Sequence[StreamSource], since: datetime | None, until: datetime, *,
                    max_records_per_call: int = 1000, idle_reads: int = 5) -> SupersededScan:
    """Find the items whose change in the window ``[since, until]`` is followed by a later change
    (ApproximateCreationDateTime after ``until``) — by reading every shard of every stream from
    TRIM_HORIZON to its end (SHARD_END, or ``idle_reads`` empty reads in a row), parents first.

    Why: a windowed replay (``--until`` before now) re-sends old changes. For an item changed
    after the window, the index already holds a newer state, or the item was deleted — and if
    the delete is older than ``index.gc_deletes`` OpenSearch has forgotten its version, so the
    window's INSERT/MODIFY would re-create the item. Leaving those items out is always right:
    their state was set by a change after the window, which the replay does not send.
    Completeness: every change of one item goes through one shard lineage, and shards are read
    parents first, so an item's window changes are seen before its later ones; changes made
    after this scan are written live while the replay holds ``index.gc_deletes`` raised.

    Cost: one more read of the stream (up to 24 h of records), memory for the ids of the items
    changed in the window. Records whose keys cannot be decoded are left out (the replay
    dead-letters them). Raises what the source raises (SourceError, TrimmedDataError).
    """
    from pipeline.codec import decode_item, key_id
    from pipeline.errors import DecodeError

    scan = SupersededScan()
    for source in sources:
        window: set[str] = set()
        for shard in _topological(source.list_shards()):
            iterator = source.get_iterator(shard.shard_id, TRIM_HORIZON)
            empty = 0
            while iterator is not None:
                result = source.get_records(iterator, max_records_per_call)
                empty = 0 if result.records else empty + 1
                for record in result.records:
                    scan.records += 1
                    created = record_creation_time(record)
                    if created is None or (since is not None and created < since):
                        continue
                    body = record.get("dynamodb") if isinstance(record, dict) else None
                    try:
                        item = key_id(decode_item((body or {}).get("Keys")) or {})
                    except (DecodeError, TypeError, ValueError, AttributeError):
                        continue
                    if created <= until:
                        window.add(item)
                    elif item in window:
                        scan.keys.add((source.table, item))
                iterator = result.next_iterator
                if not result.records and empty >= idle_reads:
                    break
        scan.in_window += len(window)
    return scan


def guard_sinks(sinks: Sequence[Any], *, gc_deletes: str | None, repair: bool,
                superseded: Any = frozenset(), tables: Sequence[str] = ()) -> list[str]:
    """Call ``prepare_replay(gc_deletes=…, repair=…, superseded=…, tables=…)`` on every sink that has it
    (state-keeping sinks: the built-in ``opensearch`` sink) before they are opened; returns their
    names. Other sinks get the replay as it is (Redis invalidation and the S3 audit log are
    idempotent; plugins compare ``event.version`` if order matters to them)."""
    names = []
    for sink in sinks:
        prepare = getattr(sink, "prepare_replay", None)
        if callable(prepare):
            prepare(gc_deletes=gc_deletes, repair=repair, superseded=superseded, tables=tables)
            names.append(sink.name)
    return names
