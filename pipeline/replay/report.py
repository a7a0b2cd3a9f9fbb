"""What a replay did, per shard: counts, time range, how each shard ended; the final summary.

Shared by the stream replay (:mod:`pipeline.replay.stream`) and the archive replay
(:mod:`pipeline.replay.archive`), so both print the same table and JSON.

How a shard can end (``ShardReplay.ended``):

- ``shard_end`` — the shard is closed and was read to its end (stream replay);
- ``until`` — a record past ``--until`` was reached; it and later ones were not replayed;
- ``caught_up`` — an open shard was read up to the stream's newest record (stream replay);
- ``archive_end`` — every archived object of the shard was read (archive replay);
- ``not_asked`` — the shard lies outside what was asked for (e.g. ``--from sequence`` names
  other shards); nothing was read;
- ``gap`` — the start position is behind the stream's 24-hour trim horizon, the shard's head was
  trimmed before it was read (``--from time T``: its first readable record is after T and not its
  first), or the shard left the stream: records asked for are gone (use ``--from-archive``); also
  when ``on_trimmed: skip`` went on over such a gap;
- ``failed`` / ``stopped`` — an error, or the replay was interrupted.

A replay succeeds (exit 0) only when every shard ended in one of the first five and no change
was dead-lettered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.events import ChangeEvent

#: Endings that mean "reached the end of what was asked for".
COMPLETE_ENDINGS = frozenset({"shard_end", "until", "caught_up", "archive_end", "not_asked"})


@dataclass
class ShardReplay:
    """One shard's replay: ``delivered`` changes given to the sinks (or that would be, in a dry
    run), ``skipped_before`` / ``skipped_after`` outside the time window, ``duplicates`` (archive:
    the same sequence number in more than one object), the creation-time and sequence range of
    what was delivered, and ``ended`` (see the module doc) with ``error`` text."""

    table: str
    stream_arn: str
    shard_id: str
    parent_shard_id: str | None = None
    delivered: int = 0
    skipped_before: int = 0
    skipped_after: int = 0
    duplicates: int = 0
    first_time: datetime | None = None
    last_time: datetime | None = None
    first_sequence_number: str | None = None
    last_sequence_number: str | None = None
    ended: str = ""
    error: str = ""

    def count(self, event: ChangeEvent) -> None:
        """Count ``event`` as delivered and widen the time / sequence range."""
        self.delivered += 1
        created = event.source.approximate_creation_time
        if created is not None:
            if self.first_time is None or created < self.first_time:
                self.first_time = created
            if self.last_time is None or created > self.last_time:
                self.last_time = created
        if self.first_sequence_number is None:
            self.first_sequence_number = event.sequence_number
        self.last_sequence_number = event.sequence_number

    @property
    def complete(self) -> bool:
        return self.ended in COMPLETE_ENDINGS


@dataclass
class ReplayReport:
    """A whole replay. ``mode``: ``stream`` or ``archive``; ``since`` / ``until``: the window
    asked for (None = open); ``elapsed_s`` in seconds; ``dead_lettered``: changes a sink refused
    during the replay (in the dead-letter destination)."""

    mode: str
    dry_run: bool
    sinks: list[str]
    since: datetime | None = None
    until: datetime | None = None
    shards: list[ShardReplay] = field(default_factory=list)
    dead_lettered: int = 0
    elapsed_s: float = 0.0
    replay_id: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def delivered(self) -> int:
        return sum(s.delivered for s in self.shards)

    @property
    def ok(self) -> bool:
        """True when every shard reached the end of what was asked and nothing was dead-lettered."""
        return all(s.complete for s in self.shards) and not self.dead_lettered and not self.problems


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def replay_report_to_dict(report: ReplayReport) -> dict[str, Any]:
    """The report as JSON-safe data (stable keys; times as ISO 8601)."""
    return {
        "mode": report.mode, "dry_run": report.dry_run, "replay_id": report.replay_id,
        "sinks": list(report.sinks), "since": _iso(report.since), "until": _iso(report.until),
        "delivered": report.delivered, "dead_lettered": report.dead_lettered,
        "elapsed_s": round(report.elapsed_s, 3), "ok": report.ok, "problems": list(report.problems),
        "shards": [{
            "table": s.table, "stream_arn": s.stream_arn, "shard_id": s.shard_id,
            "parent_shard_id": s.parent_shard_id, "delivered": s.delivered,
            "skipped_before": s.skipped_before, "skipped_after": s.skipped_after,
            "duplicates": s.duplicates, "first_time": _iso(s.first_time), "last_time": _iso(s.last_time),
            "first_sequence_number": s.first_sequence_number, "last_sequence_number": s.last_sequence_number,
            "ended": s.ended, "error": s.error,
        } for s in report.shards],
    }


def _time_range(s: ShardReplay) -> str:
    if s.first_time is None:
        return "-"
    fmt = "%Y-%m-%d %H:%M:%S"
    return f"{s.first_time.strftime(fmt)} → {s.last_time.strftime(fmt) if s.last_time else '?'}"


def render_replay_report(report: ReplayReport, console: Any = None) -> None:
    """Print the per-shard table and a one-line verdict with rich (to ``console``, default stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    verb = "would replay" if report.dry_run else "replayed"
    table = Table(title=f"{report.mode} replay{' (dry run)' if report.dry_run else ''}"
                        f"{' ' + report.replay_id if report.replay_id else ''}")
    for column in ("table", "shard", "changes", "skipped", "time range (UTC)", "ended"):
        table.add_column(column, justify="right" if column in ("changes", "skipped") else "left")
    for s in report.shards:
        skipped = s.skipped_before + s.skipped_after + s.duplicates
        ended = s.ended + (f": {s.error}" if s.error else "")
        table.add_row(s.table, s.shard_id, str(s.delivered), str(skipped), _time_range(s), ended)
    console.print(table)
    for line in report.problems:
        console.print(f"problem: {line}")
    incomplete = [s for s in report.shards if not s.complete]
    where = f" into {', '.join(report.sinks)}" if report.sinks and not report.dry_run else ""
    verdict = (f"{verb} {report.delivered} change(s) from {len(report.shards)} shard(s){where} "
               f"in {report.elapsed_s:.1f} s")
    if report.dead_lettered:
        verdict += f"; {report.dead_lettered} dead-lettered (see `ddb-cdc dlq list`)"
    if incomplete:
        verdict += f"; {len(incomplete)} shard(s) did not reach the end asked for"
    console.print(("OK: " if report.ok else "INCOMPLETE: ") + verdict)
