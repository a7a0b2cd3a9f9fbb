"""Snapshots in ``ddb-cdc status``: one row per snapshot found in the lease store."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from pipeline.snapshot.progress import SnapshotState


def snapshot_rows(states: Sequence[SnapshotState], now: datetime | None = None) -> list[dict[str, Any]]:
    """JSON-safe rows: table, snapshot_id, state (running | done), source, segments,
    segments_done, items (delivered durably), started_at, age_s (since T0), last_progress_at
    (the newest segment checkpoint, ISO 8601 or None)."""
    now = now or datetime.now(timezone.utc)
    rows = []
    for state in states:
        m = state.meta
        updated = [s.updated_at for s in state.segments if s.updated_at]
        rows.append({"table": m.table, "snapshot_id": m.snapshot_id, "state": m.state, "source": m.source,
                     "export": m.export, "segments": m.segments, "segments_done": state.segments_done,
                     "items": state.items, "started_at": m.started_at.isoformat(),
                     "age_s": round((now - m.started_at).total_seconds(), 1),
                     "last_progress_at": max(updated) if updated else None})
    return rows


def render_snapshot_rows(rows: Sequence[dict[str, Any]], console: Any = None) -> None:
    """Print the rows as a rich table (nothing when there are none)."""
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="snapshots")
    for column in ("table", "snapshot", "state", "source", "segments", "items", "age"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["table"], r["snapshot_id"], r["state"], r["source"], f"{r['segments_done']}/{r['segments']}",
                      str(r["items"]), f"{r['age_s']:.0f} s")
    console.print(table)
