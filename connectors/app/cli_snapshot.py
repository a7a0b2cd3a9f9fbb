"""``ddb-cdc snapshot``: load a table's existing items into the sinks (initial load, backfill).

::

    ddb-cdc snapshot --config FILE [--sink NAME ...] [--table T] [--segments N] [--max-rcu R]
                     [--consistent-read] [--dry-run] [--json] [--new | --abandon]
    ddb-cdc snapshot --config FILE --from-export s3://bucket/prefix/AWSDynamoDB/EXPORT_ID/

A parallel Scan (or a DynamoDB export in S3) delivered as SNAPSHOT events to the chosen sinks
(default: every configured sink), resumable: rerun the same command after a crash or Ctrl-C and
it continues from each segment's last checkpoint (``--new`` starts over, ``--abandon`` deletes
the unfinished snapshot's progress). See :mod:`pipeline.snapshot` and the README, "Snapshot
and backfill".

Exit codes: 0 the snapshot is complete (or planned, with ``--dry-run``) and nothing was
dead-lettered; 1 it failed, stopped, or dead-lettered items; 2 invalid usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

import orjson

from pipeline.errors import ConfigError

EXIT_OK, EXIT_FAILED = 0, 1


def _sinks(settings: Any, names: list[str] | None, where: str) -> list:
    from pipeline.registry import build_sinks

    configured = [c.name for c in settings.sinks]
    unknown = [n for n in names or [] if n not in configured]
    if unknown:
        raise ConfigError([f"--sink {n!r} is not a configured sink; configured: {', '.join(configured) or 'none'}"
                           for n in unknown])
    chosen = [c for c in settings.sinks if not names or c.name in set(names)]
    if not chosen:
        raise ConfigError(["snapshot needs at least one sink: configure sinks[] or name them with --sink"])
    return build_sinks(chosen, where)


class _Progress:
    """A rich progress bar on stderr: items (of DescribeTable's ItemCount), items/s, segments done, ETA."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("items"), TextColumn("{task.fields[rate]} items/s"),
                                 TextColumn("segments {task.fields[segments]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), disable=not enabled, transient=False)
        self.task = None

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def tick(self, report: Any) -> None:
        total = max(report.total_items_hint or 0, report.items) or None
        if self.task is None:
            self.task = self.progress.add_task(f"snapshot {report.table}", total=total, rate="0",
                                               segments=f"0/{report.segments}")
        self.progress.update(self.task, completed=report.items, total=total, rate=f"{report.items_per_s:.0f}",
                             segments=f"{report.segments_done}/{report.segments}")


def cmd_snapshot(args: argparse.Namespace) -> int:
    """``ddb-cdc snapshot`` (see the module doc)."""
    from connectors.snapshot.run import SnapshotOptions, abandon_snapshot, configured_table, run_snapshot
    from pipeline.config import load_settings
    from pipeline.logs import configure_logging, get_logger, register_secrets_of
    from pipeline.snapshot.report import render_snapshot_report, snapshot_report_to_dict

    settings = load_settings(args.config)
    where = str(args.config) if args.config else "environment"
    configure_logging(settings.log.level, settings.log.format)
    register_secrets_of(settings)
    if args.segments is not None and args.segments < 1:
        raise ConfigError([f"--segments {args.segments}: must be at least 1"])
    if args.max_rcu < 0:
        raise ConfigError([f"--max-rcu {args.max_rcu:g}: must be >= 0 (0 = unlimited)"])
    if args.abandon:
        removed = abandon_snapshot(settings, configured_table(settings, args.table))
        print(f"abandoned the unfinished snapshot ({removed} lease(s) removed)", file=sys.stderr)
        return EXIT_OK
    sinks = _sinks(settings, args.sink, where)
    opts = SnapshotOptions(table=args.table, segments=args.segments, max_rcu=args.max_rcu,
                           consistent_read=args.consistent_read, from_export=args.from_export,
                           dry_run=args.dry_run, new=args.new)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    show = not args.json and not args.no_progress and sys.stderr.isatty()
    try:
        with _Progress(show) as bar:
            report = run_snapshot(settings, opts, sinks=sinks, logger=get_logger(command="snapshot"),
                                  stop_event=stop, on_tick=bar.tick if show else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print(orjson.dumps(snapshot_report_to_dict(report), option=orjson.OPT_INDENT_2).decode())
    else:
        render_snapshot_report(report)
    return EXIT_OK if report.ok else EXIT_FAILED


def add_parser(sub: Any) -> None:
    """Register ``snapshot`` on the ``ddb-cdc`` subparsers."""
    from pipeline.snapshot.ratelimit import DEFAULT_MAX_RCU

    p = sub.add_parser("snapshot", help="load the table's existing items into the sinks (parallel Scan or an export)")
    p.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                   help="YAML configuration file (default: $DDB_CDC_CONFIG; DDB_CDC_* env vars override it)")
    p.add_argument("--sink", action="append", metavar="NAME", help="deliver to this sink (repeatable; default: all)")
    p.add_argument("--table", help="table to snapshot (default: the configured source.table)")
    p.add_argument("--segments", type=int, default=None,
                   help="parallel Scan segments (default: one per GiB of TableSizeBytes, 4..16; 1 under 1,000 items)")
    p.add_argument("--max-rcu", type=float, default=DEFAULT_MAX_RCU,
                   help=f"read capacity units per second across segments (default {DEFAULT_MAX_RCU:g}; 0 = unlimited)")
    p.add_argument("--consistent-read", action="store_true", help="strongly consistent Scan (twice the RCU)")
    p.add_argument("--from-export", metavar="S3_URI",
                   help="read a DynamoDB export (DYNAMODB_JSON) at s3://bucket/prefix/AWSDynamoDB/EXPORT_ID/ "
                        "instead of scanning")
    p.add_argument("--dry-run", action="store_true", help="show the plan; read and write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a TTY anyway)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--new", action="store_true", help="start a new snapshot even if one is unfinished")
    group.add_argument("--abandon", action="store_true", help="delete the unfinished snapshot's progress and exit")
    p.set_defaults(func=cmd_snapshot)
