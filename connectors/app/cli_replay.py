"""``ddb-cdc replay``: re-deliver changes from the stream or from the S3 audit archive into chosen sinks.

From the stream (a separate finite consumer in its own lease namespace; the live worker keeps
running — see :mod:`pipeline.replay.stream`)::

    ddb-cdc replay --from trim-horizon --sink search
    ddb-cdc replay --from time 2026-11-22T09:00:00Z --until 2026-11-22T09:30:00Z --sink search
    ddb-cdc replay --from sequence shardId-…=4950… --sink audit
    ddb-cdc replay --from checkpoint-file before-deploy.json --sink search --sink cache

From the archive (beyond the stream's 24 hours)::

    ddb-cdc replay --from-archive s3://bucket/prefix --since … --until … --table orders --sink search

Deletes (OpenSearch sinks): while a replay runs, ``index.gc_deletes`` of every index it writes
to is raised to ``--gc-deletes`` (12h) and put back afterwards, so deletes the live worker makes
meanwhile are not undone by the replay's older changes; with ``--until`` the replay first reads
the rest of the stream and leaves out the items changed after the window; ``--repair`` writes
with ``external_gte`` so that replaying the same change rewrites its document.

``--dry-run`` counts per shard what would be replayed and sends nothing. Exit 0 only when every
shard reached ``--until`` or the end of the data asked for and no change was dead-lettered;
1 otherwise; 2 for invalid usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any, Sequence

import orjson

from connectors.app.replays import check_gc_deletes_held, replay_progress, run_stream_replay
from pipeline.errors import ConfigError, InputFileError

EXIT_OK, EXIT_FAILED = 0, 1


def _start_spec(args: argparse.Namespace):
    from pipeline.ops.checkpoint_moves import parse_snapshot
    from pipeline.replay.stream import ReplayError, StartSpec, parse_time

    kind, *values = args.from_
    kind = kind.lower()
    if kind in ("trim-horizon", "trim_horizon"):
        if values:
            raise ReplayError("--from trim-horizon takes no value")
        return StartSpec("trim-horizon")
    if kind == "time":
        if len(values) != 1:
            raise ReplayError("--from time needs one ISO 8601 time: --from time 2026-11-22T09:00:00Z")
        return StartSpec("time", since=parse_time(values[0], "--from time"))
    if kind == "sequence":
        sequences = {}
        for value in values:
            shard, sep, seq = value.partition("=")
            if not sep or not shard or not seq.isdigit():
                raise ReplayError(f"--from sequence wants SHARD=SEQUENCE_NUMBER, got {value!r}")
            sequences[shard] = seq
        if not sequences:
            raise ReplayError("--from sequence needs at least one SHARD=SEQUENCE_NUMBER")
        return StartSpec("sequence", sequences=sequences)
    if kind == "checkpoint-file":
        if len(values) != 1:
            raise ReplayError("--from checkpoint-file needs one file (from `ddb-cdc checkpoints export`)")
        try:
            with open(values[0], "rb") as fh:
                data = orjson.loads(fh.read())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise InputFileError(f"cannot read checkpoint file {values[0]}: {exc}") from None
        return StartSpec("checkpoint-file", snapshot=parse_snapshot(data, values[0]))
    raise ReplayError(f"--from {kind!r}: use trim-horizon, time ISO8601, sequence SHARD=SEQ or checkpoint-file FILE")


def _chosen_sinks(settings: Any, names: Sequence[str] | None, where: str, required: bool) -> list:
    from pipeline.registry import build_sinks

    configured = [c.name for c in settings.sinks]
    if not names:
        if required:
            raise ConfigError([f"replay needs --sink NAME (repeatable) to say which sinks receive it; "
                               f"configured: {', '.join(configured) or 'none'}"])
        return []
    unknown = [n for n in names if n not in configured]
    if unknown:
        raise ConfigError([f"--sink {n!r} is not a configured sink; configured: {', '.join(configured)}"
                           for n in unknown])
    return build_sinks([c for c in settings.sinks if c.name in set(names)], where)


def _report_out(report: Any, as_json: bool) -> int:
    from pipeline.replay.report import render_replay_report, replay_report_to_dict

    if as_json:
        print(orjson.dumps(replay_report_to_dict(report), option=orjson.OPT_INDENT_2).decode())
    else:
        render_replay_report(report)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_replay(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from pipeline.config import load_settings
    from pipeline.logs import configure_logging, get_logger, register_secrets_of
    from pipeline.replay.stream import ReplayError, parse_time

    settings = load_settings(args.config)
    where = str(args.config) if args.config else "environment"
    configure_logging(settings.log.level, settings.log.format)
    register_secrets_of(settings)
    until = parse_time(args.until, "--until") if args.until else None
    show_progress = not args.no_progress and not args.json
    if args.from_archive:
        if args.from_:
            raise ReplayError("use either --from (the stream) or --from-archive (S3), not both")
        from connectors.s3.archive import run_archive_replay

        import threading

        since = parse_time(args.since, "--since") if args.since else None
        sinks = _chosen_sinks(settings, args.sink, where, required=not args.dry_run)
        guarded = _guard(sinks, args, superseded=frozenset(), tables=args.table or ())
        if guarded and until is not None:
            raise ConfigError([
                f"--until with --from-archive into {', '.join(repr(n) for n in guarded)} (opensearch) would re-create "
                "items deleted after the window; drop --until (every later change is replayed in order), or replay "
                "the window from the stream (--from time T --until U), which leaves those items out"])
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            report = run_archive_replay(settings, args.from_archive, sinks=sinks, since=since, until=until,
                                        tables=args.table or None, dry_run=args.dry_run,
                                        logger=get_logger(command="replay", source="archive"),
                                        progress=show_progress, stop_event=stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        check_gc_deletes_held(report, sinks)
        return _report_out(report, args.json)
    if not args.from_:
        raise ReplayError("say where to replay from: --from trim-horizon | time T | sequence SHARD=SEQ | "
                          "checkpoint-file FILE, or --from-archive s3://bucket/prefix")
    if args.since:
        raise ReplayError("--since is for --from-archive; from the stream use --from time T")
    spec = _start_spec(args)
    from connectors.app.wiring import build_sources

    sources = build_sources(settings)
    if args.table:
        sources = [s for s in sources if s.table in set(args.table)]
        if not sources:
            raise ReplayError(f"--table {', '.join(args.table)}: not among the configured streams")
    started = datetime.now(timezone.utc)
    if until is None:
        until = started  # the end of the data asked for: what the stream held when the replay started
    if args.dry_run:
        from pipeline.replay.stream import dry_run

        with replay_progress(show_progress) as progress:
            task = progress.add_task("counting", total=None)

            def tick(delivered: int, done: int, asked: int) -> None:
                progress.update(task, completed=done, total=asked, description=f"{delivered} change(s)")

            report = dry_run(sources, spec, until, max_records_per_call=settings.source.max_records_per_call,
                             idle_reads=args.idle_reads, on_tick=tick)
        return _report_out(report, args.json)

    sinks = _chosen_sinks(settings, args.sink, where, required=True)
    superseded: frozenset = frozenset()
    if args.until and any(callable(getattr(s, "prepare_replay", None)) for s in sinks):
        from pipeline.logs import get_logger
        from pipeline.replay.stream import scan_superseded

        scan = scan_superseded(sources, spec.since, until, max_records_per_call=settings.source.max_records_per_call,
                               idle_reads=args.idle_reads)
        superseded = frozenset(scan.keys)
        get_logger(command="replay").info("replay_superseded_scan", items_in_window=scan.in_window,
                                          changed_after_until=len(superseded), records_read=scan.records)
    _guard(sinks, args, superseded=superseded, tables=[s.table for s in sources])
    report = run_stream_replay(settings, where=where, sinks=sinks, spec=spec, until=until, started=started,
                               sources=sources, idle_reads=args.idle_reads, show_progress=show_progress,
                               gc_deletes=args.gc_deletes)
    return _report_out(report, args.json)


def _guard(sinks: list, args: argparse.Namespace, *, superseded: frozenset, tables: Sequence[str]) -> list[str]:
    """:func:`pipeline.replay.stream.guard_sinks` with the command's ``--gc-deletes`` / ``--repair``;
    ConfigError (exit 2) for a ``--gc-deletes`` that is not a time value."""
    from pipeline.replay.stream import guard_sinks, time_value_ms

    try:
        time_value_ms(args.gc_deletes)
    except ValueError as exc:
        raise ConfigError([f"--gc-deletes: {exc}"]) from None
    return guard_sinks(sinks, gc_deletes=args.gc_deletes, repair=args.repair, superseded=superseded,
                       tables=tables)


class _FromAction(argparse.Action):
    """``--from KIND [VALUE ...]`` (e.g. ``--from time 2026-…``, ``--from sequence A=1 B=2``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(values))


def add_parser(sub: Any) -> None:
    """Register ``replay`` on the main parser's sub-parsers."""
    p = sub.add_parser("replay", help="re-deliver changes from the stream or the S3 archive into chosen sinks",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                   help="YAML configuration file (default: $DDB_CDC_CONFIG)")
    p.add_argument("--from", dest="from_", nargs="+", action=_FromAction, metavar="KIND",
                   help="trim-horizon | time ISO8601 | sequence SHARD=SEQ [SHARD=SEQ ...] | checkpoint-file FILE")
    p.add_argument("--from-archive", metavar="S3_URI", help="replay the s3_audit archive at s3://bucket/prefix")
    p.add_argument("--since", help="(--from-archive) only changes created at or after this ISO 8601 time")
    p.add_argument("--until", help="only changes created at or before this ISO 8601 time (stream default: now)")
    p.add_argument("--table", action="append", metavar="NAME", help="only this table (repeatable)")
    p.add_argument("--sink", action="append", metavar="NAME", help="a configured sink to replay into (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="count per shard what would be replayed; send nothing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--repair", action="store_true",
                   help="opensearch sinks write with version_type external_gte: replaying a change rewrites its "
                        "document (default external: the same version is a 409 no-op)")
    p.add_argument("--gc-deletes", default="12h", metavar="TIME",
                   help="index.gc_deletes held on the opensearch indices while the replay runs, then put back "
                        "(default 12h; must exceed the replay's duration)")
    p.add_argument("--idle-reads", type=int, default=5, metavar="N",
                   help="an open shard counts as caught up after N empty reads in a row (default 5)")
    p.set_defaults(func=cmd_replay)
