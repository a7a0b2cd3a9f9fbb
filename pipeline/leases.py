"""Lease coordination for one worker: create leases for shards, take, renew, checkpoint, release.

The protocol is KCL's: a lease is free when it has no owner, expired when its ``leaseCounter``
has not changed for ``failover_time_s`` seconds as observed by this worker (clocks of different
hosts are never compared), and taken by a conditional write on the counter this worker saw.
The owner renews every ``failover_time_s / 3`` seconds by incrementing the counter. Checkpoints
are conditional on owner and counter, so a worker that lost a lease can never move its
checkpoint (:class:`pipeline.errors.LeaseLostError`).

All methods are thread-safe: shard threads checkpoint while the main loop renews.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from pipeline.checkpoint import Lease, LeaseStore, lease_key_for
from pipeline.errors import LeaseLostError
from pipeline.events import LATEST, SHARD_END, TRIM_HORIZON
from pipeline.source import ShardInfo


class LeaseCoordinator:
    """Owns this worker's view of the lease table.

    ``clock`` returns monotonic seconds (injectable for tests).
    """

    def __init__(self, store: LeaseStore, *, worker_id: str, table: str, stream_arn: str,
                 failover_time_s: float, logger: Any, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.worker_id = worker_id
        self.table = table
        self.stream_arn = stream_arn
        self.failover_time_s = failover_time_s
        self.log = logger
        self.clock = clock
        self._lock = threading.RLock()
        self._held: dict[str, Lease] = {}
        self._observed: dict[str, tuple[int, float]] = {}

    # -- shards → leases -----------------------------------------------------------------------

    def sync_shards(self, shards: Iterable[ShardInfo], start_position: str) -> list[Lease]:
        """Create a lease for every shard that has none yet.

        On the first sync of a stream (no lease of it exists) shards start at ``start_position``;
        with LATEST, closed shards are created as SHARD_END (their data is older than "now").
        Shards found later always start at TRIM_HORIZON, so a child never loses records.
        Returns the leases created.
        """
        shards = list(shards)
        existing = {lease.shard_id for lease in self.store.list_leases() if lease.stream_arn == self.stream_arn}
        first_sync = not existing
        created = []
        for shard in shards:
            if shard.shard_id in existing:
                continue
            if first_sync and start_position == LATEST:
                checkpoint = SHARD_END if shard.closed else LATEST
            else:
                checkpoint = TRIM_HORIZON
            lease = Lease(
                lease_key=lease_key_for(self.table, self.stream_arn, shard.shard_id),
                table=self.table,
                stream_arn=self.stream_arn,
                shard_id=shard.shard_id,
                checkpoint=checkpoint,
                parent_shard_ids=(shard.parent_shard_id,) if shard.parent_shard_id else (),
            )
            if self.store.create_lease_if_absent(lease):
                created.append(lease)
                self.log.info("lease_created", shard_id=shard.shard_id, checkpoint=checkpoint,
                              parent_shard_id=shard.parent_shard_id)
        return created

    # -- taking and renewing -------------------------------------------------------------------

    def acquire(self, max_leases: int | None = None) -> list[Lease]:
        """Take free and expired leases of this stream (free first), up to ``max_leases`` held.

        Finished (SHARD_END) leases are not taken. Returns the leases newly taken.
        """
        now = self.clock()
        taken = []
        leases = [lease for lease in self.store.list_leases() if lease.stream_arn == self.stream_arn]
        candidates = []
        for lease in leases:
            seen = self._observed.get(lease.lease_key)
            if seen is None or seen[0] != lease.counter:
                self._observed[lease.lease_key] = (lease.counter, now)
                seen = self._observed[lease.lease_key]
            if lease.finished or lease.lease_key in self._held:
                continue
            if lease.owner is None:
                candidates.append((0, lease))
            elif lease.owner == self.worker_id:
                candidates.append((0, lease))  # ours from before (e.g. a failed release); counter check protects
            elif now - seen[1] >= self.failover_time_s:
                candidates.append((1, lease))
        candidates.sort(key=lambda pair: pair[0])
        for _, lease in candidates:
            if max_leases is not None and len(self._held) >= max_leases:
                break
            try:
                new = self.store.take_lease(lease, self.worker_id)
            except LeaseLostError:
                continue
            with self._lock:
                self._held[new.lease_key] = new
            self._observed[new.lease_key] = (new.counter, now)
            self.log.info("lease_taken", shard_id=new.shard_id, previous_owner=lease.owner,
                          checkpoint=new.checkpoint, lease_counter=new.counter)
            taken.append(new)
        return taken

    def renew(self) -> list[Lease]:
        """Renew every held lease; returns those lost (someone else wrote them)."""
        lost = []
        for key in list(self._held):
            with self._lock:
                lease = self._held.get(key)
                if lease is None:
                    continue
                try:
                    self._held[key] = self.store.renew_lease(lease)
                except LeaseLostError:
                    self._held.pop(key, None)
                    lost.append(lease)
                    self.log.warning("lease_lost", shard_id=lease.shard_id, lease_counter=lease.counter)
        return lost

    # -- used by shard consumers ----------------------------------------------------------------

    def held(self) -> list[Lease]:
        """The leases this worker holds now."""
        with self._lock:
            return list(self._held.values())

    def get(self, lease_key: str) -> Lease | None:
        """The held lease ``lease_key``, or None if not held (lost or released)."""
        with self._lock:
            return self._held.get(lease_key)

    def owns(self, lease_key: str) -> bool:
        """True while this worker holds ``lease_key``."""
        with self._lock:
            return lease_key in self._held

    def checkpoint(self, lease_key: str, checkpoint: str) -> Lease:
        """Record ``checkpoint`` (sequence number or SHARD_END) for a held lease.

        Raises LeaseLostError if the lease is not held or the conditional write fails (the lease
        is then dropped from this worker).
        """
        with self._lock:
            lease = self._held.get(lease_key)
            if lease is None:
                raise LeaseLostError(f"lease {lease_key} is not held by {self.worker_id}")
            try:
                new = self.store.checkpoint(lease, checkpoint)
            except LeaseLostError:
                self._held.pop(lease_key, None)
                raise
            self._held[lease_key] = new
            return new

    def release(self, lease_key: str) -> None:
        """Give a lease up (owner cleared) so another worker can take it at once."""
        with self._lock:
            lease = self._held.pop(lease_key, None)
            if lease is None:
                return
            try:
                self.store.release_lease(lease)
                self.log.info("lease_released", shard_id=lease.shard_id, checkpoint=lease.checkpoint)
            except LeaseLostError:
                self.log.warning("lease_release_lost", shard_id=lease.shard_id)

    def release_all(self) -> None:
        """Release every held lease (graceful shutdown)."""
        for key in list(self._held):
            self.release(key)

    def drop(self, lease_key: str) -> None:
        """Forget a lease without writing (after SHARD_END the lease stays as the finished record)."""
        with self._lock:
            self._held.pop(lease_key, None)
