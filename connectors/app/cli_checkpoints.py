"""``ddb-cdc checkpoints list|export|import|set``: read and move checkpoints while workers run.

Moves are safe with workers running: a free lease is written at once (conditional on its
counter); an owned lease gets a move request its owner applies at its next batch boundary
(see :mod:`pipeline.checkpoint`). Every move is logged with who asked (``--by``, default
``user@host``). ``--wait S`` waits up to S seconds until the owners applied the moves.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson

from pipeline.errors import InputFileError

EXIT_OK, EXIT_FAILED = 0, 1


def _store(args: argparse.Namespace) -> tuple[Any, Any]:
    from connectors.app.wiring import existing_lease_store
    from pipeline.config import load_settings

    settings = load_settings(args.config)
    store = existing_lease_store(settings)
    if settings.checkpoints.store == "sqlite":
        store.ensure_table()  # adds the move columns to a file written by an older version
    return settings, store


def _logger(settings: Any, command: str) -> Any:
    from pipeline.logs import configure_logging, get_logger, register_secrets_of

    configure_logging(settings.log.level, settings.log.format)

    register_secrets_of(settings)
    return get_logger(command=command)


def _behind(ms: int | None) -> str:
    from pipeline.ops.status import format_duration_ms

    return "-" if ms is None else format_duration_ms(ms)


def lease_rows(leases: list) -> list[dict[str, Any]]:
    """Leases as JSON-safe rows (the ``list --json`` shape)."""
    return [{
        "lease_key": lease.lease_key, "table": lease.table, "stream_arn": lease.stream_arn,
        "shard_id": lease.shard_id, "parent_shard_ids": list(lease.parent_shard_ids),
        "owner": lease.owner, "checkpoint": lease.checkpoint, "behind_ms": lease.behind_ms,
        "lease_counter": lease.counter,
        "pending_move": None if lease.move is None else {
            "checkpoint": lease.move.checkpoint, "request_id": lease.move.request_id,
            "requested_by": lease.move.requested_by, "requested_at": lease.move.requested_at},
    } for lease in sorted(leases, key=lambda lease: (lease.table, lease.lease_key))]


def cmd_list(args: argparse.Namespace) -> int:
    _, store = _store(args)
    rows = lease_rows(store.list_leases())
    if args.json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} lease(s)")
    for column in ("table", "shard", "parent", "owner", "checkpoint", "behind", "pending move"):
        table.add_column(column, overflow="fold")  # ids stay whole, to copy into `set --shard`
    for r in rows:
        move = r["pending_move"]
        table.add_row(r["table"], r["shard_id"], ",".join(r["parent_shard_ids"]) or "-", r["owner"] or "-",
                      r["checkpoint"], _behind(r["behind_ms"]),
                      f"→ {move['checkpoint']} by {move['requested_by']}" if move else "-")
    Console(width=max(160, Console().width)).print(table)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.ops.checkpoint_moves import default_requester, export_snapshot

    _, store = _store(args)
    snapshot = export_snapshot(store, exported_by=args.by or default_requester())
    data = orjson.dumps(snapshot, option=orjson.OPT_INDENT_2)
    if args.out == "-":
        sys.stdout.write(data.decode() + "\n")
    else:
        tmp = f"{args.out}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, args.out)
        print(f"exported {len(snapshot['leases'])} checkpoint(s) to {args.out}", file=sys.stderr)
    return EXIT_OK


def _print_results(results: list, dry_run: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="checkpoint moves" + (" (dry run: nothing written)" if dry_run else ""))
    for column in ("table", "shard", "owner", "from", "to", "how"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.lease.table, r.lease.shard_id, r.lease.owner or "-", r.lease.checkpoint, r.to_checkpoint, r.how)
    Console(width=max(160, Console().width)).print(table)


def _finish(store: Any, results: list, wait_s: float | None) -> int:
    from pipeline.ops.checkpoint_moves import wait_applied

    requested = [r for r in results if r.how == "requested"]
    if requested and wait_s:
        pending = wait_applied(store, requested, wait_s)
        if pending:
            print(f"ddb-cdc: {len(pending)} move(s) not applied within {wait_s:g} s (is the owning worker "
                  "running? it applies them at its next batch; `ddb-cdc checkpoints list` shows them)",
                  file=sys.stderr)
            return EXIT_FAILED
        print(f"{len(requested)} requested move(s) applied by their owners", file=sys.stderr)
    elif requested:
        print(f"{len(requested)} move(s) requested: each owning worker applies it at its next batch "
              "(`ddb-cdc checkpoints list` shows pending moves)", file=sys.stderr)
    return EXIT_OK


def cmd_set(args: argparse.Namespace) -> int:
    from pipeline.ops.checkpoint_moves import (
        CheckpointOperationError,
        MoveResult,
        default_requester,
        move_lease,
        new_move,
        select_leases,
    )

    target = args.to.upper() if args.to.upper() in ("TRIM_HORIZON", "LATEST", "SHARD_END") else args.to
    new_move(target, "check")  # validates the target before anything is read or written
    if target.isdigit() and not args.shard:  # a usage mistake: told before the store is opened
        raise CheckpointOperationError("a sequence number belongs to one shard: name it with --shard")
    settings, store = _store(args)
    leases = select_leases(store, shard=args.shard, table=args.table, all_leases=args.all)
    if target.isdigit() and len(leases) != 1:
        raise CheckpointOperationError("a sequence number belongs to one shard: name it with --shard")
    if args.dry_run:
        _print_results([MoveResult(lease, target, "direct" if lease.owner is None else "requested")
                        for lease in leases], dry_run=True)
        return EXIT_OK
    log = _logger(settings, "checkpoints set")
    by = args.by or default_requester()
    results = [move_lease(store, lease, target, requested_by=by, logger=log) for lease in leases]
    _print_results(results)
    return _finish(store, results, args.wait)


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.ops.checkpoint_moves import (
        MoveResult,
        apply_import,
        default_requester,
        parse_snapshot,
        plan_import,
    )

    try:
        with open(args.file, "rb") as fh:
            data = orjson.loads(fh.read())
    except OSError as exc:
        raise InputFileError(f"cannot read {args.file}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise InputFileError(f"{args.file} is not JSON: {exc}") from None
    snapshot = parse_snapshot(data, args.file)
    settings, store = _store(args)
    steps = plan_import(store, snapshot)
    if args.dry_run:
        _print_results([MoveResult(s.lease, s.target, s.action) for s in steps], dry_run=True)
        return EXIT_OK
    log = _logger(settings, "checkpoints import")
    results = apply_import(store, steps, requested_by=args.by or default_requester(), logger=log)
    _print_results(results)
    return _finish(store, results, args.wait)


def add_parser(sub: Any) -> None:
    """Register ``checkpoints`` and its sub-commands on the main parser's sub-parsers."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                       help="YAML configuration file (default: $DDB_CDC_CONFIG)")

    def mover(p: argparse.ArgumentParser) -> None:
        p.add_argument("--by", help="who asks (logged with every move; default user@host)")
        p.add_argument("--wait", type=float, default=None, metavar="S",
                       help="wait up to S seconds until running owners applied the moves (exit 1 if not)")
        p.add_argument("--dry-run", action="store_true", help="show what would be moved; write nothing")

    cp = sub.add_parser("checkpoints", help="list, export, import and move checkpoints (safe while workers run)")
    cp_sub = cp.add_subparsers(dest="checkpoints_command", required=True)
    p = cp_sub.add_parser("list", help="every lease: table, shard, parent, owner, checkpoint, lag, pending move")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=cmd_list)
    p = cp_sub.add_parser("export", help="write every lease's position to a JSON snapshot")
    common(p)
    p.add_argument("--out", "-o", required=True, help="snapshot file ('-' = stdout)")
    p.add_argument("--by", help="recorded in the file (default user@host)")
    p.set_defaults(func=cmd_export)
    p = cp_sub.add_parser("import", help="restore the positions of a snapshot (changes after them are delivered again)")
    common(p)
    p.add_argument("file", help="a snapshot written by `checkpoints export`")
    mover(p)
    p.set_defaults(func=cmd_import)
    p = cp_sub.add_parser("set", help="move one shard, a table's shards or all to TRIM_HORIZON, LATEST, "
                                      "SHARD_END or a sequence number")
    common(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shard", help="shard id (or lease key)")
    which.add_argument("--all", action="store_true", help="every lease")
    p.add_argument("--table", help="every shard of this table (or, with --shard, the table the shard belongs to)")
    p.add_argument("--to", required=True,
                   help="TRIM_HORIZON, LATEST, SHARD_END, or a sequence number (reading resumes after it)")
    mover(p)
    p.set_defaults(func=cmd_set)
