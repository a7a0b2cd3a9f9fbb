"""Lease / checkpoint store contract (DESIGN.md, "Contracts"), run against both stores.

Every test that takes the ``case`` fixture runs twice: against ``SQLiteLeaseStore`` on a file in
``tmp_path`` and against ``DynamoDBLeaseStore`` on a fresh table in the real DynamoDB Local. The
raw stored record (DynamoDB item from a boto3 ``scan`` / SQLite row) is checked where the
contract names attributes (KCL's names: leaseKey, leaseOwner, leaseCounter, checkpoint,
checkpointSubSequenceNumber, ownerSwitchesSinceCheckpoint, parentShardId).

The coordinator tests (pipeline/runtime/leases.py) use one fake clock per worker: lease expiry is
judged on the observing worker's own clock only.

The last tests run two OS processes on one SQLite file and check from their recorded write
history that no lease counter was ever produced by two writers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import structlog

from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
from connectors.embedded.servers import free_port
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.checkpoint import Lease, lease_key_for
from pipeline.errors import CheckpointStoreError, LeaseLostError
from pipeline.events import LATEST, SHARD_END, TRIM_HORIZON
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.source import ShardInfo

log = structlog.get_logger()

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLE = "orders"
STREAM_ARN = "arn:aws:dynamodb:us-east-1:000000000000:table/orders/stream/2026-01-01T00:00:00.000"
OTHER_STREAM_ARN = "arn:aws:dynamodb:us-east-1:000000000000:table/orders/stream/2026-02-01T00:00:00.000"
SEQ_1 = "000000000000000000001"
SEQ_2 = "100000000000000000000000000000000000042"  # 39 digits: must survive as a string

KCL_ATTRIBUTES = {
    "leaseKey": "S",
    "leaseOwner": "S",
    "leaseCounter": "N",
    "checkpoint": "S",
    "checkpointSubSequenceNumber": "N",
    "ownerSwitchesSinceCheckpoint": "N",
    "parentShardId": "SS",
}


# --------------------------------------------------------------------------------------------
# the two stores


@dataclass
class StoreCase:
    """One store under test plus a way to read its raw records."""

    kind: str  # "sqlite" | "dynamodb"
    store: Any
    raw_all: Callable[[], list[dict[str, Any]]]

    def raw(self, lease_key: str) -> dict[str, Any]:
        """The raw stored record of ``lease_key`` (DynamoDB AttributeValue map / SQLite column dict)."""
        rows = [row for row in self.raw_all() if _raw_key(self.kind, row) == lease_key]
        assert len(rows) == 1, f"expected exactly one record for {lease_key}, got {rows}"
        return rows[0]


def _raw_key(kind: str, row: dict[str, Any]) -> str:
    return row["leaseKey"]["S"] if kind == "dynamodb" else row["leaseKey"]


def _sqlite_raw_all(path: Path) -> Callable[[], list[dict[str, Any]]]:
    def raw_all() -> list[dict[str, Any]]:
        conn = sqlite3.connect(str(path), timeout=10.0)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute("SELECT * FROM leases")]
        finally:
            conn.close()
    return raw_all


def _dynamodb_raw_all(client: Any, table_name: str) -> Callable[[], list[dict[str, Any]]]:
    def raw_all() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"TableName": table_name, "ConsistentRead": True}
        while True:
            page = client.scan(**kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    return raw_all


def _make_case(kind: str, request: pytest.FixtureRequest, tmp_path: Path, *, ensure: bool = True) -> StoreCase:
    if kind == "sqlite":
        path = tmp_path / "leases.sqlite"
        store = SQLiteLeaseStore(path)
        case = StoreCase(kind, store, _sqlite_raw_all(path))
    else:
        dynamodb_local = request.getfixturevalue("dynamodb_local")
        request.getfixturevalue("aws_env")  # credentials for the store's default chain
        aws_client = request.getfixturevalue("aws_client")
        table_name = f"leases-{uuid.uuid4().hex[:12]}"
        store = DynamoDBLeaseStore(
            AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint), table_name=table_name)
        client = aws_client("dynamodb", dynamodb_local.endpoint)

        def drop_table() -> None:
            try:
                client.delete_table(TableName=table_name)
            except client.exceptions.ResourceNotFoundException:
                pass

        request.addfinalizer(drop_table)
        case = StoreCase(kind, store, _dynamodb_raw_all(client, table_name))
    if ensure:
        store.ensure_table()
    log.info("lease_store_under_test", kind=kind)
    return case


@pytest.fixture(params=["sqlite", "dynamodb"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> StoreCase:
    """The store under test (table created), parametrised over SQLite and DynamoDB Local."""
    return _make_case(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "dynamodb"])
def bare_case(request: pytest.FixtureRequest, tmp_path: Path) -> StoreCase:
    """Like ``case`` but ``ensure_table`` was never called."""
    return _make_case(request.param, request, tmp_path, ensure=False)


def make_lease(shard_id: str = "shardId-00000001", *, stream_arn: str = STREAM_ARN, **changes: Any) -> Lease:
    lease = Lease(lease_key=lease_key_for(TABLE, stream_arn, shard_id), table=TABLE, stream_arn=stream_arn,
                  shard_id=shard_id)
    return lease.with_(**changes) if changes else lease


def create(case: StoreCase, **changes: Any) -> Lease:
    """Create a lease in the store and return it as read back."""
    lease = make_lease(**changes)
    assert case.store.create_lease_if_absent(lease) is True
    stored = case.store.get_lease(lease.lease_key)
    assert stored is not None
    return stored


def _owner_in_raw(case: StoreCase, raw: dict[str, Any]) -> str | None:
    if case.kind == "dynamodb":
        return raw["leaseOwner"]["S"] if "leaseOwner" in raw else None
    return raw["leaseOwner"]


def _counter_in_raw(case: StoreCase, raw: dict[str, Any]) -> int:
    return int(raw["leaseCounter"]["N"]) if case.kind == "dynamodb" else int(raw["leaseCounter"])


# --------------------------------------------------------------------------------------------
# table and creation


def test_ensure_table_is_idempotent(case: StoreCase):
    case.store.ensure_table()  # second call (the fixture made the first)
    lease = create(case)
    case.store.ensure_table()  # third call, with data: nothing lost
    assert case.store.get_lease(lease.lease_key) == lease
    assert case.store.list_leases() == [lease]


def test_create_lease_if_absent_creates_once_and_never_overwrites(case: StoreCase):
    lease = make_lease(checkpoint=TRIM_HORIZON)
    assert case.store.create_lease_if_absent(lease) is True
    first = case.store.get_lease(lease.lease_key)
    assert first == lease  # counter 0, no owner, TRIM_HORIZON, no parents

    other = lease.with_(owner="intruder", counter=7, checkpoint=SEQ_1, owner_switches_since_checkpoint=3,
                        parent_shard_ids=("shardId-parent",))
    assert case.store.create_lease_if_absent(other) is False
    assert case.store.get_lease(lease.lease_key) == first
    assert len(case.store.list_leases()) == 1


def test_get_missing_lease_is_none_and_list_holds_every_lease(case: StoreCase):
    assert case.store.get_lease("no-such-lease") is None
    assert case.store.list_leases() == []
    leases = [create(case, shard_id=f"shardId-{i:08d}") for i in range(3)]
    assert sorted(case.store.list_leases(), key=lambda l: l.lease_key) == sorted(leases, key=lambda l: l.lease_key)


# --------------------------------------------------------------------------------------------
# take


def test_take_sets_owner_increments_counter_and_counts_owner_switches(case: StoreCase):
    free = create(case)

    a = case.store.take_lease(free, "worker-A")
    assert (a.owner, a.counter) == ("worker-A", free.counter + 1)
    assert a.owner_switches_since_checkpoint == 0  # taking a free lease is not a switch (as in the KCL)
    assert case.store.get_lease(free.lease_key) == a
    assert _owner_in_raw(case, case.raw(free.lease_key)) == "worker-A"

    b = case.store.take_lease(case.store.get_lease(free.lease_key), "worker-B")  # A -> B: an owner switch
    assert (b.owner, b.counter) == ("worker-B", a.counter + 1)
    assert b.owner_switches_since_checkpoint == a.owner_switches_since_checkpoint + 1
    assert case.store.get_lease(free.lease_key) == b

    b2 = case.store.take_lease(b, "worker-B")  # re-take by the same owner: not a switch
    assert b2.counter == b.counter + 1
    assert b2.owner_switches_since_checkpoint == b.owner_switches_since_checkpoint
    assert case.store.get_lease(free.lease_key) == b2


def test_take_with_stale_lease_object_raises_lease_lost(case: StoreCase):
    free = create(case)
    a = case.store.take_lease(free, "worker-A")

    # B read the lease while it was free (counter 0) and tries to take it after A did.
    with pytest.raises(LeaseLostError):
        case.store.take_lease(free, "worker-B")
    # A's own old object (counter before A renewed) is stale too.
    renewed = case.store.renew_lease(a)
    with pytest.raises(LeaseLostError):
        case.store.take_lease(a, "worker-C")

    stored = case.store.get_lease(free.lease_key)
    assert stored == renewed
    assert (stored.owner, stored.counter) == ("worker-A", 2)


# --------------------------------------------------------------------------------------------
# renew


def test_renew_is_conditional_on_counter_and_owner(case: StoreCase):
    a = case.store.take_lease(create(case), "worker-A")

    r1 = case.store.renew_lease(a)
    assert r1.counter == a.counter + 1 and r1.owner == "worker-A"
    assert case.store.get_lease(a.lease_key) == r1

    with pytest.raises(LeaseLostError):
        case.store.renew_lease(a)  # stale counter
    with pytest.raises(LeaseLostError):
        case.store.renew_lease(r1.with_(owner="worker-B"))  # right counter, wrong owner

    r2 = case.store.renew_lease(r1)  # current object still works
    assert r2.counter == r1.counter + 1
    assert case.store.get_lease(a.lease_key) == r2


# --------------------------------------------------------------------------------------------
# checkpoint


def test_checkpoint_records_position_and_resets_owner_switches(case: StoreCase):
    a = case.store.take_lease(create(case), "worker-A")
    b = case.store.take_lease(case.store.get_lease(a.lease_key), "worker-B")
    assert b.owner_switches_since_checkpoint >= 1

    cp = case.store.checkpoint(b, SEQ_2, 3)
    assert (cp.checkpoint, cp.sub_sequence_number, cp.owner_switches_since_checkpoint) == (SEQ_2, 3, 0)
    assert cp.counter == b.counter + 1 and cp.owner == "worker-B"
    stored = case.store.get_lease(a.lease_key)
    assert stored == cp
    raw = case.raw(a.lease_key)
    if case.kind == "dynamodb":
        assert raw["checkpoint"] == {"S": SEQ_2}
        assert raw["checkpointSubSequenceNumber"] == {"N": "3"}
        assert raw["ownerSwitchesSinceCheckpoint"] == {"N": "0"}
    else:
        assert (raw["checkpoint"], raw["checkpointSubSequenceNumber"], raw["ownerSwitchesSinceCheckpoint"]) == (SEQ_2, 3, 0)


def test_worker_whose_lease_was_taken_can_never_move_the_checkpoint(case: StoreCase):
    a = case.store.take_lease(create(case), "worker-A")
    a = case.store.checkpoint(a, SEQ_1)

    # B finds A's lease expired and takes it, then checkpoints its own position.
    b = case.store.take_lease(case.store.get_lease(a.lease_key), "worker-B")
    with pytest.raises(LeaseLostError):
        case.store.checkpoint(a, SEQ_2)  # A still thinks it holds the lease
    assert case.store.get_lease(a.lease_key) == b
    assert case.store.get_lease(a.lease_key).checkpoint == SEQ_1

    b_cp = case.store.checkpoint(b, "000000000000000000007")
    with pytest.raises(LeaseLostError):
        case.store.checkpoint(a, SEQ_2)
    # A re-reads and forges ownership on the current counter: the owner condition still holds it off.
    with pytest.raises(LeaseLostError):
        case.store.checkpoint(case.store.get_lease(a.lease_key).with_(owner="worker-A"), SEQ_2)
    # A's sentinel write fails too (e.g. a SHARD_END after the lease was lost).
    with pytest.raises(LeaseLostError):
        case.store.checkpoint(a, SHARD_END)

    stored = case.store.get_lease(a.lease_key)
    assert stored == b_cp
    assert (stored.owner, stored.checkpoint) == ("worker-B", "000000000000000000007")


# --------------------------------------------------------------------------------------------
# release and delete


def test_release_clears_owner_and_increments_counter(case: StoreCase):
    a = case.store.take_lease(create(case), "worker-A")
    a = case.store.checkpoint(a, SEQ_1)

    released = case.store.release_lease(a)
    assert released.owner is None and released.counter == a.counter + 1
    stored = case.store.get_lease(a.lease_key)
    assert stored == released
    assert stored.checkpoint == SEQ_1  # the checkpoint survives a release

    raw = case.raw(a.lease_key)
    if case.kind == "dynamodb":
        assert "leaseOwner" not in raw, raw  # KCL: the attribute is removed, not set to ""/NULL
        assert raw["leaseCounter"] == {"N": str(a.counter + 1)}
    else:
        assert raw["leaseOwner"] is None
        assert raw["leaseCounter"] == a.counter + 1

    # A free lease is taken at once by anyone with the current counter.
    b = case.store.take_lease(stored, "worker-B")
    assert (b.owner, b.counter) == ("worker-B", released.counter + 1)


def test_stale_release_raises_and_changes_nothing(case: StoreCase):
    a = case.store.take_lease(create(case), "worker-A")
    b = case.store.take_lease(case.store.get_lease(a.lease_key), "worker-B")
    with pytest.raises(LeaseLostError):
        case.store.release_lease(a)
    assert case.store.get_lease(a.lease_key) == b

    released = case.store.release_lease(b)
    with pytest.raises(LeaseLostError):
        case.store.release_lease(b)  # twice: the second one is stale
    assert case.store.get_lease(a.lease_key) == released


def test_delete_lease_is_conditional_on_counter(case: StoreCase):
    a = case.store.take_lease(create(case), "worker-A")
    done = case.store.checkpoint(a, SHARD_END)

    with pytest.raises(LeaseLostError):
        case.store.delete_lease(a)  # stale counter
    assert case.store.get_lease(a.lease_key) == done

    case.store.delete_lease(done)
    assert case.store.get_lease(a.lease_key) is None
    assert case.store.list_leases() == []
    with pytest.raises(LeaseLostError):
        case.store.delete_lease(done)  # already gone


# --------------------------------------------------------------------------------------------
# values: sentinels, parents, KCL attribute names


@pytest.mark.parametrize("position", [TRIM_HORIZON, LATEST, SHARD_END, SEQ_1, SEQ_2])
def test_checkpoint_values_round_trip(case: StoreCase, position: str):
    created = create(case, checkpoint=position)
    assert created.checkpoint == position
    assert created.finished is (position == SHARD_END)

    other = create(case, shard_id="shardId-00000002")
    moved = case.store.checkpoint(case.store.take_lease(other, "worker-A"), position)
    stored = case.store.get_lease(other.lease_key)
    assert stored == moved and stored.checkpoint == position
    raw = case.raw(other.lease_key)
    assert (raw["checkpoint"] == {"S": position}) if case.kind == "dynamodb" else (raw["checkpoint"] == position)


@pytest.mark.parametrize("parents", [(), ("shardId-00000000-parent",), ("shardId-a", "shardId-b")])
def test_parent_shard_ids_round_trip(case: StoreCase, parents: tuple[str, ...]):
    lease = create(case, parent_shard_ids=parents)
    assert set(lease.parent_shard_ids) == set(parents)
    assert len(lease.parent_shard_ids) == len(parents)

    # Parents survive every conditional write.
    cycled = case.store.release_lease(case.store.checkpoint(case.store.take_lease(lease, "worker-A"), SEQ_1))
    assert set(case.store.get_lease(lease.lease_key).parent_shard_ids) == set(parents)
    assert case.store.get_lease(lease.lease_key).counter == cycled.counter

    if case.kind == "dynamodb":
        raw = case.raw(lease.lease_key)
        if parents:
            assert set(raw["parentShardId"]["SS"]) == set(parents)
            assert list(raw["parentShardId"]) == ["SS"]
        else:
            assert "parentShardId" not in raw  # an empty SS is not allowed in DynamoDB


@pytest.mark.parametrize("case", ["dynamodb"], indirect=True)
def test_dynamodb_item_uses_kcl_attribute_names_and_types(case: StoreCase):
    lease = create(case, parent_shard_ids=("shardId-00000000",))
    held = case.store.checkpoint(case.store.take_lease(lease, "host:1234:abcd"), SEQ_1, 0)
    held = case.store.take_lease(held, "host:5678:ef01")

    raw = case.raw(lease.lease_key)
    for name, type_ in KCL_ATTRIBUTES.items():
        assert name in raw, f"missing KCL attribute {name}: {raw}"
        assert list(raw[name]) == [type_], f"{name} should be {type_}: {raw[name]}"
    assert raw["leaseKey"] == {"S": lease.lease_key}
    assert raw["leaseOwner"] == {"S": "host:5678:ef01"}
    assert raw["leaseCounter"] == {"N": str(held.counter)}
    assert raw["checkpoint"] == {"S": SEQ_1}
    assert raw["checkpointSubSequenceNumber"] == {"N": "0"}
    assert raw["ownerSwitchesSinceCheckpoint"] == {"N": "1"}
    assert raw["parentShardId"] == {"SS": ["shardId-00000000"]}
    # Nothing spelled differently from KCL alongside (only our documented extras).
    assert set(raw) - set(KCL_ATTRIBUTES) <= {"streamArn", "shardId", "tableName"}, sorted(raw)


@pytest.mark.parametrize("case", ["sqlite"], indirect=True)
def test_sqlite_columns_use_kcl_names(case: StoreCase):
    lease = create(case)
    raw = case.raw(lease.lease_key)
    assert set(KCL_ATTRIBUTES) <= set(raw), sorted(raw)


# --------------------------------------------------------------------------------------------
# error contract: a store that cannot be reached / used raises CheckpointStoreError


@pytest.mark.parametrize(
    "bare_case",
    [
        "sqlite",
        "dynamodb",
    ],
    indirect=True,
)
def test_store_without_table_raises_checkpoint_store_error(bare_case: StoreCase):
    with pytest.raises(CheckpointStoreError):
        bare_case.store.list_leases()
    with pytest.raises(CheckpointStoreError):
        bare_case.store.get_lease("x")
    with pytest.raises(CheckpointStoreError):
        bare_case.store.create_lease_if_absent(make_lease())
    with pytest.raises(CheckpointStoreError):
        bare_case.store.renew_lease(make_lease(owner="worker-A", counter=1))


def test_sqlite_locked_file_raises_checkpoint_store_error(tmp_path: Path):
    path = tmp_path / "leases.sqlite"
    store = SQLiteLeaseStore(path)
    store.ensure_table()
    a = store.take_lease(create(StoreCase("sqlite", store, _sqlite_raw_all(path))), "worker-A")
    blocker = sqlite3.connect(str(path), isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock (backup, admin tool)
        with pytest.raises(CheckpointStoreError):
            store.renew_lease(a)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


@pytest.fixture
def unreachable_dynamodb_store(aws_env: dict[str, str]) -> DynamoDBLeaseStore:
    """A DynamoDB store pointed at a closed loopback port, one attempt per call."""
    port = free_port()
    return DynamoDBLeaseStore(
        AwsConfig(region="us-east-1", dynamodb_endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1,
                  connect_timeout_s=1, read_timeout_s=1),
        table_name="leases-unreachable")


@pytest.mark.parametrize("call", ["list_leases", "get_lease", "renew_lease", "take_lease", "checkpoint",
                                  "release_lease"])
def test_dynamodb_unreachable_raises_checkpoint_store_error(unreachable_dynamodb_store, call: str):
    store = unreachable_dynamodb_store
    lease = make_lease(owner="worker-A", counter=1)
    args = {"list_leases": (), "get_lease": (lease.lease_key,), "renew_lease": (lease,),
            "take_lease": (lease, "worker-B"), "checkpoint": (lease, SEQ_1), "release_lease": (lease,)}[call]
    with pytest.raises(CheckpointStoreError):
        getattr(store, call)(*args)


@pytest.mark.parametrize("call", ["create_lease_if_absent", "delete_lease"])
def test_dynamodb_unreachable_create_and_delete_raise_checkpoint_store_error(unreachable_dynamodb_store, call: str):
    with pytest.raises(CheckpointStoreError):
        getattr(unreachable_dynamodb_store, call)(make_lease())


# --------------------------------------------------------------------------------------------
# LeaseCoordinator


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


FAILOVER_S = 10.0


class _OneStream(LeaseCoordinator):
    """The multi-stream coordinator bound to one stream, as these tests use it."""

    def __init__(self, *args, stream_arn: str, **kwargs):
        super().__init__(*args, stream_arns=[stream_arn], **kwargs)
        self.one_stream_arn = stream_arn

    def sync_shards(self, shards, start_position):  # type: ignore[override]
        return super().sync_shards(TABLE, self.one_stream_arn, shards, start_position)


def coordinator(case: StoreCase, worker_id: str, clock: FakeClock, *, stream_arn: str = STREAM_ARN) -> LeaseCoordinator:
    return _OneStream(case.store, worker_id=worker_id, stream_arn=stream_arn,
                      failover_time_s=FAILOVER_S, logger=log.bind(worker=worker_id), clock=clock)


OPEN_SHARD = ShardInfo("shardId-00000001", None, "100", None)


def test_coordinator_failover_only_after_failover_time_on_the_takers_clock(case: StoreCase):
    clock_a, clock_b = FakeClock(5.0), FakeClock(90_000.5)  # unrelated clocks: never compared
    a, b = coordinator(case, "worker-A", clock_a), coordinator(case, "worker-B", clock_b)
    a.sync_shards([OPEN_SHARD], TRIM_HORIZON)
    key = lease_key_for(TABLE, STREAM_ARN, OPEN_SHARD.shard_id)

    taken = a.acquire()
    assert [lease.lease_key for lease in taken] == [key]
    assert a.owns(key) and case.store.get_lease(key).owner == "worker-A"

    # While A renews (every failover/3), B never takes it, however long B watches.
    assert b.acquire() == []
    for _ in range(6):
        clock_a.advance(FAILOVER_S / 3)
        clock_b.advance(FAILOVER_S / 3 + 1)
        assert a.renew() == []
        assert b.acquire() == []
        assert case.store.get_lease(key).owner == "worker-A"

    # A's clock racing ahead does not matter: only B's observation of the counter does.
    clock_a.advance(10_000)
    # A stops renewing. B has observed the current counter now; not before failover_time_s on B's clock.
    assert b.acquire() == []  # B observes the counter A left behind (if not already)
    clock_b.advance(FAILOVER_S - 0.25)  # binary-exact steps: the boundary is exactly failover_time_s
    assert b.acquire() == []
    assert case.store.get_lease(key).owner == "worker-A"
    clock_b.advance(0.25)
    taken = b.acquire()
    assert [lease.lease_key for lease in taken] == [key]
    stolen = case.store.get_lease(key)
    assert stolen.owner == "worker-B" and b.owns(key)
    assert stolen.owner_switches_since_checkpoint >= 1

    # A wakes up: its checkpoint is refused and it drops the lease.
    with pytest.raises(LeaseLostError):
        a.checkpoint(key, SEQ_2)
    assert not a.owns(key) and a.get(key) is None
    with pytest.raises(LeaseLostError):
        a.checkpoint(key, SEQ_2)  # not held any more
    assert case.store.get_lease(key) == stolen

    done = b.checkpoint(key, SEQ_1)
    assert (done.checkpoint, done.owner_switches_since_checkpoint) == (SEQ_1, 0)
    assert case.store.get_lease(key) == done


def test_coordinator_renew_reports_lost_lease_and_drops_it(case: StoreCase):
    clock_a, clock_b = FakeClock(), FakeClock()
    a, b = coordinator(case, "worker-A", clock_a), coordinator(case, "worker-B", clock_b)
    a.sync_shards([OPEN_SHARD], TRIM_HORIZON)
    key = a.acquire()[0].lease_key

    assert b.acquire() == []
    clock_b.advance(FAILOVER_S)
    assert [lease.lease_key for lease in b.acquire()] == [key]

    lost = a.renew()
    assert [lease.lease_key for lease in lost] == [key]
    assert a.held() == [] and not a.owns(key)
    assert case.store.get_lease(key).owner == "worker-B"
    assert a.renew() == []


def test_coordinator_release_lets_another_worker_take_at_once(case: StoreCase):
    a, b = coordinator(case, "worker-A", FakeClock()), coordinator(case, "worker-B", FakeClock())
    a.sync_shards([OPEN_SHARD], TRIM_HORIZON)
    key = a.acquire()[0].lease_key
    a.checkpoint(key, SEQ_1)
    assert b.acquire() == []

    a.release(key)
    assert not a.owns(key)
    stored = case.store.get_lease(key)
    assert stored.owner is None and stored.checkpoint == SEQ_1
    taken = b.acquire()  # no clock advance needed for a free lease
    assert [lease.lease_key for lease in taken] == [key]
    assert case.store.get_lease(key).owner == "worker-B"


def test_coordinator_sync_shards_latest_then_trim_horizon_for_later_shards(case: StoreCase):
    a = coordinator(case, "worker-A", FakeClock())
    closed = ShardInfo("shardId-00000000", None, "1", "99")
    open_child = ShardInfo("shardId-00000001", "shardId-00000000", "100", None)

    created = a.sync_shards([closed, open_child], LATEST)
    assert {lease.shard_id: lease.checkpoint for lease in created} == {
        closed.shard_id: SHARD_END, open_child.shard_id: LATEST}
    stored = {lease.shard_id: lease for lease in case.store.list_leases()}
    assert stored[closed.shard_id].checkpoint == SHARD_END
    assert stored[open_child.shard_id].checkpoint == LATEST
    assert stored[open_child.shard_id].parent_shard_ids == (closed.shard_id,)
    assert stored[closed.shard_id].parent_shard_ids == ()
    assert all(lease.owner is None and lease.counter == 0 for lease in stored.values())

    # Later: the open shard closed and a child appeared. Only the new shard is created, at TRIM_HORIZON.
    open_child_closed = ShardInfo(open_child.shard_id, closed.shard_id, "100", "200")
    grandchild = ShardInfo("shardId-00000002", open_child.shard_id, "201", None)
    created = a.sync_shards([closed, open_child_closed, grandchild], LATEST)
    assert [(lease.shard_id, lease.checkpoint) for lease in created] == [(grandchild.shard_id, TRIM_HORIZON)]
    stored = {lease.shard_id: lease for lease in case.store.list_leases()}
    assert stored[open_child.shard_id].checkpoint == LATEST  # existing leases are never rewritten
    assert stored[grandchild.shard_id].checkpoint == TRIM_HORIZON
    assert stored[grandchild.shard_id].parent_shard_ids == (open_child.shard_id,)

    # A second worker syncing the same shards creates nothing.
    b = coordinator(case, "worker-B", FakeClock())
    assert b.sync_shards([closed, open_child_closed, grandchild], LATEST) == []

    # acquire never takes a finished (SHARD_END) lease.
    taken = {lease.shard_id for lease in a.acquire()}
    assert taken == {open_child.shard_id, grandchild.shard_id}


def test_coordinator_first_sync_is_per_stream(case: StoreCase):
    old = coordinator(case, "worker-A", FakeClock(), stream_arn=OTHER_STREAM_ARN)
    old.sync_shards([OPEN_SHARD], TRIM_HORIZON)
    new = coordinator(case, "worker-A", FakeClock())
    closed = ShardInfo("shardId-00000000", None, "1", "99")
    created = new.sync_shards([closed, OPEN_SHARD], LATEST)
    assert {lease.shard_id: lease.checkpoint for lease in created} == {
        closed.shard_id: SHARD_END, OPEN_SHARD.shard_id: LATEST}
    assert len(case.store.list_leases()) == 3


def test_coordinator_sync_shards_trim_horizon_start(case: StoreCase):
    a = coordinator(case, "worker-A", FakeClock())
    closed = ShardInfo("shardId-00000000", None, "1", "99")
    created = a.sync_shards([closed, OPEN_SHARD], TRIM_HORIZON)
    assert {lease.checkpoint for lease in created} == {TRIM_HORIZON}


# --------------------------------------------------------------------------------------------
# SQLite shared by two OS processes


_RACER = textwrap.dedent(
    """
    import json, os, random, sys, time
    from pathlib import Path

    import structlog

    from connectors.sqlite_store import SQLiteLeaseStore
    from pipeline.errors import LeaseLostError

    db, key, me, out, ready, go, attempts = sys.argv[1:8]
    log = structlog.get_logger().bind(worker=me)
    store = SQLiteLeaseStore(db)
    store.get_lease(key)  # open the connection before the start line
    Path(ready).touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.0005)

    stats = {"attempts": 0, "owned_reads": 0, "takes": 0, "lost_takes": 0, "lost_other": 0}
    with open(out, "w") as history:
        def record(op, lease):
            history.write(json.dumps([op, lease.counter, me]) + "\\n")
            history.flush()

        for i in range(int(attempts)):
            stats["attempts"] += 1
            while True:  # fresh reads until the lease is free (the other process releases it quickly)
                lease = store.get_lease(key)
                if lease.owner is None:
                    break
                stats["owned_reads"] += 1
                if time.monotonic() > deadline + 120:
                    sys.exit(4)
            try:
                held = store.take_lease(lease, me)
            except LeaseLostError:
                stats["lost_takes"] += 1
                continue
            stats["takes"] += 1
            record("take", held)
            try:
                held = store.checkpoint(held, f"{i:021d}")
                record("checkpoint", held)
                held = store.release_lease(held)
                record("release", held)
            except LeaseLostError:
                stats["lost_other"] += 1
            time.sleep(random.uniform(0, 0.002))  # give the other process a chance to read it free
    log.info("racer_done", **stats)
    print(json.dumps(stats))
    """
)


def test_sqlite_two_processes_never_share_a_lease_counter(tmp_path: Path):
    path = tmp_path / "leases.sqlite"
    store = SQLiteLeaseStore(path)
    store.ensure_table()
    lease = make_lease()
    assert store.create_lease_if_absent(lease)

    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    procs = {}
    for name in ("proc-A", "proc-B"):
        procs[name] = subprocess.Popen(
            [sys.executable, str(script), str(path), lease.lease_key, name, str(tmp_path / f"{name}.jsonl"),
             str(tmp_path / f"{name}.ready"), str(go), "50"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{name}.ready").exists() for name in procs):
        assert time.monotonic() < deadline, "racers did not start"
        assert all(p.poll() is None for p in procs.values()), {n: p.communicate() for n, p in procs.items()}
        time.sleep(0.01)
    go.touch()  # both processes start their loops together
    stats = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} failed:\n{err}"
        stats[name] = json.loads(out.strip().splitlines()[-1])
    log.info("sqlite_race_stats", **stats)

    history = []
    for name in procs:
        history += [tuple(json.loads(line)) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    takes = [(counter, owner) for op, counter, owner in history if op == "take"]
    assert sum(s["takes"] for s in stats.values()) == len(takes) > 0

    # No counter value was ever taken by two owners, nor produced by two writes of any kind.
    take_owners: dict[int, set[str]] = {}
    for counter, owner in takes:
        take_owners.setdefault(counter, set()).add(owner)
    assert {c: o for c, o in take_owners.items() if len(o) > 1} == {}
    counters = [counter for _, counter, _ in history]
    assert len(counters) == len(set(counters)), "two successful writes produced the same leaseCounter"

    # Every write is accounted for: the counters are exactly 1..N, and each checkpoint / release
    # directly follows a write of the same process (the owner's previous write).
    by_counter = {counter: (op, owner) for op, counter, owner in history}
    assert sorted(by_counter) == list(range(1, len(history) + 1))
    for counter, (op, owner) in by_counter.items():
        if op in ("checkpoint", "release"):
            prev_op, prev_owner = by_counter[counter - 1]
            assert prev_owner == owner and prev_op in ("take", "checkpoint"), (counter, op, owner, prev_op, prev_owner)
        else:  # a take only happens on a free lease here: the initial one or right after a release
            assert counter == 1 or by_counter[counter - 1][0] == "release", (counter, by_counter[counter - 1])

    final = store.get_lease(lease.lease_key)
    assert final.counter == len(history) and final.owner is None
    # Both processes really competed for the lease.
    assert all(s["takes"] > 0 for s in stats.values()), stats


def test_head_check_fields_are_cleared_by_trim_horizon_moves_and_checkpoints_past_the_start(case: StoreCase):
    """``startingSequenceNumber`` / ``retainedSince`` (the head check) survive LATEST and
    ``AT_TIMESTAMP:`` writes and are cleared by every other checkpoint write: a set or move to
    TRIM_HORIZON ("the oldest record retained": nothing older is asked for) and the first checkpoint
    past the start (the head was read and checked). Old code kept them, and a rewind to
    TRIM_HORIZON of a shard read long ago stopped it with a false gap (review 13, R1)."""
    from pipeline.checkpoint import MoveRequest

    head = dict(starting_sequence_number=SEQ_1, retained_since=1_700_000_000)

    def stored(lease: Lease) -> tuple:
        got = case.store.get_lease(lease.lease_key)
        return got.starting_sequence_number, got.retained_since

    lease = create(case, **head)
    assert stored(lease) == (SEQ_1, 1_700_000_000)
    lease = case.store.set_checkpoint(lease, TRIM_HORIZON)  # a free lease: `checkpoints set --to TRIM_HORIZON`
    assert stored(lease) == (None, None)

    lease = create(case, shard_id="shardId-00000002", **head)
    owned = case.store.take_lease(lease, "w1")
    owned = case.store.checkpoint(owned, "AT_TIMESTAMP:1700000000")
    assert stored(owned) == (SEQ_1, 1_700_000_000), "an AT_TIMESTAMP: checkpoint is still read from TRIM_HORIZON"
    move = MoveRequest(checkpoint=TRIM_HORIZON, request_id="r1", requested_by="ops", requested_at="now")
    case.store.request_move(owned.lease_key, move)
    owned = case.store.apply_move(owned, move)  # the owner applies the move
    assert stored(owned) == (None, None) and owned.starting_sequence_number is None

    lease = create(case, shard_id="shardId-00000003", **head)
    owned = case.store.take_lease(lease, "w1")
    owned = case.store.checkpoint(owned, SEQ_2)
    assert stored(owned) == (None, None) and owned.starting_sequence_number is None
    owned = case.store.renew_lease(owned)
    assert stored(owned) == (None, None)
