"""Zero-downtime reindex of an OpenSearch sink's indices (``ddb-cdc opensearch reindex``).

For every index name ``N`` of the sink (one per configured table), with ``N`` → ``N-vK`` now:

1. **template** — the index template ``ddb-cdc-N`` gets the configured mapping spec;
2. **create** ``N-v(K+1)`` from it, with ``index.gc_deletes`` raised (``--gc-deletes``, default
   12h) so a delete made during the fill keeps its tombstone until the fill has passed it;
3. **mark** — the template's ``_meta.reindex`` names the new index; live sinks re-read it at most
   ``reindex_check_s`` apart and from then on write every change to ``N`` *and* ``N-v(K+1)``,
   rendered for each index's own spec. The command waits ``reindex_check_s`` + 1 s for that;
4. **fill** — a replay into the new index only: the stream from TRIM_HORIZON (default), or the
   S3 archive (``--from-archive``) *and then* the stream (the archive lags the stream by the
   audit sink's buffer: a delete not archived yet is re-applied from the stream). External
   versions make the overlap with the live writes harmless: an older change never overwrites a
   newer one, and a delete written live keeps its tombstone for the raised ``gc_deletes``;
5. **check** — every document id in ``N-vK`` must be in ``N-v(K+1)``. An id missing there means
   the source did not hold that item's history (DynamoDB Streams keeps 24 hours): the command
   stops before the swap and says to fill from the archive (or ``--force``);
6. **swap** — one atomic ``_aliases`` request moves ``N`` to ``N-v(K+1)`` (for a bare index
   named ``N`` from an older version: deletes it and adds the alias in the same request); then
   the marker is removed and ``gc_deletes`` reset. ``N-vK`` is kept unless ``--delete-old``.

A failed or interrupted run leaves the marker (live workers keep writing both versions): run the
command again to resume into the same new index, or ``--abort`` to remove the marker and the
unfinished index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from pipeline.errors import ReindexError, UsageError



@dataclass
class IndexPlan:
    """What happens to one index name. ``current`` is the write index now (None if the name is
    unused, the name itself for a bare index); ``resume``: a marker already names ``new_index``."""

    table: str
    alias: str
    kind: str
    current: str | None
    current_mapping: str
    current_docs: int | None
    new_index: str
    new_mapping: str
    resume: bool = False


@dataclass
class IndexResult:
    """Counts of one index name after the run (documents counted after a refresh)."""

    alias: str
    old_index: str | None
    new_index: str
    old_docs: int | None = None
    new_docs: int | None = None
    missing_ids: int = 0
    swapped: bool = False
    deleted_old: bool = False


@dataclass
class ReindexReport:
    """The whole run: ``plans``; ``results`` once filled; ``fill`` the replay report as a dict."""

    sink: str
    source: str
    dry_run: bool
    plans: list[IndexPlan] = field(default_factory=list)
    results: list[IndexResult] = field(default_factory=list)
    fill: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    ok: bool = True
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (``--json``)."""
        return {
            "sink": self.sink, "source": self.source, "dry_run": self.dry_run, "ok": self.ok,
            "elapsed_s": round(self.elapsed_s, 3), "problems": list(self.problems),
            "plans": [vars(p) for p in self.plans], "results": [vars(r) for r in self.results],
            "fill": self.fill,
        }


def _open_sink(settings: Any, name: str, where: str, logger: Any, *, pin: dict[str, str] | None = None) -> Any:
    from connectors.opensearch.sink import OpenSearchSink
    from pipeline.registry import build_sinks
    from pipeline.runtime.sink_lifecycle import open_sink

    configs = [c for c in settings.sinks if c.name == name]
    if not configs:
        raise UsageError(f"--sink {name!r} is not a configured sink; configured: "
                           f"{', '.join(c.name for c in settings.sinks)}")
    sink = build_sinks(configs, where)[0]
    if not isinstance(getattr(sink, "wrapped", sink), OpenSearchSink):  # a ShapedSink wraps it
        raise UsageError(f"sink {name!r} is of type {configs[0].type!r}; reindex works on opensearch sinks")
    if pin is not None:
        sink.pin(pin)
        return sink
    open_sink(sink, worker_id="reindex", logger=logger, aws=getattr(settings, "aws", None))
    return sink


def plan_reindex(sink: Any, tables: Sequence[str]) -> list[IndexPlan]:
    """One :class:`IndexPlan` per index name of ``tables`` (names shared by tables count once)."""
    from connectors.opensearch.indices import version_index

    admin = sink.admin
    wanted = sink.options.spec()
    plans: list[IndexPlan] = []
    seen: set[str] = set()
    for table in tables:
        alias = sink.index_for(table)
        if alias in seen:
            continue
        seen.add(alias)
        state = admin.state(alias)
        marker = admin.reindex_marker(alias)
        current = state.write_index
        docs = admin.count(alias) if state.kind != "missing" else None
        if marker:
            new_index, resume = marker["into"], True
        else:
            new_index, resume = version_index(alias, state.version + 1), False
            if admin.state(new_index).kind != "missing":
                raise ReindexError(f"index {new_index!r} already exists but no reindex is in progress; delete it "
                                   f"(e.g. DELETE /{new_index}) and run again")
        current_mapping = (state.spec.describe() if state.spec else
                           ("none (not created by ddb-cdc)" if state.kind != "missing" else "-"))
        plans.append(IndexPlan(table=table, alias=alias, kind=state.kind, current=current,
                               current_mapping=current_mapping, current_docs=docs, new_index=new_index,
                               new_mapping=wanted.describe(), resume=resume))
    return plans


def run_reindex(settings: Any, *, sink_name: str, where: str, logger: Any, tables: Sequence[str] | None = None,
                from_archive: str | None = None, dry_run: bool = False, force: bool = False,
                delete_old: bool = False, gc_deletes: str = "12h", show_progress: bool = False,
                wait_s: float | None = None, on_step: Callable[[str], None] | None = None) -> ReindexReport:
    """Run the reindex described in the module doc for sink ``sink_name``; returns the report.

    ``tables`` limits it to those configured tables. ``wait_s`` overrides the wait for live
    sinks (default ``reindex_check_s`` + 1 s). Raises ReindexError (one line) when it cannot start
    or must stop before the swap, ConfigError for a bad configuration.
    """
    from connectors.app.wiring import build_sources

    say = on_step or (lambda _text: None)
    started = time.monotonic()
    log = logger
    sink = _open_sink(settings, sink_name, where, log)
    try:
        sources = build_sources(settings)
        if tables:
            sources = [s for s in sources if s.table in set(tables)]
            if not sources:
                raise UsageError(f"--table {', '.join(tables)}: not among the configured streams")
        table_names = [s.table for s in sources]
        source_text = f"archive {from_archive}" if from_archive else "stream from TRIM_HORIZON"
        report = ReindexReport(sink=sink_name, source=source_text, dry_run=dry_run)
        report.plans = plan_reindex(sink, table_names)
        if dry_run:
            report.elapsed_s = time.monotonic() - started
            return report

        admin = sink.admin
        wanted = sink.options.spec()
        now_text = datetime.now(timezone.utc).isoformat()
        for plan in report.plans:
            admin.ensure_template(plan.alias, wanted, sink.options.index_settings)
            if not plan.resume:
                version = int(plan.new_index.rsplit("-v", 1)[1])
                admin.create_version(plan.alias, version, as_write_index=False,
                                     settings={"index.gc_deletes": gc_deletes})
                admin.set_reindex_marker(plan.alias, {"into": plan.new_index, "from": plan.current,
                                                      "started_at": now_text})
            say(f"{plan.alias}: live workers now also write to {plan.new_index}")
            log.info("reindex_marked", alias=plan.alias, into=plan.new_index, current=plan.current,
                     resume=plan.resume)
        wait = sink.options.reindex_check_s + 1.0 if wait_s is None else wait_s
        say(f"waiting {wait:g} s for live workers to pick up the new index")
        time.sleep(wait)

        pins = {plan.alias: plan.new_index for plan in report.plans}
        fill_sink = _open_sink(settings, sink_name, where, log, pin=pins)
        say(f"filling {', '.join(pins.values())} from the {source_text}")
        fill = _fill(settings, where, fill_sink, sources, table_names, from_archive, show_progress, pins)
        from pipeline.replay.report import replay_report_to_dict

        report.fill = replay_report_to_dict(fill)
        if not fill.ok:
            report.ok = False
            report.problems.append("the fill did not complete (" + "; ".join(fill.problems[:3] or ["see fill"]) +
                                   "); live workers keep writing both versions: run the command again to resume, "
                                   "or --abort")
            report.elapsed_s = time.monotonic() - started
            return report

        for plan in report.plans:
            result = _check_and_swap(admin, plan, force=force, delete_old=delete_old, say=say, log=log)
            report.results.append(result)
            if not result.swapped:
                report.ok = False
                report.problems.append(
                    f"{plan.alias}: {result.missing_ids} document(s) of {plan.current} are not in {plan.new_index}: "
                    f"the {source_text} does not hold their history (a stream keeps 24 h); fill from the S3 archive "
                    f"with --from-archive s3://bucket/prefix, or swap anyway with --force")
        report.elapsed_s = time.monotonic() - started
        return report
    finally:
        sink.close()


def _fill(settings: Any, where: str, fill_sink: Any, sources: list, tables: Sequence[str],
          from_archive: str | None, show_progress: bool, pins: dict[str, str]) -> Any:
    from pipeline.logs import get_logger

    from connectors.app.replays import run_stream_replay
    from pipeline.replay.stream import StartSpec

    archived = None
    if from_archive:
        from connectors.s3.archive import run_archive_replay

        archived = run_archive_replay(settings, from_archive, sinks=[fill_sink], since=None, until=None,
                                      tables=list(tables), dry_run=False,
                                      logger=get_logger(command="opensearch-reindex", source="archive"),
                                      progress=show_progress)
        if not archived.ok:
            return archived
        # The archive lags the stream (the audit sink buffers), so a delete made shortly before the
        # mark may not be archived yet: the archived INSERT would leave a ghost document. The stream
        # (its last 24 h, in order) re-applies every recent change, that delete included.
        fill_sink = _open_sink(settings, fill_sink.name, where, get_logger(command="opensearch-reindex"),
                               pin=pins)
    now = datetime.now(timezone.utc)
    streamed = run_stream_replay(settings, where=where, sinks=[fill_sink], spec=StartSpec("trim-horizon"), until=now,
                                 started=now, sources=sources, show_progress=show_progress,
                                 command="opensearch-reindex")
    if archived is not None:
        streamed.shards[:0] = archived.shards
        streamed.problems[:0] = archived.problems
        streamed.dead_lettered += archived.dead_lettered
        streamed.elapsed_s += archived.elapsed_s
        streamed.mode = "archive+stream"
    return streamed


def _check_and_swap(admin: Any, plan: IndexPlan, *, force: bool, delete_old: bool,
                    say: Callable[[str], None], log: Any) -> IndexResult:
    state = admin.state(plan.alias)
    old = state.write_index if state.kind != "missing" else None
    result = IndexResult(alias=plan.alias, old_index=old, new_index=plan.new_index)
    if old is not None and old != plan.new_index:
        missing = admin.ids(old) - admin.ids(plan.new_index)
        if missing:  # a live write may have reached the old index a moment before the new one
            time.sleep(2.0)
            missing -= admin.ids(plan.new_index)
        result.missing_ids = len(missing)
        if missing and not force:
            log.error("reindex_check_failed", alias=plan.alias, missing_ids=len(missing), sample=sorted(missing)[:5])
            return result
    admin.swap(plan.alias, plan.new_index, state)
    result.swapped = True
    admin.set_reindex_marker(plan.alias, None)
    try:
        admin.client.indices.put_settings(index=plan.new_index, body={"index": {"gc_deletes": None}})
    except Exception as exc:  # the default comes back on its own when the setting is unset; keep going
        log.warning("reindex_gc_deletes_not_reset", index=plan.new_index, error=str(exc)[:200])
    say(f"{plan.alias}: alias swapped to {plan.new_index}")
    log.info("reindex_swapped", alias=plan.alias, old=old, new=plan.new_index)
    result.new_docs = admin.count(plan.new_index)
    if old is not None and state.kind == "alias":
        result.old_docs = admin.count(old)
        if delete_old:
            admin.client.indices.delete(index=old)
            result.deleted_old = True
    return result


def abort_reindex(settings: Any, *, sink_name: str, where: str, logger: Any,
                  tables: Sequence[str] | None = None, wait_s: float | None = None) -> list[str]:
    """Remove the reindex marker of each index name and delete its unfinished new index.

    Live sinks keep writing to the new index until they re-read the template, so the index is
    deleted only ``wait_s`` (default ``reindex_check_s`` + 1 s) after the marker is gone — else
    their writes would re-create it. Returns one line per index name acted on. Never touches
    the index the alias points at.
    """
    from connectors.app.wiring import build_sources

    sink = _open_sink(settings, sink_name, where, logger)
    lines: list[str] = []
    try:
        sources = build_sources(settings)
        names = [s.table for s in sources if not tables or s.table in set(tables)]
        unmarked: list[tuple[str, str]] = []
        for alias in dict.fromkeys(sink.index_for(t) for t in names):
            marker = sink.admin.reindex_marker(alias)
            if marker:
                sink.admin.set_reindex_marker(alias, None)
                unmarked.append((alias, marker["into"]))
        if unmarked:
            time.sleep(sink.options.reindex_check_s + 1.0 if wait_s is None else wait_s)
        for alias, into in unmarked:
            state = sink.admin.state(alias)
            if into not in state.indices and sink.admin.state(into).kind == "index":
                sink.admin.client.indices.delete(index=into)
                lines.append(f"{alias}: reindex aborted, {into} deleted")
            else:
                lines.append(f"{alias}: reindex marker removed")
    finally:
        sink.close()
    return lines
