"""``checkpoints.max_leases_to_steal`` (issue 18 item 3: balance time at large shard counts).

A worker below its fair share steals at most ``max_steal`` leases per ``acquire`` (one renewal)
from the most loaded worker and never takes one that would leave the counts further apart than
one. Real SQLite lease store; the coordinators' clocks are not needed (no lease expires here).
"""

from __future__ import annotations

from collections import Counter

import pytest
import structlog

from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.config import CheckpointConfig
from pipeline.events import TRIM_HORIZON
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.source import ShardInfo

ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-01-01T00:00:00.000"
LOG = structlog.wrap_logger(structlog.testing.CapturingLogger(), processors=[])


def _coordinator(store, name: str, max_steal: int = 1) -> LeaseCoordinator:
    return LeaseCoordinator(store, worker_id=name, stream_arns=[ARN], failover_time_s=30.0, logger=LOG,
                            max_steal=max_steal)


def _owners(store) -> Counter:
    return Counter(lease.owner for lease in store.list_leases())


@pytest.fixture
def store(tmp_path):
    store = SQLiteLeaseStore(tmp_path / "leases.sqlite")
    store.ensure_table()
    first = _coordinator(store, "a")
    shards = [ShardInfo(f"shardId-{i:04d}", None, str(100 + i), None) for i in range(40)]
    first.sync_shards("t", ARN, shards, TRIM_HORIZON)
    assert len(first.acquire()) == 40  # alone: every free lease
    return store


def test_a_newcomer_steals_up_to_max_steal_per_renewal_and_stops_at_its_share(store):
    newcomer = _coordinator(store, "b", max_steal=8)
    steps = [len(newcomer.acquire()) for _ in range(4)]
    assert steps == [8, 8, 4, 0]  # share 20 of 40: 8 + 8 + 4, then balanced
    assert _owners(store) == Counter({"a": 20, "b": 20})


def test_the_default_steals_one_lease_per_renewal(store):
    newcomer = _coordinator(store, "b")
    assert [len(newcomer.acquire()) for _ in range(3)] == [1, 1, 1]
    assert _owners(store) == Counter({"a": 37, "b": 3})


def test_two_newcomers_stealing_many_at_once_end_within_one_of_each_other(store):
    b, c = _coordinator(store, "b", max_steal=100), _coordinator(store, "c", max_steal=100)
    b.acquire()  # sees a (40) and itself: share 20, takes 20
    assert _owners(store) == Counter({"a": 20, "b": 20})
    c.acquire()  # share ceil(40 / 3) = 14: takes from the most loaded, one at a time, until within one
    counts = _owners(store)
    assert sum(counts.values()) == 40 and max(counts.values()) - min(counts.values()) <= 1, counts
    assert not b.acquire() and not c.acquire()  # balanced: nothing more moves


def test_the_setting_defaults_to_kcls_one_and_refuses_zero():
    assert CheckpointConfig().max_leases_to_steal == 1  # KCL's maxLeasesToStealAtOneTime default
    assert CheckpointConfig.model_validate({"max_leases_to_steal": 25}).max_leases_to_steal == 25
    with pytest.raises(ValueError):
        CheckpointConfig.model_validate({"max_leases_to_steal": 0})


def test_build_worker_passes_max_leases_to_steal_to_the_coordinator(tmp_path):
    from connectors.app.wiring import build_worker
    from pipeline.config import Settings
    from pipeline.testing import RecordingSink

    settings = Settings.model_validate({
        "source": {"table": "t"}, "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "c.sqlite"),
                                                  "max_leases_to_steal": 7},
        "dead_letter": {"directory": str(tmp_path / "dl")}, "sinks": [{"name": "rec", "type": "x"}]})
    worker = build_worker(settings, logger=LOG, sinks=[RecordingSink()], sources=[_NoStream()])
    assert worker.coordinator.max_steal == 7


class _NoStream:
    """The least a source needs for build_worker (the worker is built, never run)."""

    table = "t"
    stream_arn = ARN

    def list_shards(self):  # pragma: no cover - not called
        return []


class _RenewedAfterScan:
    """The lease store as a steal sees it under load: right after each scan, the victim's owner
    renews its lease with the lowest key (the counter the scan showed is then stale)."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def list_leases(self):
        leases = self.store.list_leases()
        lowest = min((lease for lease in leases if lease.owner == "a"), key=lambda lease: lease.lease_key)
        self.store.renew_lease(lowest)
        return leases


def test_a_steal_that_loses_its_conditional_write_tries_another_lease(store):
    newcomer = _coordinator(_RenewedAfterScan(store), "b", max_steal=1)
    assert [len(newcomer.acquire()) for _ in range(5)] == [1, 1, 1, 1, 1]
    assert _owners(store)["b"] == 5


class _AllRenewedAfterScan(_RenewedAfterScan):
    """Under load with hundreds of leases per worker: by the time the steals are written, the
    victim has renewed every lease the scan showed (each lease's counter moved once)."""

    def list_leases(self):
        leases = self.store.list_leases()
        for lease in leases:
            if lease.owner == "a":
                self.store.renew_lease(lease)
        return leases


def test_a_steal_of_a_lease_renewed_since_the_scan_reads_it_again_and_takes_it(store):
    """Before the fix the first three steals lost their conditional write and the newcomer stole
    nothing all renewal: the join's balance time was twice its bound at 1,000 shards."""
    newcomer = _coordinator(_AllRenewedAfterScan(store), "b", max_steal=8)
    assert [len(newcomer.acquire()) for _ in range(3)] == [8, 8, 4]
    assert _owners(store) == Counter({"a": 20, "b": 20})
    assert newcomer.steals == 20 and newcomer.steal_misses == 20  # each first write lost, each re-read won


class _TakenByAnotherAfterScan(_RenewedAfterScan):
    """Another newcomer ``c`` steals every lease of ``a`` right after this worker's scan."""

    def list_leases(self):
        leases = self.store.list_leases()
        for lease in leases:
            if lease.owner == "a":
                self.store.take_lease(lease, "c")
        return leases


@pytest.mark.parametrize("max_steal, misses", [(8, 8), (1, 3)])
def test_a_lease_another_worker_took_since_the_scan_is_not_taken_from_it(store, max_steal, misses):
    newcomer = _coordinator(_TakenByAnotherAfterScan(store), "b", max_steal=max_steal)
    assert newcomer.acquire() == []  # max(3, max_steal) misses, then it waits for the next renewal
    assert _owners(store) == Counter({"c": 40})
    assert newcomer.steals == 0 and newcomer.steal_misses == misses


class _FirstPicksTakenByAnother(_RenewedAfterScan):
    """Several newcomers stealing from one victim in the same renewal: right after this worker's
    scan another newcomer ``c`` takes ``a``'s five lowest keys, the ones this worker's picker
    (lowest key first, see below) tries first. With seven stealers at 1,000 shards, about a fifth
    of a scan's leases of the victim were gone by the time the steals were written."""

    def list_leases(self):
        leases = self.store.list_leases()
        for lease in sorted((lease for lease in leases if lease.owner == "a"), key=lambda lease: lease.lease_key)[:5]:
            self.store.take_lease(lease, "c")
        return leases


class _LowestFirst:
    """A picker in place of the random one: the lowest key first (deterministic)."""

    @staticmethod
    def choice(leases):
        return min(leases, key=lambda lease: lease.lease_key)


def test_misses_to_other_stealers_do_not_end_a_renewal_before_max_steal_tries(store):
    """Before the fix a renewal's stealing ended after three such misses whatever max_steal was:
    at 1,000 shards × 8 workers with max_steal 25, rounds of 7-20 steals instead of 25 stretched
    the start's balance from the 5 renewals of its bound to 7."""
    newcomer = LeaseCoordinator(_FirstPicksTakenByAnother(store), worker_id="b", stream_arns=[ARN],
                                failover_time_s=30.0, logger=LOG, max_steal=10, rng=_LowestFirst())
    assert len(newcomer.acquire()) == 10  # five misses (c took them), then ten steals
    assert newcomer.steal_misses == 5 and newcomer.steals == 10
    assert _owners(store) == Counter({"a": 25, "b": 10, "c": 5})
