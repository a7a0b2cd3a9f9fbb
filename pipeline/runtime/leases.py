"""Lease coordination for one worker: create leases for shards, take, renew, checkpoint, release.

The protocol is KCL's: a lease is free when it has no owner, expired when its ``leaseCounter``
has not changed for ``failover_time_s`` seconds as observed by this worker (clocks of different
hosts are never compared), and taken by a conditional write on the counter this worker saw.
The owner renews every ``failover_time_s / 3`` seconds by incrementing the counter. Checkpoints
are conditional on owner and counter, so a worker that lost a lease can never move its
checkpoint (:class:`pipeline.errors.LeaseLostError`).

Load balancing (KCL's algorithm): the live workers are this one plus the owners of leases that
are not expired; the fair share is ``ceil(unfinished leases / live workers)``. A worker below its
share takes free and expired leases first; if still below, it steals from the most loaded worker,
at most ``max_steal`` lease per renewal interval (``checkpoints.max_leases_to_steal``) and only
while that worker holds more than the share, so counts converge to differ by at most one. The
lease to steal is picked at random among the victim's (as KCL's ``LeaseTaker``). A steal whose
conditional write loses reads the lease again: when the victim only renewed it since the scan
(an owner renews each lease every ``failover_time_s / 3``, so with hundreds of leases per worker
a good part of a scan is stale by the time the steals are written), it is taken at its current
counter; when another worker took it, the steal tries another lease, up to
``max(STEAL_MISSES_PER_RENEWAL, max_steal)`` such misses per renewal (:data:`STEAL_MISSES_PER_RENEWAL`):
with several newcomers stealing from one worker in the same renewal, a fifth of a scan's leases of
the victim can be gone by the time the steals are written, and each miss costs only one
conditional write and one GetItem.

All methods are thread-safe: shard threads checkpoint while the main loop renews.

Transient lease-table errors (:class:`pipeline.errors.TransientError`: 5xx, timeouts) do not lose
a lease by themselves: a renewal that fails is tried again at the next renewal, a checkpoint is
retried with backoff (:mod:`pipeline.runtime.aws_health`). But a lease whose writes have been failing is
treated as lost once ``failover_time_s`` has passed since the *send* time of its last write that
succeeded — the earliest moment another worker can see it expired — so this worker never keeps
acting as owner past that. A conditional-write failure right after a failed (possibly applied)
write is checked against the stored lease: if it shows this owner and exactly one more counter
step, that write did land and the lease is kept.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from pipeline import metrics
from pipeline.runtime.aws_health import CHECKPOINT_BACKOFF_INITIAL_S, CHECKPOINT_BACKOFF_MAX_S
from pipeline.checkpoint import Lease, LeaseStore, MoveRequest, lease_key_for
from pipeline.codec import child_version_floor
from pipeline.errors import LeaseLostError, TransientError
from pipeline.events import LATEST, SHARD_END, TRIM_HORIZON
from pipeline.source import STREAM_RETENTION_S, ShardInfo


#: Seconds subtracted from the retention at the first sync of a stream (see
#: :func:`first_sync_retained_since`): a record older than ``24 h - this`` when the worker first starts
#: may be trimmed before the first catch-up reaches it, and its loss is not counted.
FIRST_SYNC_HEAD_MARGIN_S = 3600


def first_sync_retained_since(now_s: float) -> int:
    """``retainedSince`` of a shard listed at the first sync of its stream (``Lease.retained_since``;
    epoch s): ``floor(now_s) - 24 h + FIRST_SYNC_HEAD_MARGIN_S``. Nothing was promised before the
    worker existed: a record created earlier than 24 h before its first start may already have been
    trimmed then (DynamoDB Streams keeps records 24 hours — DynamoDB developer guide, "Change data
    capture for DynamoDB Streams"), so only records created after this time count for the head
    check. Such a record is younger than ``24 h - margin`` at the first start, so it is still
    retained for ``margin`` seconds: a head check within that time after the first start never
    reports a gap, one later does when a record created after this time was trimmed before it
    was read (the first catch-up was too slow)."""
    return math.floor(now_s) - STREAM_RETENTION_S + FIRST_SYNC_HEAD_MARGIN_S


#: failed steals (the lease was taken by another worker since the scan, or could not be read
#: again) after which a worker stops stealing until its next renewal, at the least: the limit is
#: ``max(STEAL_MISSES_PER_RENEWAL, max_steal)``, so one renewal writes at most about
#: ``2 × max_steal`` steals
STEAL_MISSES_PER_RENEWAL = 3


class LeaseCoordinator:
    """Owns this worker's view of the lease table, for every stream in ``stream_arns``.

    ``clock`` returns monotonic seconds (injectable for tests). ``max_steal``: leases taken from
    other workers per :meth:`acquire` call (default 1). ``reclaimable(owner) -> bool``: True for
    another owner name known to be an earlier, dead process of this worker (see
    :meth:`pipeline.runtime.worker.Worker._dead_predecessor`); its leases are taken at once, like this
    worker's own (``reason: own``), instead of after ``failover_time_s``. ``rng``: picks the
    lease to steal among the victim's (``choice``; default a fresh :class:`random.Random`).
    """

    def __init__(self, store: LeaseStore, *, worker_id: str, stream_arns: Iterable[str],
                 failover_time_s: float, logger: Any, clock: Callable[[], float] = time.monotonic,
                 max_steal: int = 1, reclaimable: Callable[[str], bool] | None = None,
                 rng: random.Random | None = None):
        self.store = store
        self.worker_id = worker_id
        self.stream_arns = set(stream_arns)
        self.failover_time_s = failover_time_s
        self.log = logger
        self.clock = clock
        self.max_steal = max_steal
        self._random = rng or random.Random()
        self.reclaimable = reclaimable
        self._lock = threading.RLock()
        self._held: dict[str, Lease] = {}
        self._observed: dict[str, tuple[int, float]] = {}
        self._behind: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._next_token = 0
        self.takeovers = 0  # leases taken from another owner (expired or stolen), since start
        self.steals = 0  # of which stolen to balance (their owner was live)
        self.steal_misses = 0  # steal writes that lost (the lease was renewed or taken since it was read)
        self._confirmed: dict[str, float] = {}  # lease key -> send time of its last successful write
        self._failing: set[str] = set()  # lease keys whose last write failed transiently

    # -- shards → leases -----------------------------------------------------------------------

    def sync_shards(self, table: str, stream_arn: str, shards: Iterable[ShardInfo], start_position: str,
                    *, whole_stream: bool = False) -> list[Lease]:
        """Create a lease for every shard of ``stream_arn`` that has none yet.

        On the first sync of a stream (no lease of it exists) shards start at ``start_position``;
        with LATEST, closed shards are created as SHARD_END (their data is older than "now").
        Shards found later always start at TRIM_HORIZON, so a child never loses records; such a
        shard (and a child of a shard listed with it) also records its StartingSequenceNumber,
        so that a head trimmed before it was read is seen as a gap (``ShardConsumer``) — for a
        child listed at the first sync only records created after ``retainedSince``
        (:func:`first_sync_retained_since`) count: what was trimmed before the worker existed is
        no gap; so does a LATEST lease, whose ``AT_TIMESTAMP:`` checkpoint (below) a later owner reads from
        TRIM_HORIZON (a first record that is the shard's first is then no gap).
        A LATEST lease is made concrete by the first reader that takes it, before it delivers
        anything (``AT_TIMESTAMP:`` then ``AT_SEQUENCE_NUMBER:`` checkpoints; see
        :meth:`pipeline.runtime.shard_consumer.ShardConsumer._resolve_latest`), so a hand-off never
        takes a fresh LATEST iterator. ``whole_stream``: every record of this stream must be read
        (a table's new stream followed after an older one), so its first shards record their
        StartingSequenceNumber too. Returns the leases created.
        """
        shards = list(shards)
        existing = {lease.shard_id for lease in self.store.list_leases() if lease.stream_arn == stream_arn}
        first_sync = not existing
        retained_since = first_sync_retained_since(time.time()) if first_sync and not whole_stream else None
        known = existing | {shard.shard_id for shard in shards}
        created = []
        for shard in shards:
            if shard.shard_id in existing:
                continue
            if first_sync and start_position == LATEST:
                checkpoint = SHARD_END if shard.closed else LATEST
            else:
                checkpoint = TRIM_HORIZON
            # a shard whose parent this table reads, or any shard found after the first sync, must
            # be read from its first record: remember where that is, to see a trimmed head
            from_start = checkpoint == TRIM_HORIZON and (whole_stream or not first_sync
                                                         or shard.parent_shard_id in known)
            lease = Lease(
                lease_key=lease_key_for(table, stream_arn, shard.shard_id),
                table=table,
                stream_arn=stream_arn,
                shard_id=shard.shard_id,
                checkpoint=checkpoint,
                parent_shard_ids=(shard.parent_shard_id,) if shard.parent_shard_id else (),
                starting_sequence_number=(shard.starting_sequence_number
                                          if from_start or checkpoint == LATEST else None),
                retained_since=retained_since if from_start else None,
            )
            if self.store.create_lease_if_absent(lease):
                created.append(lease)
                self.log.info("lease_created", table=table, shard_id=shard.shard_id, checkpoint=checkpoint,
                              parent_shard_id=shard.parent_shard_id)
        return created

    def version_floor(self, lease: Lease) -> int:
        """The version floor of ``lease``'s shard (:func:`pipeline.codec.record_version`): the one
        stored in the lease, else computed from its parents' leases
        (:func:`pipeline.codec.child_version_floor`; 0 when none of them is in the store — the
        parents were never read through this lease table). A reader asks for it only once every
        parent reached SHARD_END, and parent leases are deleted only after their children's first
        checkpoint, which stores the floor — so every reader of a shard gets the same floor."""
        if lease.version_floor is not None:
            return lease.version_floor
        parents = []
        for parent_id in lease.parent_shard_ids:
            key = lease_key_for(lease.table, lease.stream_arn, parent_id)
            # transient lease-table errors are retried like a gap's write (up to 60 s)
            for attempt in Retrying(retry=retry_if_exception_type(TransientError), stop=stop_after_delay(60.0),
                                    wait=wait_exponential_jitter(multiplier=CHECKPOINT_BACKOFF_INITIAL_S,
                                                                 max=CHECKPOINT_BACKOFF_MAX_S), reraise=True):
                with attempt:
                    parent = self.store.get_lease(key)
            if parent is not None:
                parents.append((parent.version_floor, parent.version_high))
        return child_version_floor(parents)

    def child_shard_ids(self, stream_arn: str, shard_id: str) -> list[str]:
        """The shard ids of the leases of ``stream_arn`` whose parent is ``shard_id`` (its children
        as far as this lease table knows them). Raises what ``list_leases`` raises."""
        return [lease.shard_id for lease in self.store.list_leases()
                if lease.stream_arn == stream_arn and shard_id in lease.parent_shard_ids]

    def remove_finished_parents(self, stream_arn: str, shards_in_stream: Iterable[str]) -> list[Lease]:
        """Delete finished leases of shards that have left the stream and whose children all started.

        A child has started once its checkpoint is past its start (a sequence number or
        SHARD_END). A finished shard with no children yet is kept (it is re-checked every
        discovery), and so is one still listed by DescribeStream. Returns the leases deleted.
        """
        in_stream = set(shards_in_stream)
        leases = [lease for lease in self.store.list_leases() if lease.stream_arn == stream_arn]
        deleted = []
        for lease in leases:
            if not lease.finished or lease.move is not None or lease.shard_id in in_stream:
                continue
            children = [c for c in leases if lease.shard_id in c.parent_shard_ids]
            if not children or not all(c.checkpoint not in (TRIM_HORIZON, LATEST) for c in children):
                continue
            try:
                self.store.delete_lease(lease)
            except LeaseLostError:
                continue
            deleted.append(lease)
            self.log.info("parent_lease_removed", shard_id=lease.shard_id,
                          children=[c.shard_id for c in children])
        return deleted

    # -- taking and renewing -------------------------------------------------------------------

    def _is_expired(self, lease: Lease, now: float) -> bool:
        seen = self._observed.get(lease.lease_key)
        return seen is not None and seen[0] == lease.counter and now - seen[1] >= self.failover_time_s

    def acquire(self) -> list[Lease]:
        """Take leases up to this worker's fair share: free and expired first, then steal.

        Finished (SHARD_END) leases are never taken. Returns the leases newly taken.
        """
        now = self.clock()
        leases = [lease for lease in self.store.list_leases() if lease.stream_arn in self.stream_arns]
        for lease in leases:
            seen = self._observed.get(lease.lease_key)
            if seen is None or seen[0] != lease.counter:
                self._observed[lease.lease_key] = (lease.counter, now)
        with self._lock:
            # a lease the table shows with another owner is lost, whatever we still believe
            for lease in leases:
                if lease.lease_key in self._held and lease.owner != self.worker_id:
                    self._forget(lease.lease_key)
                    self.log.warning("lease_lost", shard_id=lease.shard_id, new_owner=lease.owner)
            held_keys = set(self._held)
        active = [lease for lease in leases if lease.needs_reader]
        verdicts: dict[str, bool] = {}

        def own(owner: str | None) -> bool:
            """This worker's name, or an earlier dead process of it (``reclaimable``)."""
            if owner == self.worker_id:
                return True
            if owner is None or self.reclaimable is None:
                return False
            if owner not in verdicts:
                verdicts[owner] = bool(self.reclaimable(owner))
            return verdicts[owner]

        owners = Counter(lease.owner for lease in active
                         if lease.owner and not own(lease.owner) and not self._is_expired(lease, now))
        live_workers = len(owners) + 1
        target = math.ceil(len(active) / live_workers) if active else 0
        taken: list[Lease] = []

        def take(lease: Lease, why: str) -> bool:
            sent = self.clock()
            try:
                new = self.store.take_lease(lease, self.worker_id)
            except LeaseLostError:
                if why == "balance":
                    self.steal_misses += 1
                return False
            with self._lock:
                self._held[new.lease_key] = new
                self._confirm(new.lease_key, sent)
                self._next_token += 1
                self._tokens[new.lease_key] = self._next_token  # a new period of ownership
            self._observed[new.lease_key] = (new.counter, now)
            if lease.owner and lease.owner != self.worker_id:
                self.takeovers += 1
                metrics.LEASE_TAKEOVERS.labels(table=new.table).inc()
            self.log.info("lease_taken", shard_id=new.shard_id, table=new.table, reason=why,
                          previous_owner=lease.owner, checkpoint=new.checkpoint, lease_counter=new.counter,
                          held=len(held_keys) + len(taken) + 1, target=target)
            taken.append(new)
            return True

        # ours from before (e.g. a failed release): the counter check protects the take
        candidates = [lease for lease in active if lease.lease_key not in held_keys and (
            lease.owner is None or own(lease.owner) or self._is_expired(lease, now))]
        candidates.sort(key=lambda lease: (lease.owner is not None and not own(lease.owner), lease.lease_key))
        for lease in candidates:
            if len(held_keys) + len(taken) >= target:
                break
            take(lease, "free" if lease.owner is None else "own" if own(lease.owner) else "expired")
        stolen = missed = 0
        tried: set[str] = set()
        while len(held_keys) + len(taken) < target and stolen < self.max_steal and owners:
            victim, count = owners.most_common(1)[0]
            if count <= target and count <= len(held_keys) + len(taken) + 1:
                break  # counts already differ by at most one
            mine = held_keys | {lease.lease_key for lease in taken}  # `active` still shows taken ones as theirs
            theirs = [lease for lease in active
                      if lease.owner == victim and lease.lease_key not in mine and lease.lease_key not in tried]
            if not theirs:
                break
            # a random one of the victim's leases (KCL's LeaseTaker does the same): workers stealing
            # from one victim in the same renewal then rarely race for the same lease
            lease = self._random.choice(theirs)
            tried.add(lease.lease_key)
            if take(lease, "balance") or self._steal_renewed(lease, victim, take):
                owners[victim] -= 1
                stolen += 1
                self.steals += 1
            else:  # taken by another worker since the scan (or no longer readable): try another
                missed += 1
                if missed >= max(STEAL_MISSES_PER_RENEWAL, self.max_steal):
                    break
        return taken

    def _steal_renewed(self, lease: Lease, victim: str, take: Callable[[Lease, str], bool]) -> bool:
        """After a steal of ``lease`` lost its conditional write: read the lease again (one
        GetItem) and, when ``victim`` still holds it and it still needs a reader (its owner only
        renewed it since the scan, the usual cause: an owner renews each lease every
        ``failover_time_s / 3``), take it at its current counter. True when that take landed."""
        try:
            current = self.store.get_lease(lease.lease_key)
        except TransientError:
            return False
        return (current is not None and current.owner == victim and current.needs_reader
                and take(current, "balance"))

    def renew(self) -> list[Lease]:
        """Renew every held lease; returns those lost (someone else wrote them, or their renewals
        kept failing until they would have expired). A renewal that fails transiently keeps the
        lease (it is tried again on the next call) until then; :attr:`renewal_failures` counts the
        leases whose renewal failed on this call."""
        lost = []
        self.renewal_failures = 0
        for key in list(self._held):
            with self._lock:
                lease = self._held.get(key)
                if lease is None:
                    continue
                sent = self.clock()
                try:
                    self._held[key] = self.store.renew_lease(lease, behind_ms=self._behind.get(key))
                    self._confirm(key, sent)
                except LeaseLostError:
                    current = self._landed(key, lease)
                    if current is not None:
                        self._held[key] = current  # the failed renewal before did land
                        continue
                    self._forget(key)
                    lost.append(lease)
                    self.log.warning("lease_lost", shard_id=lease.shard_id, lease_counter=lease.counter)
                except TransientError as exc:
                    self._failing.add(key)
                    self.renewal_failures += 1
                    if self._expired(key):
                        self._forget(key)
                        lost.append(lease)
                        self.log.error("lease_expired_unrenewed", shard_id=lease.shard_id, error=str(exc),
                                       failover_time_s=self.failover_time_s,
                                       hint="the lease table did not answer for failover_time_s: another "
                                            "worker may take this shard now, so this one stops reading it")
                    else:
                        self.log.warning("lease_renewal_retry", shard_id=lease.shard_id, error=str(exc),
                                         expires_in_s=round(self._expires_in(key), 2))
        return lost

    renewal_failures = 0

    def _confirm(self, key: str, sent: float) -> None:
        """A write of ``key`` sent at ``sent`` (monotonic s) succeeded. Call with the lock held."""
        self._confirmed[key] = sent
        self._failing.discard(key)

    def _expires_in(self, key: str) -> float:
        return self._confirmed.get(key, self.clock()) + self.failover_time_s - self.clock()

    def _expired(self, key: str) -> bool:
        """True when ``key``'s writes have been failing and ``failover_time_s`` passed since the
        send time of its last successful write (another worker may see it expired now)."""
        return key in self._failing and self._expires_in(key) <= 0

    def _landed(self, key: str, lease: Lease) -> Lease | None:
        """After a conditional failure of a write of ``lease``: when an earlier write of it failed
        transiently (it may have been applied all the same) and the stored lease shows this owner
        one counter step further, that write landed: returns the stored lease. Else None."""
        if key not in self._failing:
            return None
        try:
            current = self.store.get_lease(key)
        except TransientError:
            return None
        if current is not None and current.owner == self.worker_id and current.counter == lease.counter + 1:
            self.log.info("lease_write_landed", shard_id=lease.shard_id, lease_counter=current.counter)
            return current
        return None

    # -- used by shard consumers ----------------------------------------------------------------

    def held(self) -> list[Lease]:
        """The leases this worker holds now."""
        with self._lock:
            return list(self._held.values())

    def get(self, lease_key: str) -> Lease | None:
        """The held lease ``lease_key``, or None if not held (lost or released)."""
        with self._lock:
            return self._held.get(lease_key)

    def token(self, lease_key: str) -> int | None:
        """The ownership token of a held lease: it changes every time the lease is taken, so a
        consumer started in an earlier period of ownership can tell that it is stale."""
        with self._lock:
            return self._tokens.get(lease_key) if lease_key in self._held else None

    def owns(self, lease_key: str, token: int | None = None) -> bool:
        """True while this worker holds ``lease_key`` (in the period of ownership ``token``, if given)."""
        with self._lock:
            if lease_key in self._failing and self._expired(lease_key):
                return False  # writes kept failing until it would have expired: not ours any more
            return lease_key in self._held and (token is None or self._tokens.get(lease_key) == token)

    def _forget(self, lease_key: str) -> None:
        self._held.pop(lease_key, None)
        self._tokens.pop(lease_key, None)
        self._confirmed.pop(lease_key, None)
        self._failing.discard(lease_key)

    def record_gap(self, gap) -> None:
        """Store (or update) a :class:`pipeline.checkpoint.Gap` in the lease table; transient
        errors are retried with backoff for up to 60 s."""
        for attempt in Retrying(retry=retry_if_exception_type(TransientError), stop=stop_after_delay(60.0),
                                wait=wait_exponential_jitter(multiplier=CHECKPOINT_BACKOFF_INITIAL_S,
                                                             max=CHECKPOINT_BACKOFF_MAX_S), reraise=True):
            with attempt:
                self.store.record_gap(gap)

    def report_behind(self, lease_key: str, behind_ms: int) -> None:
        """A consumer's current lag (ms); written with the next renewal or checkpoint."""
        self._behind[lease_key] = int(behind_ms)

    def pending_move(self, lease_key: str) -> MoveRequest | None:
        """The move request the store showed on the last write of held lease ``lease_key``
        (renewal, checkpoint or take), or None."""
        with self._lock:
            lease = self._held.get(lease_key)
            return lease.move if lease is not None else None

    def apply_move(self, lease_key: str, move: MoveRequest, token: int | None = None) -> Lease | None:
        """Apply ``move`` to held lease ``lease_key`` (checkpoint := ``move.checkpoint``, request
        cleared) with one conditional write. Returns the lease as stored, or None when a newer
        request replaced ``move`` meanwhile (the held lease then carries the newer one).

        Raises LeaseLostError when the lease is not held (in period ``token``) or was taken by
        another worker. Transient errors are retried as for :meth:`checkpoint`.
        """
        def once() -> Lease | None:
            lease = self._held_in(lease_key, token)
            sent = self.clock()
            try:
                new = self.store.apply_move(lease, move)
            except LeaseLostError:
                current = self.store.get_lease(lease_key)
                if current is not None and current.owner == self.worker_id and current.counter == lease.counter:
                    self._held[lease_key] = lease.with_(move=current.move)  # replaced by a newer request
                    return None
                landed = self._landed(lease_key, lease)
                if landed is not None and landed.checkpoint == move.checkpoint and landed.move is None:
                    self._held[lease_key] = landed
                    return landed
                if landed is not None:
                    self._held[lease_key] = landed  # another of our writes landed: apply on the new counter
                    raise _Retry() from None
                self._forget(lease_key)
                raise
            self._held[lease_key] = new
            self._confirm(lease_key, sent)
            return new

        return self._write_retrying(lease_key, once, "checkpoint_move")

    def checkpoint(self, lease_key: str, checkpoint: str, token: int | None = None, *,
                   version_floor: int | None = None, version_high: int | None = None) -> Lease:
        """Record ``checkpoint`` (sequence number or SHARD_END) for a held lease.

        With ``token``, only in that period of ownership. ``version_floor`` / ``version_high``
        (see :func:`pipeline.codec.record_version`) are stored in the same conditional write when
        given: the floor only while the lease has none (it never changes once stored), the high
        part only upwards. Raises LeaseLostError if the lease is
        not held (or was re-taken since ``token``) or the conditional write fails (the lease is
        then dropped from this worker). A transient error (:class:`~pipeline.errors.TransientError`)
        is retried with jittered exponential backoff (0.1 s to 2 s) until the write passes or the
        lease would have expired (``failover_time_s`` after its last successful write): then the
        lease is dropped and LeaseLostError raised. A conditional failure is never retried, except
        when it only shows that an earlier, failed attempt landed (see module doc).
        """
        def once() -> Lease:
            lease = self._held_in(lease_key, token)
            if version_floor is not None and lease.version_floor is None:
                lease = lease.with_(version_floor=version_floor)
            if version_high is not None and (lease.version_high is None or version_high > lease.version_high):
                lease = lease.with_(version_high=version_high)
            sent = self.clock()
            try:
                new = self.store.checkpoint(lease, checkpoint, behind_ms=self._behind.get(lease_key))
            except LeaseLostError:
                landed = self._landed(lease_key, lease)
                if landed is None:
                    self._forget(lease_key)
                    raise
                self._held[lease_key] = landed
                if landed.checkpoint == checkpoint:
                    return landed  # the failed attempt before did write this checkpoint
                raise _Retry() from None  # a renewal landed meanwhile: write on the new counter
            self._held[lease_key] = new
            self._confirm(lease_key, sent)
            return new

        return self._write_retrying(lease_key, once, "checkpoint")

    def _held_in(self, lease_key: str, token: int | None) -> Lease:
        """The held lease (in period ``token``); LeaseLostError if not held. Lock held by caller."""
        lease = self._held.get(lease_key)
        if lease is None or (token is not None and self._tokens.get(lease_key) != token):
            raise LeaseLostError(f"lease {lease_key} is not held by {self.worker_id} "
                                 "(lost, or re-taken since this reader started)")
        if self._expired(lease_key):  # never write as owner past the moment it may be taken
            self._forget(lease_key)
            raise LeaseLostError(f"lease {lease_key} expired: its renewals failed for failover_time_s "
                                 f"({self.failover_time_s:g} s)")
        return lease

    def _write_retrying(self, lease_key: str, once: Callable[[], Any], what: str) -> Any:
        """Run ``once`` (one conditional write, under the lock) until it returns; transient errors
        are retried with backoff — sleeping without the lock — until the lease would have expired."""
        def stop(_state) -> bool:
            with self._lock:
                return lease_key not in self._held or self._expired(lease_key)

        def before_sleep(state) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, TransientError):
                self.log.warning(f"{what}_retry", lease_key=lease_key, attempt=state.attempt_number, error=str(exc),
                                 expires_in_s=round(self._expires_in(lease_key), 2))

        def locked() -> Any:
            with self._lock:
                try:
                    return once()
                except TransientError:
                    if lease_key in self._held:
                        self._failing.add(lease_key)
                    raise

        try:
            for attempt in Retrying(retry=retry_if_exception_type((TransientError, _Retry)),
                                    wait=wait_exponential_jitter(multiplier=CHECKPOINT_BACKOFF_INITIAL_S,
                                                                 max=CHECKPOINT_BACKOFF_MAX_S,
                                                                 jitter=CHECKPOINT_BACKOFF_INITIAL_S),
                                    stop=stop, before_sleep=before_sleep, reraise=True):
                with attempt:
                    return locked()
        except (TransientError, _Retry) as exc:
            with self._lock:
                self._forget(lease_key)
            self.log.error("lease_expired_unwritten", lease_key=lease_key, operation=what, error=str(exc),
                           failover_time_s=self.failover_time_s,
                           hint="the lease table did not answer until the lease would have expired: another "
                                "worker may take this shard now; this one stops reading it")
            raise LeaseLostError(f"lease {lease_key} expired while the lease table failed ({what}: {exc}); "
                                 "another worker may own it now") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def release(self, lease_key: str) -> None:
        """Give a lease up (owner cleared) so another worker can take it at once."""
        with self._lock:
            lease = self._held.get(lease_key)
            self._forget(lease_key)
            if lease is None:
                return
            try:
                self.store.release_lease(lease)
                self.log.info("lease_released", shard_id=lease.shard_id, checkpoint=lease.checkpoint)
            except LeaseLostError:
                self.log.warning("lease_release_lost", shard_id=lease.shard_id)
            except TransientError as exc:  # not released: it expires after failover_time_s instead
                self.log.warning("lease_release_failed", shard_id=lease.shard_id, error=str(exc))

    def release_all(self) -> None:
        """Release every held lease (graceful shutdown)."""
        for key in list(self._held):
            self.release(key)

    def drop(self, lease_key: str, token: int | None = None) -> None:
        """Forget a lease without writing (it was lost to another worker); with ``token``, only if
        it is still that period of ownership (a lease taken back since is kept)."""
        with self._lock:
            if token is None or self._tokens.get(lease_key) == token:
                self._forget(lease_key)


class _Retry(Exception):
    """Internal: write again on the lease as now stored (an earlier write of ours landed)."""
