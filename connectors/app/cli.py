"""``ddb-cdc`` command line.

Commands::

    ddb-cdc run --config FILE            run the worker until SIGTERM / SIGINT
    ddb-cdc run --processes N|auto       N workers under one supervisor
    ddb-cdc status --config FILE         streams, shards, lease owners, checkpoints, lag, workers
    ddb-cdc config check --config FILE   validate configuration and sink options, start nothing
    ddb-cdc sinks                        list the sink types (built-in and plugins)
    ddb-cdc demo                         the whole pipeline on embedded stand-in servers
    ddb-cdc dlq list|show ID             inspect the dead-letter destination
    ddb-cdc dlq redrive [--sink NAME] [--id ID] [--dry-run]   re-deliver entries, remove those delivered
    ddb-cdc checkpoints list|export|import|set   read and move checkpoints (safe while workers run)
    ddb-cdc replay --from …|--from-archive s3://… --sink NAME   re-deliver changes into chosen sinks
    ddb-cdc snapshot [--sink NAME] [--segments N] [--max-rcu R] [--from-export s3://…]   load existing items

Exit codes: 0 success; 1 runtime failure (a shard failed, a check did not hold); 2 invalid
configuration or usage (one line per problem on stderr, no traceback).

Signals: ``run`` installs its SIGTERM/SIGINT handlers first, before any AWS call. During
start-up (loading the configuration, resolving the stream — DescribeTable, retried while AWS does
not answer — and building the worker) a signal ends the process at once with exit code 0: nothing
was read and no lease is held yet. After that the worker shuts down gracefully (stop reading,
flush, checkpoint, release leases; exit 0). This matters in a container, where the process is
PID 1 and the kernel drops a signal it has no handler for.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence

from connectors.app.install_check import check_package_ownership
from pipeline.errors import CdcError, ConfigError, InstallationError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _err(line: str) -> None:
    print(f"ddb-cdc: {line}", file=sys.stderr)


def _load(path: str | None):
    from pipeline.config import load_settings
    from pipeline.registry import build_sinks

    settings = load_settings(path)
    sinks = build_sinks(settings.sinks, str(path) if path else "environment")
    return settings, sinks


def _shaping_note(cfg) -> str:
    """``; tables app-*; filter; 2 transforms`` for a sink with shaping (README "Filters, routing and
    transforms"), else empty."""
    parts = []
    if cfg.tables:
        parts.append("tables " + ",".join(cfg.tables))
    if cfg.filter is not None:
        parts.append("filter")
    if cfg.transforms:
        parts.append(f"{len(cfg.transforms)} transform(s)")
    return "".join(f"; {p}" for p in parts)


def cmd_config_check(args: argparse.Namespace) -> int:
    settings, sinks = _load(args.config)
    streams = ", ".join(value for _, value in settings.source.stream_specs())
    print(f"configuration OK: stream(s) {streams}, "
          f"{len(sinks)} sink(s): " + ", ".join(f"{s.name} ({c.type}{_shaping_note(c)})"
                                                for s, c in zip(sinks, settings.sinks)) +
          f"; checkpoints in {settings.checkpoints.store}")
    return EXIT_OK


class _StopDuringStartup(BaseException):
    """Raised by the start-up signal handler to unwind whatever start-up call is running (a
    BaseException, so no ``except Exception`` in a library swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_startup_signal(signum, _frame):
    raise _StopDuringStartup(signum)


def cmd_run(args: argparse.Namespace) -> int:
    """``ddb-cdc run`` (see the module doc for its signals and exit codes)."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # first of all: before any AWS call
        signal.signal(sig, _on_startup_signal)
    try:
        return _run(args)
    except _StopDuringStartup as stop:
        from pipeline.logs import get_logger

        get_logger().info("shutdown_requested", signal=signal.Signals(stop.signum).name, phase="start-up",
                          detail="stopped before the worker started: nothing read, no lease held")
        return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from pipeline.logs import configure_logging, get_logger, register_secrets_of

    settings, sinks = _load(args.config)
    configure_logging(settings.log.level, settings.log.format)
    register_secrets_of(settings)
    if args.processes is not None:
        from pipeline.runtime.supervisor import resolve_processes, run_supervised

        processes = resolve_processes(args.processes)
        if processes > 1:
            child = [sys.executable, "-m", "connectors.app.cli", "run"]
            if args.config:
                child += ["--config", os.path.abspath(args.config)]
            if args.exit_when_idle:
                child.append("--exit-when-idle")
            return run_supervised(child, processes, logger=get_logger(supervisor_pid=os.getpid()),
                                  shutdown_grace_s=settings.worker.shutdown_grace_s,
                                  restart_clean_exits=not args.exit_when_idle)
    from connectors.app.wiring import build_worker

    holder: dict = {}
    if settings.metrics.enabled:
        from pipeline.metrics import serve

        # under `--processes N` the worker in slot k serves on metrics.port + k
        port = settings.metrics.port + int(os.environ.get("DDB_CDC_SUPERVISOR_CHILD", "0") or 0)
        try:  # up before the worker is built: /readyz answers "starting" meanwhile
            serve(settings.metrics.host, port, probe=lambda: holder.get("worker"))
        except OSError as exc:
            raise ConfigError([f"metrics: cannot serve on {settings.metrics.host}:{port}: "
                               f"{exc.strerror or exc}; set metrics.port (DDB_CDC_METRICS__PORT) to a free port"])
    worker = build_worker(settings, logger=get_logger(), where=str(args.config), sinks=sinks,
                          exit_when_idle=args.exit_when_idle)
    holder["worker"] = worker
    if settings.metrics.enabled:
        from pipeline.metrics import track_worker

        track_worker(worker)
    initial = None
    if settings.source.initial_snapshot:  # issue 17: decided before the worker creates any lease
        from connectors.snapshot.initial import start_for_worker

        initial = start_for_worker(settings, worker, logger=get_logger())

    def on_signal(signum, _frame):
        worker.stop_from_signal(signum)  # assigns an attribute only: safe when signals repeat

    signal.signal(signal.SIGTERM, on_signal)  # from here on a signal is a graceful stop
    signal.signal(signal.SIGINT, on_signal)
    code = worker.run()
    if initial is not None:
        initial.stop()
    if code != EXIT_OK:
        reasons = "; ".join(f"shard {shard} {outcome}: {error}" for shard, outcome, error in worker.failed) or "shutdown did not finish in time"
        _err(f"worker stopped with failures ({reasons}); see the log lines above for each shard's error")
    return code


def cmd_sinks(_args: argparse.Namespace) -> int:
    from pipeline.registry import available_sink_types

    for name, target in sorted(available_sink_types().items()):
        print(f"{name}\t{target}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from connectors.embedded.demo import run_demo

    return run_demo(changes=args.changes, seed=args.seed)


def cmd_dlq(args: argparse.Namespace) -> int:
    from pipeline.config import load_settings

    settings = load_settings(args.config)
    from connectors.app.wiring import build_dead_letter

    dlq = build_dead_letter(settings)
    if args.dlq_command == "list":
        count = 0
        for entry in dlq.list():
            count += 1
            print(f"{entry.id}\t{entry.kind}\t{entry.sink or '-'}\t{entry.shard_id}\t"
                  f"{entry.sequence_number}\t{entry.error[:120]}")
        print(f"{count} entr{'y' if count == 1 else 'ies'}", file=sys.stderr)
        return EXIT_OK
    if args.dlq_command == "redrive":
        from pipeline.logs import configure_logging, get_logger, register_secrets_of
        from pipeline.ops.redrive import redrive, render_report
        from pipeline.registry import build_sinks

        names = [c.name for c in settings.sinks]
        unknown = [n for n in (args.sink or []) if n not in names]
        if unknown:
            raise ConfigError([f"--sink {n!r} is not a configured sink; configured: {', '.join(names)}"
                               for n in unknown])
        wanted = set(args.sink) if args.sink else None
        configure_logging(settings.log.level, settings.log.format)
        register_secrets_of(settings)
        sinks = build_sinks([c for c in settings.sinks if wanted is None or c.name in wanted],
                            str(args.config) if args.config else "environment")
        report = redrive(dlq, {s.name: s for s in sinks}, sink_filter=wanted,
                         ids=set(args.id) if args.id else None, logger=get_logger(command="dlq redrive"),
                         dry_run=args.dry_run, aws=settings.aws, worker_id=settings.worker.id,
                         configured_sinks=names)
        render_report(report)
        return EXIT_OK if report.ok else EXIT_FAILED
    entry = dlq.get(args.id)
    if entry is None:
        _err(f"no dead-letter entry {args.id!r}; `ddb-cdc dlq list --config FILE` lists them")
        return EXIT_FAILED
    import orjson

    print(orjson.dumps(entry.to_dict(), option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Read the lease store (never write to it, never take a lease) and print leases, workers
    and a summary (``--json``: the same data as JSON). Streams that cannot be described show
    "in stream ?"; an unreadable lease store is exit 1 (CheckpointStoreError, one line)."""
    from pipeline.config import load_settings
    from connectors.app.wiring import existing_lease_store
    from pipeline.ops.status import SourceUnavailable, gather_status, render_status, status_to_dict

    settings = load_settings(args.config)
    cfg = settings.checkpoints
    store = existing_lease_store(settings)

    def describe_sources() -> list:
        from connectors.app.wiring import build_sources

        empty = {"table": None, "stream_arn": None, "tables": [], "stream_arns": []}
        sources: list = []
        for kind, value in settings.source.stream_specs():  # one at a time: one bad stream hides no other
            one = settings.model_copy(update={"source": settings.source.model_copy(update={**empty, kind: value})})
            try:
                sources.extend(build_sources(one, describe_retry_s=0))  # status reports, never waits
            except Exception as exc:
                sources.append(SourceUnavailable(value, f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
        return sources

    report = gather_status(store, describe_sources, failover_time_s=cfg.failover_time_s)
    from pipeline.snapshot.status import render_snapshot_rows, snapshot_rows

    try:  # issue 17: snapshots in progress (and done) from the lease store's snapshot namespace
        from pipeline.snapshot.progress import SnapshotProgressStore

        snapshots = snapshot_rows(SnapshotProgressStore(store, "status").list_snapshots())
    except CdcError as exc:
        snapshots = [{"error": str(exc)}]
    if args.json:
        import orjson

        print(orjson.dumps({**status_to_dict(report), "snapshots": snapshots}, option=orjson.OPT_INDENT_2).decode())
    else:
        render_status(report)
        render_snapshot_rows([r for r in snapshots if "error" not in r])
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="ddb-cdc", description="DynamoDB Streams change-data-capture worker")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the worker until SIGTERM/SIGINT")
    run.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                     help="YAML configuration file (default: $DDB_CDC_CONFIG; DDB_CDC_* env vars override it)")
    run.add_argument("--processes", "-p", default=None,
                     help="run N lease-holding worker processes under one supervisor (N or 'auto' = usable "
                          "CPUs); it forwards SIGTERM/SIGINT and restarts a crashed worker with backoff")
    run.add_argument("--exit-when-idle", action="store_true",
                     help="exit 0 once every shard reached SHARD_END (for finite streams and tests)")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="configuration commands")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate the configuration without starting")
    check.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                       help="YAML configuration file (default: $DDB_CDC_CONFIG)")
    check.set_defaults(func=cmd_config_check)

    sinks = sub.add_parser("sinks", help="list sink types (built-in and plugins)")
    sinks.set_defaults(func=cmd_sinks)

    status = sub.add_parser("status", help="leases, checkpoints, lag and workers, read from the lease store")
    status.add_argument("--config", "-c", default=os.environ.get("DDB_CDC_CONFIG"),
                        help="YAML configuration file (default: $DDB_CDC_CONFIG; DDB_CDC_* env vars override it)")
    status.add_argument("--json", action="store_true", help="print the same data as JSON (stable keys)")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="run the whole pipeline on embedded stand-in servers, then check it")
    demo.add_argument("--changes", type=int, default=600, help="number of changes to write (default 600)")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the workload")
    demo.set_defaults(func=cmd_demo)

    dlq = sub.add_parser("dlq", help="inspect and redrive the dead-letter destination")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="list entries")
    dlq_list.add_argument("--config", "-c")
    dlq_show = dlq_sub.add_parser("show", help="print one entry in full")
    dlq_show.add_argument("id")
    dlq_show.add_argument("--config", "-c")
    dlq_redrive = dlq_sub.add_parser(
        "redrive", help="re-deliver entries (idempotently, in sequence order per sink and shard) and remove "
                        "those delivered; exit 1 if some are still failing")
    dlq_redrive.add_argument("--config", "-c")
    dlq_redrive.add_argument("--sink", action="append", metavar="NAME",
                             help="only entries of this sink (repeatable); decode entries go only to these sinks")
    dlq_redrive.add_argument("--id", action="append", metavar="ID", help="only this entry (repeatable)")
    dlq_redrive.add_argument("--dry-run", action="store_true", help="show what would be redriven; change nothing")
    dlq.set_defaults(func=cmd_dlq)

    from connectors.app import cli_checkpoints, cli_opensearch, cli_replay, cli_snapshot, cli_workload

    cli_checkpoints.add_parser(sub)
    cli_replay.add_parser(sub)
    cli_workload.add_parser(sub)
    cli_opensearch.add_parser(sub)
    cli_snapshot.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddb-cdc`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_package_ownership()
    except InstallationError as exc:
        _err(f"installation error: {exc}")
        return EXIT_CONFIG
    try:
        return args.func(args)
    except ConfigError as exc:
        for line in exc.problems:
            _err(f"config error: {line}")
        return EXIT_CONFIG
    except UsageError as exc:
        _err(f"usage error: {exc}")
        return EXIT_CONFIG
    except CdcError as exc:
        # a transient error that outlasted its retries reads as its base kind (SourceError, …)
        _err(f"{type(exc).__name__.removeprefix('Transient')}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:  # e.g. `ddb-cdc sinks | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python docs, "Note on SIGPIPE"
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
