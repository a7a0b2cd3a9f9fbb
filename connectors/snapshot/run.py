"""Composing a snapshot: table, reader (Scan or export), progress store, sinks, fan-out, runner.

Used by ``ddb-cdc snapshot`` (:mod:`connectors.app.cli_snapshot`) and by a worker group with
``source.initial_snapshot: true`` (:mod:`connectors.snapshot.initial`).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from connectors.app.wiring import build_dead_letter, build_lease_store
from connectors.aws import make_client
from pipeline.runtime.sink_lifecycle import close_sinks, open_sink
from connectors.snapshot.scan import ScanReader, TableInfo, describe_table
from pipeline.config import Settings
from pipeline.errors import ConfigError, SnapshotError
from pipeline.replay.stream import guard_sinks
from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.snapshot.plan import default_segments, new_snapshot_id
from pipeline.snapshot.progress import SegmentProgress, SnapshotMeta, SnapshotProgressStore, SnapshotState
from pipeline.snapshot.ratelimit import DEFAULT_MAX_RCU, RcuLimiter
from pipeline.snapshot.report import SnapshotReport
from pipeline.snapshot.runner import SnapshotRunner
from pipeline.snapshot.version import DEFAULT_MARGIN_S, snapshot_version

#: ``index.gc_deletes`` held on the indices a snapshot writes (see pipeline.snapshot.version).
SNAPSHOT_GC_DELETES = "12h"


@dataclass
class SnapshotOptions:
    """What to snapshot and how (the CLI flags): ``table`` (default: the configured table),
    ``segments`` (None: :func:`pipeline.snapshot.plan.default_segments`), ``max_rcu`` (RCU/s;
    0 = unlimited), ``consistent_read``, ``from_export`` (``s3://…/AWSDynamoDB/EXPORT_ID/``),
    ``dry_run``, ``new`` (start a new snapshot even if one is unfinished), ``margin_s``
    (:data:`pipeline.snapshot.version.DEFAULT_MARGIN_S`), ``started_at`` (T0; default now)."""

    table: str | None = None
    segments: int | None = None
    max_rcu: float = DEFAULT_MAX_RCU
    consistent_read: bool = False
    from_export: str | None = None
    dry_run: bool = False
    new: bool = False
    margin_s: float = DEFAULT_MARGIN_S
    started_at: datetime | None = None


def configured_table(settings: Settings, table: str | None) -> str:
    """``table``, else the one table of ``source.table`` / ``source.tables``. Raises ConfigError."""
    if table:
        return table
    tables = [value for kind, value in settings.source.stream_specs() if kind in ("table", "tables")]
    if len(tables) == 1:
        return tables[0]
    raise ConfigError([f"snapshot needs --table: the configuration names {len(tables)} table(s) "
                       f"({', '.join(tables) or 'only stream ARNs'})"])


class _NoStore:
    """An empty lease store (a dry run before the first snapshot)."""

    def in_namespace(self, _namespace: str) -> "_NoStore":
        return self

    def list_leases(self) -> list:
        return []


def _owner(settings: Settings) -> str:
    return f"snapshot:{settings.worker.lease_owner or socket.gethostname()}:{os.getpid()}"


def plan_snapshot(settings: Settings, opts: SnapshotOptions, *, store: Any = None,
                  logger: Any) -> tuple[Any, SnapshotState, bool, Any]:
    """(reader, state, is_new, progress store or None for a dry run) — nothing written for a dry run.
    Raises SnapshotError, ConfigError."""
    if opts.from_export:
        from connectors.snapshot.export import open_export

        reader, export_time, table = open_export(settings, opts.from_export, table=opts.table)
        started_at = export_time
        info = None
    else:
        table = configured_table(settings, opts.table)
        client = make_client("dynamodb", settings.aws, max_pool_connections=max(10, (opts.segments or 16) + 2))
        info = describe_table(client, table)
        reader = None
        started_at = opts.started_at or datetime.now(timezone.utc)
    cfg = settings.checkpoints
    if store is None and opts.dry_run and cfg.store == "sqlite" and not os.path.isfile(cfg.sqlite_path):
        store = _NoStore()  # a dry run creates no SQLite file
    store = store if store is not None else build_lease_store(settings)
    progress = SnapshotProgressStore(store, _owner(settings))
    if not opts.dry_run:
        store.ensure_table()
        existing = None if opts.new else progress.running(table)
    else:
        try:
            existing = None if opts.new else progress.running(table)
        except Exception:  # noqa: BLE001 - a dry run with no lease table yet plans a new snapshot
            existing = None
    if existing is not None:
        meta = existing.meta
        if opts.from_export and meta.export != opts.from_export:
            existing = None  # a different export is a different snapshot
    if existing is not None:
        state = existing if opts.dry_run else progress.take(existing.meta)
        is_new = False
    else:
        segments = (reader.segments if reader is not None else
                    opts.segments or default_segments(info.size_bytes, info.item_count))
        if segments < 1:
            raise ConfigError([f"--segments {segments}: must be at least 1"])
        meta = SnapshotMeta(table=table, snapshot_id=new_snapshot_id(started_at), started_at=started_at,
                            version=snapshot_version(started_at, opts.margin_s), segments=segments,
                            source="export" if opts.from_export else "scan", export=opts.from_export,
                            margin_s=opts.margin_s)
        state = (SnapshotState(meta, [SegmentProgress(s) for s in range(segments)]) if opts.dry_run
                 else progress.create(meta))
        is_new = True
    if reader is None:
        reader = ScanReader(client, table, key_names=info.key_names, segments=state.meta.segments,
                            consistent_read=opts.consistent_read)
    reader.table_info = info
    return reader, state, is_new, (None if opts.dry_run else progress)


def run_snapshot(settings: Settings, opts: SnapshotOptions, *, sinks: Sequence[Any], logger: Any,
                 stop_event: threading.Event | None = None, on_tick: Callable[[SnapshotReport], None] | None = None,
                 store: Any = None, limiter: RcuLimiter | None = None,
                 on_plan: Callable[[SnapshotState], None] | None = None) -> SnapshotReport:
    """Run (or resume, or plan with ``opts.dry_run``) a snapshot into ``sinks`` (sink instances,
    not opened: opened, guarded and closed here) and return the report.

    A dry run reads nothing from the table and writes nothing anywhere: it reports the plan
    (segments, version, where an unfinished snapshot would resume, the table's size).
    Raises SnapshotError / ConfigError before anything is delivered; later failures are in the
    report (``ended = failed``)."""
    reader, state, is_new, progress = plan_snapshot(settings, opts, store=store, logger=logger)
    if on_plan is not None:
        on_plan(state)
    info: TableInfo | None = getattr(reader, "table_info", None)
    hint = info.item_count if info is not None else getattr(reader, "item_count", None)
    limiter = limiter or RcuLimiter(opts.max_rcu or None, segments=state.meta.segments)
    if opts.dry_run:
        m = state.meta
        report = SnapshotReport(snapshot_id=m.snapshot_id, table=m.table, source=m.source, version=m.version,
                                started_at=m.started_at, segments=m.segments, sinks=[s.name for s in sinks],
                                items=state.items, segments_done=state.segments_done, resumed=not is_new,
                                ended="planned", dry_run=True, total_items_hint=hint, export=m.export,
                                max_rcu=limiter.max_rcu)
        if info is not None:
            report.notes.append(f"DescribeTable: ~{info.item_count} items, ~{info.size_bytes} bytes "
                                "(updated about every 6 hours)")
            if limiter.max_rcu and info.size_bytes:
                per_4kb = 1.0 if opts.consistent_read else 0.5
                rcu = info.size_bytes / 4096 * per_4kb
                report.notes.append(f"estimated {rcu:.0f} RCU, ≥ {rcu / limiter.max_rcu:.0f} s at --max-rcu "
                                    f"{limiter.max_rcu:g}")
        report.notes.append("would resume the unfinished snapshot" if not is_new else "would start a new snapshot")
        return report
    guard_sinks(sinks, gc_deletes=SNAPSHOT_GC_DELETES, repair=False, tables=[state.meta.table])
    log = logger.bind(snapshot_id=state.meta.snapshot_id)
    dead_letter = build_dead_letter(settings)
    opened: list = []
    try:
        for sink in sinks:
            open_sink(sink, worker_id=_owner(settings), logger=log, aws=settings.aws, dead_letter=dead_letter)
            opened.append(sink)
    except BaseException:
        close_sinks(opened, log)
        raise
    configs = {c.name: c for c in settings.sinks}
    runners = [SinkRunner(sink, FailurePolicy.from_config(configs.get(sink.name))) for sink in opened]
    stop_event = stop_event or threading.Event()
    fanout = FanOut(runners, dead_letter, stop_event=stop_event, logger=log)
    try:
        runner = SnapshotRunner(reader=reader, progress=progress, state=state, deliver=fanout.deliver,
                                flush=fanout.flush, dead_letter=dead_letter, limiter=limiter, logger=log,
                                stop_event=stop_event, on_tick=on_tick, sink_names=[s.name for s in sinks],
                                total_items_hint=hint)
        report = runner.run()
    finally:
        close_sinks(opened, log)
        progress.release()
    report.sink_dead_lettered = sum(r.stats.dead_lettered for r in runners)
    report.max_rcu = limiter.max_rcu
    return report


def abandon_snapshot(settings: Settings, table: str) -> int:
    """Delete the unfinished snapshot of ``table`` from the lease store (``--abandon``); returns the
    number of leases removed. Raises SnapshotError when there is none."""
    progress = SnapshotProgressStore(build_lease_store(settings), _owner(settings))
    state = progress.running(table)
    if state is None:
        raise SnapshotError(f"no unfinished snapshot of table {table!r} in the lease store")
    return progress.delete(state)
