"""``ddb-cdc opensearch …``: index operations of an OpenSearch sink.

``ddb-cdc opensearch reindex --sink NAME`` builds the next index version with the configured
mapping, fills it by replay while live workers write to both versions, then swaps the alias
atomically (see :mod:`connectors.app.reindex`). ``--dry-run`` prints the plan;
``--abort`` removes an unfinished reindex.

Exit codes: 0 done (or plan printed), 1 stopped before the swap (the message says why and what to
do), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import orjson

from pipeline.errors import ConfigError

EXIT_OK, EXIT_FAILED = 0, 1


def _add_columns(table: Any, headers: tuple[str, ...], rows: list[tuple[str, ...]], *, names: tuple[int, ...]) -> None:
    """Add ``headers`` as columns; the index-name columns (positions ``names``) are never cut short
    (an 80-column terminal or a pipe would otherwise show ``orders-v…``): they get their longest word
    as minimum width and fold rather than end in an ellipsis."""
    for i, header in enumerate(headers):
        if i in names:
            longest = max([len(w) for row in rows for w in row[i].split()] + [len(header)])
            table.add_column(header, min_width=longest, overflow="fold")
        else:
            table.add_column(header, overflow="fold")


def _print_plan(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"reindex plan — sink {report.sink}, fill from the {report.source}")
    rows = []
    for p in report.plans:
        now = p.current or "-"
        if p.kind == "index":
            now += " (plain index: deleted at the swap)"
        new = p.new_index + (" (resume)" if p.resume else "")
        rows.append((p.alias, now, p.current_mapping, "-" if p.current_docs is None else str(p.current_docs), new,
                     p.new_mapping))
    _add_columns(table, ("alias", "now", "mapping now", "documents", "new index", "new mapping"), rows,
                 names=(0, 1, 4))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if report.dry_run:
        console.print("steps: template → create new index → live workers write both → fill → check ids → "
                      "swap alias → remove marker (nothing was changed: --dry-run)")


def _print_result(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"reindex — sink {report.sink}")
    rows = [(r.alias, r.old_index or "-", "-" if r.old_docs is None else str(r.old_docs), r.new_index,
             "-" if r.new_docs is None else str(r.new_docs), str(r.missing_ids),
             "yes" + (" (old deleted)" if r.deleted_old else "") if r.swapped else "no") for r in report.results]
    _add_columns(table, ("alias", "old index", "old docs", "new index", "new docs", "missing ids", "swapped"), rows,
                 names=(0, 1, 3))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if report.fill:
        console.print(f"fill: {report.fill.get('delivered', 0)} change(s) replayed, "
                      f"{report.fill.get('dead_lettered', 0)} dead-lettered, {report.elapsed_s:.1f} s in all")
    for line in report.problems:
        console.print(f"[red]problem:[/red] {line}")


def cmd_reindex(args: argparse.Namespace) -> int:
    """``ddb-cdc opensearch reindex``; returns the exit code."""
    from connectors.app.reindex import abort_reindex, run_reindex
    from pipeline.config import load_settings
    from pipeline.logs import configure_logging, get_logger, register_secrets_of

    if not args.sink:
        raise ConfigError(["opensearch reindex needs --sink NAME (an opensearch sink of the configuration)"])
    settings = load_settings(args.config)
    where = str(args.config) if args.config else "environment"
    configure_logging(settings.log.level, settings.log.format)
    register_secrets_of(settings)
    log = get_logger(command="opensearch-reindex", sink=args.sink)
    if args.abort:
        for line in abort_reindex(settings, sink_name=args.sink, where=where, logger=log, tables=args.table,
                                  wait_s=args.wait):
            print(line)
        return EXIT_OK
    quiet = args.json
    report = run_reindex(settings, sink_name=args.sink, where=where, logger=log, tables=args.table,
                         from_archive=args.from_archive, dry_run=args.dry_run, force=args.force,
                         delete_old=args.delete_old, gc_deletes=args.gc_deletes,
                         show_progress=not (args.json or args.no_progress), wait_s=args.wait,
                         on_step=None if quiet else (lambda text: print(text, flush=True)))
    if args.json:
        print(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    elif report.dry_run:
        _print_plan(report)
    else:
        _print_plan(report)
        _print_result(report)
    return EXIT_OK if report.ok else EXIT_FAILED


def add_parser(sub: Any) -> None:
    """Register ``opensearch`` (with ``reindex``) on the main parser's sub-parsers."""
    p = sub.add_parser("opensearch", help="index operations of an OpenSearch sink (reindex)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    osub = p.add_subparsers(dest="opensearch_command", required=True)
    r = osub.add_parser("reindex", help="build the next index version with the configured mapping, fill it by "
                                        "replay while live workers write both, then swap the alias")
    r.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                   help="YAML configuration file (default: $DDB_CDC_CONFIG)")
    r.add_argument("--sink", metavar="NAME", help="the opensearch sink to reindex")
    r.add_argument("--table", action="append", metavar="NAME", help="only this table's index (repeatable)")
    r.add_argument("--from-archive", metavar="S3_URI",
                   help="fill from the s3_audit archive at s3://bucket/prefix instead of the stream")
    r.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    r.add_argument("--force", action="store_true",
                   help="swap even when documents of the old version are missing from the new one")
    r.add_argument("--delete-old", action="store_true", help="delete the old version after the swap")
    r.add_argument("--gc-deletes", default="12h", metavar="TIME",
                   help="index.gc_deletes of the new version while it fills (default 12h)")
    r.add_argument("--wait", type=float, default=None, metavar="S",
                   help="seconds to wait for live workers to start writing both versions "
                        "(default: the sink's reindex_check_s + 1)")
    r.add_argument("--abort", action="store_true", help="remove an unfinished reindex (marker and new index)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reindex)
