"""The worker: discovers shards of every configured stream, holds leases, runs one
:class:`ShardConsumer` per held shard.

Lifecycle: ``open`` every sink → ensure the lease table → announce this worker → loop {
re-discover shards every ``discovery_interval_s`` (create leases for new shards, remove finished
parents that left the stream once their children started); every ``failover_time_s / 3`` renew
held leases, refresh the announcement and take leases up to the fair share; start a consumer for
every held shard whose parents reached SHARD_END; stop consumers of lost leases; restart the
reader of a shard whose checkpoint was moved (``ddb-cdc checkpoints set``) } → on stop
(SIGTERM/SIGINT or :meth:`Worker.stop`): consumers stop reading, flush every sink and checkpoint;
leases are released (owner cleared) so other workers take them at once; sinks closed — only once
no shard thread can call them any more (see :meth:`Worker._shutdown`: a consumer still running
after ``shutdown_grace_s`` is fenced off the sinks, exit code 1).

A child shard is read only after its parent reached SHARD_END; a parent that is absent from the
stream and from the lease table (trimmed, or removed after its children started) counts as done.

Transient AWS errors (5xx, timeouts, reset connections) never stop the worker: each call is
retried with backoff where it is made (see :mod:`pipeline.runtime.aws_health` for the table of calls and
caps) — discovery is scheduled again after a backoff instead of blocking the lease renewals —
and ``ready()`` turns false while a dependency has been failing longer than ``aws_unready_after_s``.

Following a table's stream (a source named by ``source.table``; issue 13, 6b). Disabling a
table's stream closes it (its records stay readable for 24 h); enabling it again — to change the
view type, say — creates a new stream with a new ARN and label. Every discovery re-reads the
table's ``LatestStreamArn`` / ``StreamSpecification`` (DescribeTable) and applies this rule:

- *disabled*: logged once (``stream_disabled``, ``ddb_cdc_stream_enabled{table} 0``); the old
  stream's shards are still read to SHARD_END;
- *a new LatestStreamArn*: logged (``stream_followed``, ``ddb_cdc_stream_changes_total``) and
  followed: its shards get leases starting at TRIM_HORIZON whatever ``start_position`` says (every
  record of a new stream is newer than the worker's start), and
- *order*: a shard of a table's stream is read only once every lease of an older stream of the
  same table (an older stream label; labels are creation times) has reached SHARD_END, so the old
  stream's changes all reach the sinks before the new stream's;
- *restart*: unfinished leases of an older stream of a followed table found in the lease table are
  adopted (``stream_adopted``) and read first; one whose stream is gone (more than 24 h later) ends
  as a vanished shard: a gap is recorded, per ``on_trimmed``.

Lease keys carry the stream label, so the two streams' leases stay apart. A source named by
``source.stream_arn`` follows nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from pipeline.runtime.aws_health import (
    DEFAULT_UNREADY_AFTER_S,
    DISCOVERY_BACKOFF_INITIAL_S,
    RENEWAL_BACKOFF_INITIAL_S,
    DependencyHealth,
    TrackedLeaseStore,
    TrackedSource,
    backoff_s,
    retry_startup,
)
from pipeline import metrics
from pipeline.checkpoint import Lease, LeaseStore, WorkerInfo
from pipeline.lineage import blocked_by, parents_done
from pipeline.runtime.sink_lifecycle import open_sink
from pipeline.deadletter import DeadLetterQueue
from pipeline.events import TRIM_HORIZON
from pipeline.errors import CdcError, FatalSinkError, LeaseLostError, TransientError
from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.runtime.lanes import Lanes, LaneSettings, encode_lane_status
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.runtime.read_budget import DEFAULT_MAX_PAGES_IN_FLIGHT, ReadBudget
from pipeline.runtime.shard_consumer import (
    FINISHED_OUTCOMES,
    STOPPING_OUTCOMES,
    ReadWindow,
    ShardConsumer,
    ShardOutcome,
    ShardSettings,
)
from pipeline.source import ShardInfo, StreamSource


#: CPython's generation-0 threshold while a worker runs (default 700). Decoding a 1,000-record
#: GetRecords page allocates ~10^5 short-lived containers; with the default every page triggers
#: many collections, and the full ones traverse every object of the process (botocore's models,
#: pydantic, structlog…). ``python -m benchmarks`` measured the collector at about half of the
#: decode time; a higher threshold plus :func:`gc.freeze` of what was loaded at start removes most
#: of it at the cost of a little more memory between collections.
GC_GENERATION0_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Move every object alive now (imports, configuration, clients) into the collector's permanent
    generation (:func:`gc.freeze`) and raise the generation-0 threshold to
    :data:`GC_GENERATION0_THRESHOLD`. Safe to call more than once; cycles are still collected."""
    import gc

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GENERATION0_THRESHOLD, gen1, gen2)


def _label(stream_arn: str) -> str:
    """A stream's label (the last part of its ARN: its creation time, so labels order streams)."""
    return stream_arn.rsplit("/", 1)[-1]


class Worker:
    """One worker process's run loop over one or more streams (``sources``).

    ``sinks`` are sink instances (already validated), ``policies`` their failure policies by
    sink name. :meth:`run` returns the process exit code: 0 after a clean stop, 1 when a shard
    failed or was stopped (trimmed data) or shutdown did not finish within ``shutdown_grace_s``.

    ``max_pages_in_flight``: at most this many GetRecords pages (of
    ``shard_settings.max_records_per_call`` records; counted in records, so small pages count for
    their size; a caught-up shard asks for and reserves at most 100 records) are held
    fetched-and-not-yet-delivered at once across all shards
    (:mod:`pipeline.runtime.read_budget`); 0 = no bound. Raises ValueError for a negative value or no source.

    ``lane_settings``: each sink's lane bounds by sink name (:mod:`pipeline.runtime.lanes`; default
    :class:`~pipeline.runtime.lanes.LaneSettings`). Every sink is fed by its own thread from
    bounded per-shard lanes, so a slow sink does not delay the others.
    """

    def __init__(self, *, sources: Sequence[StreamSource] | None = None, source: StreamSource | None = None,
                 lease_store: LeaseStore, sinks: Sequence[Any],
                 dead_letter: DeadLetterQueue, worker_id: str, logger: Any,
                 start_position: str = "TRIM_HORIZON", shard_settings: ShardSettings | None = None,
                 discovery_interval_s: float = 30.0, failover_time_s: float = 10.0, max_leases_to_steal: int = 1,
                 shutdown_grace_s: float = 30.0, policies: dict[str, FailurePolicy] | None = None,
                 aws: Any = None, clock: Callable[[], float] = time.monotonic,
                 exit_when_idle: bool = False, read_window: ReadWindow | None = None,
                 on_event_counts: Callable[..., None] | None = None,
                 on_consumer_done: Callable[[ShardConsumer], None] | None = None,
                 sink_open_timeout_s: float = 0.0, iterator_age_warning_s: float = 3600.0,
                 iterator_age_error_s: float = 72000.0, iterator_age_log_interval_s: float = 300.0,
                 health_stall_s: float = 60.0, max_pages_in_flight: int = DEFAULT_MAX_PAGES_IN_FLIGHT,
                 aws_unready_after_s: float = DEFAULT_UNREADY_AFTER_S, shard_series_ttl_s: float = 600.0,
                 worker_name: str | None = None, lane_settings: dict[str, LaneSettings] | None = None):
        self.stop_event = threading.Event()
        self._signal: int | None = None
        #: extra ``/readyz`` checks, each ``() -> list of reasons not ready`` (composition root adds them)
        self.ready_checks: list[Callable[[], list[str]]] = []
        #: since when each AWS dependency has been failing (ready() and the metrics read it)
        self.health = DependencyHealth(unready_after_s=aws_unready_after_s, clock=clock)
        self.sources = [TrackedSource(s, self.health, stopping=self._stopping, sleep=self._pause,
                                      logger=logger.bind(worker_id=worker_id))
                        for s in list(sources or []) + ([source] if source is not None else [])]
        if not self.sources:
            raise ValueError("a worker needs at least one stream source")
        self.by_arn = {s.stream_arn: s for s in self.sources}
        self.lease_store = TrackedLeaseStore(lease_store, self.health)
        self.sinks = list(sinks)
        self.dead_letter = dead_letter
        self.worker_id = worker_id
        self.log = logger.bind(worker_id=worker_id)
        self.start_position = start_position
        self.shard_settings = shard_settings or ShardSettings()
        self.discovery_interval_s = discovery_interval_s
        self.failover_time_s = failover_time_s
        self.shutdown_grace_s = shutdown_grace_s
        self.aws = aws
        self.clock = clock
        self.exit_when_idle = exit_when_idle
        self.read_window = read_window  # a finite read (replay): see ShardConsumer
        self.on_event_counts = on_event_counts
        self.on_consumer_done = on_consumer_done
        policies = policies or {}
        self.runners = [SinkRunner(sink, policies.get(sink.name, FailurePolicy())) for sink in self.sinks]
        self.fanout = FanOut(self.runners, dead_letter, stop_event=self.stop_event, logger=self.log)
        self.lanes = Lanes(self.fanout, lane_settings)
        self.worker_name = worker_name
        self._workers_seen: tuple[float, dict[str, WorkerInfo]] | None = None
        self.coordinator = LeaseCoordinator(
            self.lease_store, worker_id=worker_id, stream_arns=list(self.by_arn),
            failover_time_s=failover_time_s, logger=self.log, clock=clock, max_steal=max_leases_to_steal,
            reclaimable=self._dead_predecessor if worker_name else None)
        self.consumers: dict[str, ShardConsumer] = {}
        self.read_budget = ReadBudget(max_pages_in_flight, self.shard_settings.max_records_per_call)
        self.failed: list[tuple[str, str, str]] = []  # (shard id or "*", outcome, error)
        self._stopped_keys: set[str] = set()
        self._opened: list[Any] = []
        self._shards: dict[str, list[ShardInfo]] = {}
        self._started_at = datetime.now(timezone.utc).isoformat()
        self.sink_open_timeout_s = sink_open_timeout_s
        self.iterator_age_warning_s = iterator_age_warning_s
        self.iterator_age_error_s = iterator_age_error_s
        self.iterator_age_log_interval_s = iterator_age_log_interval_s
        self.health_stall_s = health_stall_s
        self._last_tick = clock()
        self._lease_store_error: str | None = "not checked yet"
        self._lag_logged: dict[str, float] = {}
        self._running = False
        #: shards that ended here: (table, shard id) -> when to remove their metric series
        self.shard_series_ttl_s = shard_series_ttl_s
        self._forget_series_at: dict[tuple[str, str], float] = {}
        self._stream_disabled: set[str] = set()  # followed tables whose stream is disabled now
        self._adopted: set[str] = set()  # older streams taken up from the lease table
        self._older_streams_seen: set[tuple[str, str]] = set()  # (table, stream label) in the lease table

    @property
    def source(self) -> StreamSource:
        """The first stream's source (convenience for single-stream callers)."""
        return self.sources[0]

    # -- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop (from another thread; signal handlers use :meth:`stop_from_signal`)."""
        self.stop_event.set()

    def stop_from_signal(self, signum: int) -> None:
        """Record a stop request from a signal handler. Only an attribute is assigned here — no
        lock is taken (logging and ``Event.set`` take locks, and a handler that runs while the
        main thread holds one would deadlock); the run loop acts on it within 0.2 s."""
        self._signal = signum

    def _stopping(self) -> bool:
        """True once a stop was asked for (by :meth:`stop` or a signal)."""
        return self.stop_event.is_set() or self._signal is not None

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (a retry's backoff), in steps of at most 0.2 s, returning early on a
        stop request; the health endpoint sees the loop ticking meanwhile."""
        end = self.clock() + seconds
        while not self._stopping():
            remaining = end - self.clock()
            if remaining <= 0:
                return
            self.stop_event.wait(min(0.2, remaining))
            if threading.current_thread() is threading.main_thread():
                self._tick()

    # -- health ---------------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        """(alive, detail): the run loop (or the sink-opening wait) ticked within ``health_stall_s``."""
        since = self.clock() - self._last_tick
        if since > self.health_stall_s:
            return False, f"run loop has not ticked for {since:.0f} s (limit {self.health_stall_s:g} s)"
        return True, f"loop ticked {since:.1f} s ago"

    def ready(self) -> tuple[bool, list[str]]:
        """(ready, reasons not): configuration loaded (this object exists), lease table reachable
        (the last lease-table call succeeded), every sink opened, no AWS dependency failing for
        longer than ``aws_unready_after_s`` (:class:`~pipeline.runtime.aws_health.DependencyHealth`), and
        not stopping."""
        reasons = list(self.health.ready_reasons())
        unopened = [sink.name for sink in self.sinks if sink not in self._opened]
        if unopened:
            reasons.append(f"sink(s) not open yet: {', '.join(unopened)}")
        if self._lease_store_error is not None:
            reasons.append(f"lease table: {self._lease_store_error}")
        if self.stop_event.is_set() or self._signal is not None:
            reasons.append("stopping")
        for check in self.ready_checks:  # e.g. the initial snapshot's stream-retention alarm
            reasons.extend(check())
        return not reasons, reasons

    def _tick(self) -> None:
        self._last_tick = self.clock()

    def run(self) -> int:
        """Run until stopped. Returns the exit code (see class doc)."""
        tune_garbage_collector()
        try:
            self._open_sinks()
            if self._signal is not None:
                self._on_stop_signal()  # stopped while waiting for a sink to open: a clean stop
            elif not self.stop_event.is_set():
                try:
                    retry_startup(self.lease_store.ensure_table, what="lease table", stopping=self._stopping,
                                  sleep=self._pause, logger=self.log)
                    started = True
                except TransientError as exc:
                    if not self._stopping():
                        self._lease_store_error = str(exc)
                        raise
                    started = False  # stopped while retrying: a clean stop
                except CdcError as exc:
                    self._lease_store_error = str(exc)
                    raise
                if started:
                    self._lease_store_error = None
                    self.log.info("worker_started", tables=[s.table for s in self.sources],
                                  stream_arns=[s.stream_arn for s in self.sources],
                                  sinks=[s.name for s in self.sinks])
                    self._loop()
                elif self._signal is not None:
                    self._on_stop_signal()
        except FatalSinkError as exc:
            self.log.error("worker_failed", error=str(exc))
            self.failed.append(("*", ShardOutcome.FAILED, str(exc)))
            self.stop_event.set()
        finally:
            clean = self._shutdown()
        return self._finish(clean)

    def _finish(self, clean: bool) -> int:
        code = 0 if clean and not self.failed else 1
        self.log.info("worker_stopped", exit_code=code, failed_shards=[s for s, _, _ in self.failed])
        return code

    # -- internals -----------------------------------------------------------------------------

    def _open_sinks(self) -> None:
        """Open every sink. One that fails (its service is not up yet, say) is retried with
        backoff (1 s doubling to 15 s) for ``sink_open_timeout_s``; then FatalSinkError. A stop
        request ends the wait (the run then stops cleanly)."""
        deadline = self.clock() + self.sink_open_timeout_s
        delay = 1.0
        while True:
            errors = []
            for sink in self.sinks:
                if sink in self._opened:
                    continue
                try:
                    open_sink(sink, worker_id=self.worker_id, logger=self.log, aws=self.aws,
                              dead_letter=self.dead_letter)
                except FatalSinkError as exc:
                    errors.append((sink, exc.__cause__ or exc, str(exc)))
                    continue
                self._opened.append(sink)
            self._tick()
            if not errors:
                return
            remaining = deadline - self.clock()
            if remaining <= 0:
                _, exc, message = errors[0]
                raise FatalSinkError(message) from exc
            wait = min(delay, remaining)
            for sink, _, message in errors:
                self.log.warning("sink_open_failed", sink=sink.name, error=message, retry_in_s=round(wait, 1),
                                 gives_up_in_s=round(remaining, 1))
            end = self.clock() + wait
            while self.clock() < end:  # short waits: the health endpoint sees ticks, signals are noticed
                if self._signal is not None or self.stop_event.is_set():
                    return
                self.stop_event.wait(min(0.2, max(0.0, end - self.clock())))
                self._tick()
            delay = min(delay * 2, 15.0)

    def _discover(self, first: bool) -> bool:
        """Discover every stream's shards (following table streams first, see the module doc);
        False when one failed transiently (try again soon)."""
        ok = True
        self._follow_table_streams(first)
        successors = self._successor_streams()
        for source in list(self.sources):
            try:
                try:
                    shards = source.list_shards()
                except CdcError:
                    if source.stream_arn not in self._adopted:
                        raise
                    shards = []  # an older stream that is gone: its leases end as vanished shards (a gap)
                self._shards[source.stream_arn] = shards
                start = TRIM_HORIZON if source.stream_arn in successors else self.start_position
                self.coordinator.sync_shards(source.table, source.stream_arn, shards, start,
                                             whole_stream=source.stream_arn in successors)
                self.coordinator.remove_finished_parents(source.stream_arn, [s.shard_id for s in shards])
            except TransientError as exc:
                ok = False
                self.log.warning("shard_discovery_failed", table=source.table, error=str(exc), transient=True)
            except CdcError as exc:
                if first:
                    raise  # a stream or lease table that cannot be used at start is a set-up problem
                self.log.warning("shard_discovery_failed", table=source.table, error=str(exc))
        return ok

    # -- following a table's stream (see the module doc) -----------------------------------------

    def _add_source(self, source: StreamSource) -> None:
        """Read one more stream (of a followed table), its calls tracked like the others'."""
        if not isinstance(source, TrackedSource):
            source = TrackedSource(source, self.health, stopping=self._stopping, sleep=self._pause,
                                   logger=self.log)
        self.sources.append(source)
        self.by_arn[source.stream_arn] = source
        self.coordinator.stream_arns.add(source.stream_arn)

    def _follow_table_streams(self, first: bool) -> None:
        """DescribeTable for every followed table: follow a new LatestStreamArn, notice a disabled
        stream, adopt unfinished leases of older streams of the table (see the module doc)."""
        followed = {}
        for source in list(self.sources):
            table = getattr(source, "followed_table", None)
            if table is None or table in followed:
                continue
            followed[table] = source
            try:
                arn, enabled = source.latest_stream()
            except CdcError as exc:
                self.log.warning("stream_check_failed", table=table, error=str(exc))
                continue
            metrics.STREAM_ENABLED.labels(table=table).set(1 if enabled else 0)
            if not enabled:
                if table not in self._stream_disabled:
                    self._stream_disabled.add(table)
                    metrics.STREAM_CHANGES.labels(table=table, change="disabled").inc()
                    self.log.warning("stream_disabled", table=table, stream_arn=arn,
                                     hint="the table's stream is disabled: the open shards are read to "
                                          "SHARD_END; a stream enabled again is followed from TRIM_HORIZON")
                continue
            self._stream_disabled.discard(table)
            if arn and arn not in self.by_arn:
                self._add_source(source.for_stream(arn))
                metrics.STREAM_CHANGES.labels(table=table, change="new_stream").inc()
                self.log.warning("stream_followed", table=table, stream_arn=arn,
                                 previous_stream_arns=[s.stream_arn for s in self.sources
                                                       if s.table == table and s.stream_arn != arn],
                                 rule="older streams' shards are read to SHARD_END first, then this stream "
                                      "from TRIM_HORIZON")
        if not followed:
            return
        try:
            leases = self.lease_store.list_leases()
        except CdcError as exc:
            if first:
                raise
            self.log.warning("stream_adoption_check_failed", error=str(exc))
            return
        self._older_streams_seen = {(lease.table, _label(lease.stream_arn)) for lease in leases
                                    if lease.table in followed}
        for lease in leases:
            if lease.table in followed and lease.stream_arn not in self.by_arn and lease.needs_reader:
                self._add_source(followed[lease.table].for_stream(lease.stream_arn))
                self._adopted.add(lease.stream_arn)
                metrics.STREAM_CHANGES.labels(table=lease.table, change="adopted").inc()
                self.log.warning("stream_adopted", table=lease.table, stream_arn=lease.stream_arn,
                                 hint="unfinished leases of an older stream of this table: read to SHARD_END "
                                      "before the table's current stream")

    def _successor_streams(self) -> set[str]:
        """Stream ARNs of this worker's followed tables that have an older stream of the same table
        among its sources or in the lease table (finished leases too): they start at TRIM_HORIZON."""
        older = set(self._older_streams_seen) | {(s.table, _label(s.stream_arn)) for s in self.sources}
        return {source.stream_arn for source in self.sources
                if getattr(source, "followed_table", None) is not None
                and any(table == source.table and label < _label(source.stream_arn) for table, label in older)}

    def _older_streams_done(self, lease: Lease, all_leases: list[Lease]) -> bool:
        """True when no lease of an older stream of ``lease``'s table still needs a reader."""
        label = _label(lease.stream_arn)
        return not any(other.table == lease.table and other.stream_arn != lease.stream_arn
                       and _label(other.stream_arn) < label and other.needs_reader for other in all_leases)

    def _dead_predecessor(self, owner: str) -> bool:
        """True when lease owner ``owner`` is an earlier process of this worker that is dead.

        With a configured ``worker.id`` the lease owner is ``{id}:{pid}:{random}``, unique per
        process (:attr:`pipeline.config.WorkerConfig.lease_owner`), so two live processes with one
        id never share leases. A restarted process still re-takes its predecessor's leases at once
        when it can *prove* the predecessor dead: the owner starts with ``{worker_name}:``, its
        announcement (worker record) names this host, and its pid is this process's own (a
        container's PID 1 restarted) or no longer exists (``kill(pid, 0)``: ESRCH), and its last
        heartbeat is older than this process's start. Anything else
        (another host, a live pid, no record) waits for ``failover_time_s`` as for any worker.
        """
        if not self.worker_name or not owner.startswith(self.worker_name + ":") or owner == self.worker_id:
            return False
        now = self.clock()
        if self._workers_seen is None or now - self._workers_seen[0] > 1.0:  # one read per acquire
            try:
                self._workers_seen = (now, {w.worker_id: w for w in self.lease_store.list_workers()})
            except (CdcError, AttributeError):
                return False
        info = self._workers_seen[1].get(owner)
        if info is None or info.host != socket.gethostname():
            return False
        try:
            if datetime.fromisoformat(info.heartbeat_at) >= datetime.fromisoformat(self._started_at):
                return False  # it was alive after this process started
        except (TypeError, ValueError):
            return False
        if info.pid == os.getpid():
            return True
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # e.g. EPERM: a live process of another user
        return False

    def _announce(self) -> None:
        info = WorkerInfo(worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
                          started_at=self._started_at, heartbeat_at=datetime.now(timezone.utc).isoformat(),
                          leases=len(self.coordinator.held()),
                          sink_lanes=encode_lane_status(self.lanes.status()) if self.lanes.sinks else None)
        self.lease_store.announce_worker(info)

    def _loop(self) -> None:
        next_discovery = 0.0
        next_renewal = 0.0
        renew_every = self.failover_time_s / 3.0
        first_discovery = True
        discovery_failures = renewal_failures = 0  # in a row, transient: the next try comes sooner
        while not self.stop_event.is_set():
            if self._signal is not None:
                self._on_stop_signal()
                break
            now = self.clock()
            if now >= next_discovery:
                if self._discover(first_discovery):
                    first_discovery, discovery_failures = False, 0
                    next_discovery = now + self.discovery_interval_s
                else:
                    discovery_failures += 1
                    next_discovery = now + backoff_s(discovery_failures, DISCOVERY_BACKOFF_INITIAL_S,
                                                     max(DISCOVERY_BACKOFF_INITIAL_S, self.discovery_interval_s))
            if now >= next_renewal:
                try:
                    self.coordinator.renew()
                    failed_renewals = self.coordinator.renewal_failures
                    self.coordinator.acquire()
                    self._announce()
                    self._lease_store_error = None
                except CdcError as exc:
                    failed_renewals = 1 if isinstance(exc, TransientError) else 0
                    self._lease_store_error = str(exc)
                    self.log.warning("lease_renewal_failed", error=str(exc))
                renewal_failures = renewal_failures + 1 if failed_renewals else 0
                next_renewal = now + (backoff_s(renewal_failures, RENEWAL_BACKOFF_INITIAL_S, renew_every)
                                      if renewal_failures else renew_every)
            self._tick()
            self._reap()
            self._forget_ended_shards()
            self._log_iterator_ages()
            if any(outcome == ShardOutcome.FAILED for _, outcome, _ in self.failed):
                self.stop_event.set()
                break
            try:
                self._start_ready_consumers()
                if self.exit_when_idle and not self.consumers and self._all_done():
                    self.log.info("worker_idle_exit")
                    break
            except TransientError as exc:  # the lease table did not answer: next tick
                self.log.warning("lease_table_read_failed", error=str(exc))
            self.stop_event.wait(min(0.2, renew_every))

    def _log_iterator_ages(self) -> None:
        """Warn (error past ``iterator_age_error_s``) when a shard's iterator age passes
        ``iterator_age_warning_s``, at most once per ``iterator_age_log_interval_s`` per shard."""
        now_wall = time.time()
        now = self.clock()
        for key, consumer in list(self.consumers.items()):
            # the shard's read position, or a sink's lane of it that lags further (per-sink lanes:
            # the reader goes on while a stalled sink holds the checkpoint, so its lane ages instead)
            age = consumer.iterator_age_s(now_wall)
            lane_age, slowest = self.lanes.shard_lag(consumer.source.table, consumer.shard_id, now_wall)
            if age < self.iterator_age_warning_s and lane_age < self.iterator_age_warning_s:
                continue
            sink_fields = {"slowest_sink": slowest, "sink_age_s": round(lane_age)} if slowest else {}
            age = max(age, lane_age)
            if now - self._lag_logged.get(key, float("-inf")) < self.iterator_age_log_interval_s:
                continue
            self._lag_logged[key] = now
            fields = dict(table=consumer.source.table, shard_id=consumer.shard_id, iterator_age_s=round(age), **sink_fields,
                          trim_horizon_remaining_s=round(consumer.trim_horizon_remaining_s(now_wall)))
            if age >= self.iterator_age_error_s:
                self.log.error("iterator_age_critical", **fields,
                               hint="records are trimmed after 24 h: unread ones will be lost; add workers "
                                    "(--processes) or fix the slow sink now")
            else:
                self.log.warning("iterator_age_high", **fields,
                                 hint="the shard's reader is falling behind; see ddb_cdc_sink_age_seconds "
                                      "for a slow sink")

    def _on_stop_signal(self) -> None:
        try:
            name = signal.Signals(self._signal).name
        except ValueError:
            name = str(self._signal)
        self.log.info("shutdown_requested", signal=name, grace_s=self.shutdown_grace_s)
        self.stop_event.set()

    def _start_ready_consumers(self) -> None:
        waiting = [lease for lease in self.coordinator.held()
                   if lease.lease_key not in self.consumers and lease.lease_key not in self._stopped_keys]
        # the lease table is read (for the parents' state) only when a held shard waits for a reader
        # and has parents, not on every tick of the loop
        several = {s.table for s in self.sources if sum(o.table == s.table for o in self.sources) > 1}
        all_leases = (self.lease_store.list_leases()
                      if any(w.parent_shard_ids or w.table in several for w in waiting) else [])
        for lease in waiting:
            if not lease.needs_reader:
                self.coordinator.release(lease.lease_key)
                continue
            source = self.by_arn.get(lease.stream_arn)
            if source is None:
                continue
            leases = {other.shard_id: other for other in all_leases if other.stream_arn == lease.stream_arn}
            in_stream = {s.shard_id for s in self._shards.get(lease.stream_arn, [])}
            if not self._parents_done(lease, leases, in_stream):
                continue
            if lease.table in several and not self._older_streams_done(lease, all_leases):
                continue  # an older stream of this table is not finished yet (see the module doc)
            try:
                consumer = ShardConsumer(lease.lease_key, source=source, coordinator=self.coordinator,
                                         fanout=self.fanout, dead_letter=self.dead_letter,
                                         settings=self.shard_settings, stop_event=self.stop_event,
                                         logger=self.log.bind(table=source.table), clock=self.clock,
                                         window=self.read_window, on_event_counts=self.on_event_counts,
                                         read_budget=self.read_budget, lanes=self.lanes)
            except LeaseLostError:
                continue
            self.consumers[lease.lease_key] = consumer
            consumer.start()
            self.log.info("shard_consumer_started", table=source.table, shard_id=lease.shard_id,
                          checkpoint=lease.checkpoint)

    @staticmethod
    def _parents_done(lease: Lease, leases: dict[str, Lease], in_stream: set[str]) -> bool:
        """May ``lease``'s shard start? (:func:`pipeline.lineage.parents_done`)"""
        return parents_done(lease.parent_shard_ids,
                            unfinished=lambda p: leases[p].needs_reader if p in leases else None,
                            in_stream=in_stream.__contains__)

    def _all_done(self) -> bool:
        """True when nothing is left to read: every lease finished, stopped (trimmed/failed), or
        a descendant of a stopped shard (which can never start)."""
        done = True
        any_lease = False
        all_leases = self.lease_store.list_leases()
        for arn in self.by_arn:
            leases = {lease.shard_id: lease for lease in all_leases if lease.stream_arn == arn}
            any_lease = any_lease or bool(leases)
            stopped = {lease.shard_id for lease in leases.values() if lease.lease_key in self._stopped_keys}

            parents = {sid: lease.parent_shard_ids for sid, lease in leases.items()}
            done = done and all(not lease.needs_reader or sid in stopped
                                or blocked_by(sid, parents, stopped, lambda p: leases[p].needs_reader)
                                for sid, lease in leases.items())
        return any_lease and done

    def _reap(self) -> None:
        for key, consumer in list(self.consumers.items()):
            if consumer.is_alive():
                continue  # a consumer whose lease was lost stops at its next read (owns() check)
            del self.consumers[key]
            outcome = consumer.outcome or ShardOutcome.FAILED
            if self.on_consumer_done is not None:
                self.on_consumer_done(consumer)
            if outcome in FINISHED_OUTCOMES or outcome == ShardOutcome.LEASE_LOST:
                # read no more here: its series go after the TTL (metrics.forget_shard)
                self._forget_series_at[(consumer.source.table, consumer.shard_id)] = (
                    self.clock() + self.shard_series_ttl_s)
            if outcome in FINISHED_OUTCOMES:
                self.coordinator.release(key)
            elif outcome == ShardOutcome.MOVED:
                pass  # a requested checkpoint move was applied: a new reader starts from it (parents first)
            elif outcome in STOPPING_OUTCOMES:
                self._stopped_keys.add(key)
                self.failed.append((consumer.shard_id, outcome, str(consumer.error)))
                self.log.error("shard_stopped", shard_id=consumer.shard_id, outcome=outcome,
                               error=str(consumer.error))
            elif outcome == ShardOutcome.LEASE_LOST:
                self.coordinator.drop(key, token=consumer.token)  # keeps a lease taken back since

    def _forget_ended_shards(self) -> None:
        """Remove the metric series of shards that ended here ``shard_series_ttl_s`` ago and are
        not being read here again (a lease taken back keeps its series)."""
        if not self._forget_series_at:
            return
        now = self.clock()
        reading = {(c.source.table, c.shard_id) for c in self.consumers.values()}
        for shard, due in list(self._forget_series_at.items()):
            if shard in reading:
                del self._forget_series_at[shard]
            elif now >= due:
                del self._forget_series_at[shard]
                metrics.forget_shard(shard[0], shard[1], [r.name for r in self.runners])

    def _shutdown(self) -> bool:
        """Stop every consumer, then close the sinks — in that order, and never under a running call.

        1. ``stop_event`` is set: consumers stop reading, wait until every sink's lane of their
           shard is written and flushed (:meth:`~pipeline.runtime.lanes.ShardLanes.drain`), and
           checkpoint; the sink threads keep working meanwhile.
        2. Each consumer is joined until ``shutdown_grace_s`` after the stop (one deadline for all);
           meanwhile the held leases are renewed every ``failover_time_s / 3``, so no other worker
           takes them as expired while a drain (a slow flush) is still writing their shards.
        3. The sinks are fenced (:meth:`FanOut.fence`): from now on a shard thread that reaches a
           sink gets :class:`~pipeline.runtime.fanout.SinkFenced` (a :class:`DeliveryAborted`), so a
           straggler cannot write to or flush a sink, nor checkpoint a batch that did not reach
           every sink.
        4. Only when every consumer ended: leases are released and this worker deregistered
           (a straggler's lease is left to expire, so no other worker reads the shard while it
           may still be in a sink call).
        After the fence the sink threads are told to end (:meth:`Lanes.stop`).
        5. Each opened sink is closed once no call of it is in progress; one still busy in a
           straggler (a write stuck on a slow service) is closed by that thread when its call
           returns (``sink_close_deferred``), never while it runs.

        Returns True when every consumer ended within the grace period (else the exit code is 1).
        """
        self.stop_event.set()
        deadline = self.clock() + self.shutdown_grace_s
        clean = True
        stragglers = []
        renew_every = self.failover_time_s / 3.0
        next_renewal = self.clock() + renew_every
        for consumer in list(self.consumers.values()):
            # the leases are still this worker's until released: renew them while the consumers
            # drain (a flush may take longer than failover_time_s), or another worker would take
            # them as expired and read the shards while they are still written here
            while consumer.is_alive() and self.clock() < deadline:
                consumer.join(max(0.01, min(deadline, next_renewal) - self.clock()))
                if consumer.is_alive() and next_renewal <= self.clock() < deadline:
                    self._renew_while_stopping()
                    next_renewal = self.clock() + renew_every
            if self.on_consumer_done is not None and not consumer.is_alive():
                self.on_consumer_done(consumer)
            if consumer.is_alive():
                clean = False
                stragglers.append(consumer)
                self.log.error("shutdown_grace_exceeded", shard_id=consumer.shard_id,
                               grace_s=self.shutdown_grace_s)
        self.fanout.fence()
        self.lanes.stop()  # sink threads start no further call; one inside a call ends when it returns
        if stragglers:
            busy = {runner.name: runner.in_flight for runner in self.runners if runner.in_flight}
            self.log.error("sinks_fenced", shard_ids=[c.shard_id for c in stragglers], sink_calls_in_progress=busy,
                           hint="shutdown took longer than worker.shutdown_grace_s: no shard thread may use a sink "
                                "from now on; batches not flushed to every sink are not checkpointed and are read "
                                "again by the shard's next owner (after failover_time_s); exit code 1")
        if clean:
            try:
                self.coordinator.release_all()
            except CdcError as exc:
                self.log.warning("lease_release_failed", error=str(exc))
            try:
                self.lease_store.remove_worker(self.worker_id)
            except (CdcError, AttributeError) as exc:
                self.log.warning("worker_deregister_failed", error=str(exc))
        for runner in self.runners:
            if runner.sink not in self._opened:
                continue
            if not runner.close_when_idle(lambda sink=runner.sink: self._close_sink(sink)):
                self.log.warning("sink_close_deferred", sink=runner.name, calls_in_progress=runner.in_flight,
                                 hint="a straggling shard thread is still inside this sink's write/flush; "
                                      "the sink is closed when that call returns, not before")
        return clean

    def _renew_while_stopping(self) -> None:
        """Renew the held leases during the shutdown's drain (no acquiring, no balancing); a lease
        found lost is dropped, so its consumer's final checkpoint is refused. Errors are logged."""
        try:
            self.coordinator.renew()
        except CdcError as exc:
            self.log.warning("lease_renewal_failed", error=str(exc), during="shutdown")

    def _close_sink(self, sink: Any) -> None:
        """Close one sink; an error is logged (``sink_close_failed``), never raised."""
        try:
            sink.close()
        except Exception as exc:
            self.log.warning("sink_close_failed", sink=sink.name, error=str(exc))
