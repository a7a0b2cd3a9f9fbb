"""The snapshot's report: what was read and delivered, and at what cost; JSON and a rich table."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class SnapshotReport:
    """Totals over every run of one snapshot (a resumed run includes what earlier runs delivered).

    ``items`` read (delivered + ``dead_lettered`` decode failures), ``pages``, ``bytes``
    (approximate item bytes), ``rcu`` consumed (ConsumedCapacity), ``throttles`` (throttled
    calls backed off in this run), ``elapsed_s`` and ``items_this_run`` (this run only),
    ``ended``: done | stopped | failed | planned (dry run).
    """

    snapshot_id: str
    table: str
    source: str
    version: int
    started_at: datetime
    segments: int
    sinks: list[str] = field(default_factory=list)
    segments_done: int = 0
    items: int = 0
    pages: int = 0
    bytes: int = 0
    rcu: float = 0.0
    dead_lettered: int = 0
    sink_dead_lettered: int = 0
    throttles: int = 0
    elapsed_s: float = 0.0
    items_this_run: int = 0
    resumed: bool = False
    ended: str = ""
    error: str = ""
    dry_run: bool = False
    total_items_hint: int | None = None
    export: str | None = None
    max_rcu: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        """Items of this run per second of this run."""
        return self.items_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True when the snapshot is complete (or planned) and nothing was dead-lettered."""
        return self.ended in ("done", "planned") and not self.dead_lettered and not self.sink_dead_lettered


def snapshot_report_to_dict(report: SnapshotReport) -> dict[str, Any]:
    """The report as JSON-safe data (stable keys)."""
    return {
        "snapshot_id": report.snapshot_id, "table": report.table, "source": report.source, "export": report.export,
        "version": report.version, "started_at": report.started_at.isoformat(), "segments": report.segments,
        "segments_done": report.segments_done, "sinks": report.sinks, "items": report.items, "pages": report.pages,
        "bytes": report.bytes, "consumed_rcu": round(report.rcu, 3), "throttles": report.throttles,
        "dead_lettered": report.dead_lettered + report.sink_dead_lettered,
        "elapsed_s": round(report.elapsed_s, 3), "items_this_run": report.items_this_run,
        "items_per_s": round(report.items_per_s, 1), "resumed": report.resumed, "ended": report.ended,
        "error": report.error or None, "dry_run": report.dry_run, "max_rcu": report.max_rcu,
        "table_item_count": report.total_items_hint, "notes": report.notes, "ok": report.ok,
    }


def render_snapshot_report(report: SnapshotReport, console: Any = None) -> None:
    """Print the report as a rich table (stdout unless ``console`` is given)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"snapshot {report.snapshot_id} of {report.table} ({report.source}{', dry run' if report.dry_run else ''})"
    table = Table(title=title, show_header=False)
    rows = [
        ("ended", report.ended + (f": {report.error}" if report.error else "")),
        ("sinks", ", ".join(report.sinks) or "-"),
        ("segments", f"{report.segments_done}/{report.segments} done"),
        ("items", f"{report.items}" + (f" of ~{report.total_items_hint}" if report.total_items_hint else "")),
        ("pages", str(report.pages)),
        ("bytes", str(report.bytes)),
        ("consumed RCU", f"{report.rcu:.1f}" + (f" (limit {report.max_rcu:g}/s)" if report.max_rcu else "")),
        ("throttled calls", str(report.throttles)),
        ("dead letters", str(report.dead_lettered + report.sink_dead_lettered)),
        ("this run", f"{report.items_this_run} items in {report.elapsed_s:.1f} s ({report.items_per_s:.0f} items/s)"),
        ("version", f"{report.version} (high part {report.version >> 32})"),
        ("started at", report.started_at.isoformat()),
    ]
    if report.resumed:
        rows.append(("resumed", "yes: continued from the stored segment checkpoints"))
    for note in report.notes:
        rows.append(("note", note))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
