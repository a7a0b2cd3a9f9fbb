"""``source.initial_snapshot: true``: a worker group's first start takes the stream's position,
then snapshots the table into its sinks while the stream is consumed.

Decision (before the worker creates any lease): the table needs a snapshot when the snapshot
namespace of the lease store has an unfinished *claim* for it (a snapshot was begun: resume it),
or when it has no claim and no lease of the table holds a checkpoint yet (nothing read: a first
start). A group that already has checkpoints and no claim was started without
``initial_snapshot``; it is not snapshotted behind its back (``ddb-cdc snapshot`` does that) —
logged as ``initial_snapshot_skipped``.

The claim, ``{table}:initial`` in the ``snapshot`` namespace (checkpoint JSON
``{"state": "pending" | "done"}``), is created with a conditional put, so one worker of the group
runs the snapshot; it renews the claim every ``failover_time_s / 3``. Another worker that sees
the claim's counter unchanged for ``3 × failover_time_s`` takes it over (conditional on the
counter) and resumes the snapshot from its segment checkpoints.

Order (see :mod:`pipeline.snapshot.version`): the snapshot starts only once the stream's
position is taken — every lease of the table exists and none still says ``LATEST`` (a LATEST
start is made concrete by its first reader) — plus :data:`SETTLE_S` for eventual consistency;
its T0 is then. The snapshot uses its own sink instances (same configuration), so the worker's
shards and the snapshot never share a sink call. While it runs, :mod:`pipeline.snapshot.retention`
watches the stream consumer's lag and throttles the snapshot first.
"""

from __future__ import annotations

import collections
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

import orjson

from pipeline.checkpoint import Lease
from pipeline.errors import LeaseLostError
from pipeline.events import LATEST, TRIM_HORIZON
from pipeline.snapshot.progress import SNAPSHOT_NAMESPACE
from pipeline.snapshot.ratelimit import RcuLimiter
from pipeline.snapshot.retention import STREAM_RETENTION_S, RetentionAssessment, assess

#: Seconds between the stream position being taken and the snapshot's first Scan.
SETTLE_S = 1.0
#: How often the stream consumer's lag is checked while the snapshot runs, in seconds.
RETENTION_CHECK_S = 5.0


def _claim_checkpoint(state: str) -> str:
    return orjson.dumps({"state": state, "at": datetime.now(timezone.utc).isoformat()}).decode()


class InitialSnapshot:
    """Runs the initial snapshot of ``table`` beside a worker (see the module doc).

    ``settings``: the worker's; ``lease_store``: the live store (not namespaced); ``owner``: the
    worker's lease owner; ``stopping()``: True once the worker stops; ``retention_s``: the
    stream's retention (24 h; tests scale it down); ``lag_window_s``: the lag judged is the largest
    sampled over this many seconds (a caught-up empty read between late pages reads as 0).
    """

    def __init__(self, settings: Any, *, table: str, lease_store: Any, owner: str, logger: Any,
                 stopping: Callable[[], bool], failover_time_s: float = 10.0,
                 retention_s: float = STREAM_RETENTION_S, max_rcu: float | None = None,
                 segments: int | None = None, lag_window_s: float = 60.0):
        self.settings = settings
        self.table = table
        self.live = lease_store
        self.store = lease_store.in_namespace(SNAPSHOT_NAMESPACE)
        self.owner = owner
        self.log = logger.bind(component="initial_snapshot", table=table)
        self.stopping = stopping
        self.failover_time_s = failover_time_s
        self.retention_s = retention_s
        self.max_rcu = max_rcu
        self.segments = segments
        self.lag_window_s = lag_window_s
        self._lag_samples: collections.deque = collections.deque()
        self.stop_event = threading.Event()
        self.limiter: RcuLimiter | None = None
        self.assessment = RetentionAssessment("ok", 0.0, 1.0, 0.0)
        self.report: Any = None
        self.state = "idle"  # idle | waiting | waiting_for_stream | running | done | skipped | failed
        self._claim: Lease | None = None
        self._thread: threading.Thread | None = None

    @property
    def claim_key(self) -> str:
        """``{table}:initial``."""
        return f"{self.table}:initial"

    # -- decision -------------------------------------------------------------------------------

    def decide(self) -> bool:
        """Whether this group snapshots the table (creates the claim on a first start). Call before
        the worker creates leases."""
        self.store.ensure_table()
        claim = self.store.get_lease(self.claim_key)
        if claim is not None:
            done = orjson.loads(claim.checkpoint).get("state") == "done" if claim.checkpoint.startswith("{") else False
            self.state = "done" if done else "waiting"
            return not done
        read = [lease for lease in self.live.list_leases()
                if lease.table == self.table and lease.checkpoint not in (TRIM_HORIZON, LATEST)]
        if read:
            self.state = "skipped"
            self.log.warning("initial_snapshot_skipped", leases_with_checkpoints=len(read),
                             detail="the lease table has checkpoints but no snapshot claim: this group was "
                                    "started without initial_snapshot; run `ddb-cdc snapshot` to backfill")
            return False
        created = self.store.create_lease_if_absent(Lease(
            lease_key=self.claim_key, table=self.table, stream_arn="snapshot:initial", shard_id="initial",
            owner=self.owner, checkpoint=_claim_checkpoint("pending")))
        self.state = "waiting"
        self.log.info("initial_snapshot_claimed" if created else "initial_snapshot_claimed_by_another")
        return True

    # -- running --------------------------------------------------------------------------------

    def start(self) -> bool:
        """:meth:`decide`, then run in a background thread when needed. Returns the decision."""
        if not self.decide():
            return False
        self._thread = threading.Thread(target=self._main, name="initial-snapshot", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the snapshot (it flushes and checkpoints) and wait for it."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _stopped(self) -> bool:
        if self.stopping():
            self.stop_event.set()
        return self.stop_event.is_set()

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when stopped meanwhile."""
        end = time.monotonic() + seconds
        while not self._stopped():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.stop_event.wait(min(0.2, left))
        return True

    def _acquire_claim(self) -> bool:
        """Own the claim: ours already, or taken over from a silent owner. False when done/stopped."""
        seen: tuple[int, float] | None = None
        while not self._stopped():
            claim = self.store.get_lease(self.claim_key)
            if claim is None or orjson.loads(claim.checkpoint).get("state") == "done":
                self.state = "done"
                return False
            now = time.monotonic()
            if claim.owner in (None, self.owner) or (seen is not None and seen[0] == claim.counter
                                                      and now - seen[1] >= 3 * self.failover_time_s):
                try:
                    self._claim = self.store.take_lease(claim, self.owner)
                    if claim.owner not in (None, self.owner):
                        self.log.warning("initial_snapshot_taken_over", previous_owner=claim.owner)
                    return True
                except LeaseLostError:
                    seen = None
                    continue
            if seen is None or seen[0] != claim.counter:
                seen = (claim.counter, now)
            if self._wait(max(0.5, self.failover_time_s / 3)):
                return False
        return False

    def _stream_position_taken(self) -> bool:
        leases = [lease for lease in self.live.list_leases() if lease.table == self.table]
        return bool(leases) and all(lease.checkpoint != LATEST for lease in leases)

    def _heartbeat(self, done: threading.Event) -> None:
        while not done.wait(max(0.2, self.failover_time_s / 3)):
            try:
                if self._claim is not None:
                    self._claim = self.store.renew_lease(self._claim)
            except LeaseLostError:
                self.log.error("initial_snapshot_claim_lost", detail="another worker took the snapshot over")
                self.stop_event.set()
                return
            except Exception as exc:  # noqa: BLE001 - retried at the next beat
                self.log.warning("initial_snapshot_heartbeat_failed", error=str(exc)[:300])
            self._check_retention()

    def _check_retention(self) -> None:
        try:
            behind = max((lease.behind_ms or 0 for lease in self.live.list_leases()
                          if lease.table == self.table and not lease.finished), default=0)
        except Exception:  # noqa: BLE001 - the lease store is watched by the worker itself
            return
        now = time.monotonic()
        self._lag_samples.append((now, behind))
        while self._lag_samples and self._lag_samples[0][0] < now - self.lag_window_s:
            self._lag_samples.popleft()
        # the largest lag of the window: an empty read between two late pages reads as 0 behind
        new = assess(max(b for _, b in self._lag_samples), self.retention_s)
        if new.level != self.assessment.level:
            event = {"ok": "snapshot_stream_caught_up", "warn": "snapshot_stream_behind",
                     "alarm": "snapshot_stream_near_trim_horizon"}[new.level]
            (self.log.error if new.level == "alarm" else self.log.warning if new.level == "warn" else self.log.info)(
                event, behind_s=round(new.behind_s, 1), retention_s=self.retention_s, ratio=round(new.ratio, 3),
                snapshot_rate_factor=new.factor)
        self.assessment = new
        if self.limiter is not None:
            self.limiter.slow_down(new.factor)
        try:
            from pipeline.snapshot.metrics import observe_retention

            observe_retention(self.table, new)
        except Exception:  # noqa: BLE001 - metrics are best effort
            pass

    def ready_reasons(self) -> list[str]:
        """``/readyz`` reasons: the stream is near its trim horizon while the snapshot runs."""
        reason = self.assessment.reason if self.state == "running" else None
        return [reason] if reason else []

    def _main(self) -> None:
        from connectors.snapshot.run import SnapshotOptions, run_snapshot
        from pipeline.registry import build_sinks
        from pipeline.snapshot.metrics import observe_items
        from pipeline.snapshot.ratelimit import DEFAULT_MAX_RCU

        try:
            if not self._acquire_claim():
                return
            done = threading.Event()
            beat = threading.Thread(target=self._heartbeat, args=(done,), name="initial-snapshot-claim", daemon=True)
            beat.start()
            try:
                self.state = "waiting_for_stream"
                while not self._stream_position_taken():
                    if self._wait(0.5):
                        return
                if self._wait(SETTLE_S):
                    return
                self.state = "running"
                self.limiter = RcuLimiter(self.max_rcu if self.max_rcu is not None else DEFAULT_MAX_RCU,
                                          segments=self.segments or 4)
                self._check_retention()
                opts = SnapshotOptions(table=self.table, segments=self.segments,
                                       max_rcu=self.limiter.max_rcu or 0)

                def segments_known(state: Any) -> None:
                    self.limiter.segments = state.meta.segments

                self.report = run_snapshot(self.settings, opts, sinks=build_sinks(self.settings.sinks, "config"),
                                           logger=self.log, stop_event=self.stop_event, store=self.live,
                                           limiter=self.limiter, on_plan=segments_known,
                                           on_tick=lambda r: observe_items(self.table, r.items))
                if self.report.ended == "done":
                    self._claim = self.store.checkpoint(self._claim, _claim_checkpoint("done"))
                    self.state = "done"
                    self.log.info("initial_snapshot_done", items=self.report.items,
                                  snapshot_id=self.report.snapshot_id)
                else:
                    self.state = "failed" if self.report.ended == "failed" else "stopped"
            finally:
                done.set()
                beat.join(5)
                if self._claim is not None and self.state != "done":
                    try:
                        self.store.release_lease(self._claim)  # another worker (or the next start) resumes
                    except Exception:  # noqa: BLE001 - taken over after 3 × failover_time_s anyway
                        pass
        except Exception as exc:  # noqa: BLE001 - logged; the stream consumer goes on
            self.state = "failed"
            self.log.error("initial_snapshot_failed", error=f"{type(exc).__name__}: {exc}"[:500])


def start_for_worker(settings: Any, worker: Any, *, logger: Any,
                     retention_s: float = STREAM_RETENTION_S) -> InitialSnapshot | None:
    """Start the initial snapshot beside ``worker`` (built, not yet running) for the configured
    table; adds its ``/readyz`` check to the worker. Returns it, or None when the source names no
    single table (a stream ARN: use ``ddb-cdc snapshot --table``). Raises CheckpointStoreError."""
    tables = [value for kind, value in settings.source.stream_specs() if kind == "table"]
    if len(tables) != 1:
        logger.warning("initial_snapshot_skipped", detail="initial_snapshot needs exactly one source.table "
                       f"(found {len(tables)}); run `ddb-cdc snapshot --table T` for each table instead")
        return None
    src = settings.source
    snap = InitialSnapshot(settings, table=tables[0], lease_store=getattr(worker.lease_store, "inner", worker.lease_store), owner=worker.worker_id,
                           logger=logger, stopping=worker._stopping, failover_time_s=worker.failover_time_s,
                           retention_s=retention_s, max_rcu=src.snapshot_max_rcu, segments=src.snapshot_segments)
    snap.start()
    worker.ready_checks.append(snap.ready_reasons)
    return snap
