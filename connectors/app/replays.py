"""Replay orchestration shared by commands: ``ddb-cdc replay`` (``cli_replay``) and the fill of
``ddb-cdc opensearch reindex`` (``reindex``) run a stream replay the same way, from here."""

from __future__ import annotations

import signal
from typing import Any, Sequence

__all__ = ["replay_progress", "run_stream_replay", "check_gc_deletes_held"]


def replay_progress(enabled: bool):
    """A rich progress bar on stderr counting shards (disabled: prints nothing)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled, transient=False)


def run_stream_replay(settings: Any, *, where: str, sinks: list, spec: Any, until: Any, started: Any,
                      sources: list, idle_reads: int = 5, show_progress: bool = False, command: str = "replay",
                      gc_deletes: str | None = "12h"):
    """Replay ``sources``' streams from ``spec`` into ``sinks`` (unopened sink objects) and wait.

    Runs a :class:`pipeline.replay.stream.StreamReplay` in its own lease namespace with a progress bar
    on stderr when ``show_progress``; SIGINT/SIGTERM stop it gracefully. Sinks with
    ``prepare_replay`` (OpenSearch) not prepared by the caller are prepared with ``gc_deletes``
    (the tombstones of deletes made during the replay must outlive it); a replay that runs
    longer than ``gc_deletes`` gets a problem in its report (exit 1): a delete made early in it
    may have been undone. Returns the :class:`pipeline.replay.report.ReplayReport`. Raises
    ReplayError / ConfigError / SourceError.
    """
    from connectors.app.wiring import build_lease_store, build_worker
    from pipeline.logs import get_logger
    from pipeline.replay.stream import StreamReplay, new_replay_id

    from pipeline.replay.stream import guard_sinks

    guard_sinks([s for s in sinks if getattr(s, "replay_settings", True) is None], gc_deletes=gc_deletes,
                repair=False, tables=[s.table for s in sources])  # not prepared by the caller (the reindex fill)
    replay_id = new_replay_id(started)
    log = get_logger(command=command, replay_id=replay_id)
    store = build_lease_store(settings, namespace=replay_id)

    def make_worker(**kwargs: Any):
        return build_worker(settings, logger=log, where=where, sinks=sinks, exit_when_idle=True,
                            sources=sources, **kwargs)

    replay = StreamReplay(sources=sources, store=store, spec=spec, until=until, sink_names=[s.name for s in sinks],
                          replay_id=replay_id, make_worker=make_worker, logger=log, idle_reads=idle_reads)
    asked = replay.prepare()
    log.info("replay_started", start=spec.kind, since=spec.since.isoformat() if spec.since else None,
             until=until.isoformat(), sinks=[s.name for s in sinks], shards=asked)

    def on_signal(signum, _frame):
        replay.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with replay_progress(show_progress) as progress:
            task = progress.add_task("replaying", total=asked)

            def tick(r: StreamReplay) -> None:
                delivered, done, total = r.progress()
                progress.update(task, completed=done, total=max(total, asked), description=f"{delivered} change(s)")

            report = replay.run(on_tick=tick)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    check_gc_deletes_held(report, sinks)
    skipped = sum(getattr(s, "superseded_skipped", 0) for s in sinks)
    if skipped:
        log.info("replay_superseded_skipped", events=skipped,
                 reason="their items changed after --until; the index holds the newer state")
    return report


def check_gc_deletes_held(report: Any, sinks: Sequence[Any]) -> None:
    """Add a problem to ``report`` (so exit 1) when the replay ran longer than the shortest
    ``index.gc_deletes`` held for its OpenSearch sinks: a delete the live worker made early in
    the replay may have lost its tombstone before the replay's older change of that item arrived."""
    from pipeline.replay.stream import time_value_ms

    held = {s.name: time_value_ms(s.replay_settings.gc_deletes) / 1000 for s in sinks
            if getattr(getattr(s, "replay_settings", None), "gc_deletes", None)}
    if held and report.elapsed_s > min(held.values()):
        report.problems.append(
            f"the replay ran {report.elapsed_s:.0f} s, longer than the index.gc_deletes ({min(held.values()):.0f} s) "
            f"held for {', '.join(held)}: a delete made early in it may have been undone by an older change; "
            "run it again with a larger --gc-deletes")
