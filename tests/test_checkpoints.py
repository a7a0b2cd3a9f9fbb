"""Checkpoint operations (issue 5): move requests on the lease, applied by the owner at a batch
boundary; lease namespaces; ``ddb-cdc checkpoints list|export|import|set``; GetRecords throttling.

- Store level, both stores (DynamoDB Local lease table and a SQLite file): ``request_move``,
  ``apply_move``, ``set_checkpoint``, namespaces, and the SQLite schema upgrade.
- A real Worker on DynamoDB Local (stream + DynamoDBLeaseStore) in a thread with a RecordingSink;
  the CLI runs in-process against the same lease table (``connectors.app.cli.main``). The worker logs
  JSON lines to its own file (``tests/helpers.json_log_events``), so the CLI's
  ``configure_logging`` does not redirect it.
- Throttling cannot be produced by DynamoDB Local: the API double (connectors/dynamodb_streams/testing.py)
  raises LimitExceededException and the consumer's own tenacity backoff is exercised.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import structlog
import yaml
from prometheus_client import REGISTRY

from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.checkpoint import Gap, Lease, MoveRequest, WorkerInfo, lease_key_for
from connectors.app.cli import main
from pipeline.errors import LeaseLostError, LeaseNotFoundError
from pipeline.events import SHARD_END, TRIM_HORIZON
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.runtime.shard_consumer import ShardConsumer
from pipeline.testing import RecordingSink, make_stream_record
from pipeline.runtime.worker import Worker
from tests.helpers import json_log_events, wait_until
from tests.stacks import make_worker, sqlite_store
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq

TABLE = "orders"
SHARD = "shardId-00000001700000000000-0000000a"
PARENT = "shardId-00000001600000000000-0000000p"
SEQ_1 = "000000000000000000101"
SEQ_2 = "000000000000000000202"
NS = "replay-x"


def _move(checkpoint: str, by: str = "tester") -> MoveRequest:
    return MoveRequest(checkpoint=checkpoint, request_id=uuid.uuid4().hex[:16], requested_by=by,
                       requested_at="2026-11-22T10:15:00+00:00")


def _lease(shard_id: str = SHARD, **changes: Any) -> Lease:
    return Lease(lease_key=lease_key_for(TABLE, STREAM_ARN, shard_id), table=TABLE, stream_arn=STREAM_ARN,
                 shard_id=shard_id, **changes)


def _json_logger(path: Path) -> Any:
    """A structlog logger writing JSON lines to ``path``, independent of the global configuration
    (the CLI's in-process ``configure_logging`` re-points the global one at its stderr)."""
    return structlog.wrap_logger(
        structlog.PrintLogger(file=path.open("a", encoding="utf-8")),
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))


@pytest.fixture(autouse=True)
def _restore_logging():
    """``connectors.app.cli.main`` configures structlog and the root logger for the process (pointing at
    pytest's captured stderr): put both back after each test."""
    saved = structlog.get_config()
    handlers = logging.root.handlers[:]
    yield
    structlog.configure(**saved)
    logging.root.handlers[:] = handlers


# --------------------------------------------------------------------------------------------
# store level, both stores


@dataclass
class Stores:
    kind: str
    make: Callable[[str], Any]  # namespace -> store on the same table / file
    raw_keys: Callable[[], list[str]]

    @property
    def store(self) -> Any:
        return self.make("")


@pytest.fixture(params=["sqlite", "dynamodb"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    if request.param == "sqlite":
        path = tmp_path / "leases.sqlite"

        def raw_keys() -> list[str]:
            conn = sqlite3.connect(str(path))
            try:
                return sorted([r[0] for r in conn.execute("SELECT leaseKey FROM leases")]
                              + [r[0] for r in conn.execute("SELECT workerId FROM workers")]
                              + [r[0] for r in conn.execute("SELECT gapId FROM gaps")])
            finally:
                conn.close()

        result = Stores("sqlite", lambda ns: SQLiteLeaseStore(path, namespace=ns), raw_keys)
    else:
        dynamodb_local = request.getfixturevalue("dynamodb_local")
        request.getfixturevalue("aws_env")
        client = request.getfixturevalue("aws_client")("dynamodb", dynamodb_local.endpoint)
        table_name = f"cp-leases-{uuid.uuid4().hex[:10]}"
        aws = AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint, max_attempts=3)
        request.addfinalizer(lambda: client.delete_table(TableName=table_name))

        def raw_keys() -> list[str]:
            return sorted(item["leaseKey"]["S"] for item in
                          client.scan(TableName=table_name, ConsistentRead=True)["Items"])

        result = Stores("dynamodb", lambda ns: DynamoDBLeaseStore(aws, table_name, namespace=ns), raw_keys)
    result.store.ensure_table()
    return result


def _owned(store: Any, owner: str = "w1", checkpoint: str = SEQ_1) -> Lease:
    """A lease taken by ``owner`` and checkpointed at ``checkpoint``, as the owner holds it."""
    assert store.create_lease_if_absent(_lease())
    lease = store.take_lease(store.get_lease(_lease().lease_key), owner)
    return store.checkpoint(lease, checkpoint)


def test_request_move_leaves_the_lease_alone_and_the_owner_sees_it_on_its_next_write(stores: Stores):
    store = stores.store
    held = _owned(store)
    move = _move(TRIM_HORIZON)
    returned = store.request_move(held.lease_key, move)
    stored = store.get_lease(held.lease_key)
    for lease in (returned, stored):
        assert (lease.owner, lease.counter, lease.checkpoint) == ("w1", held.counter, SEQ_1)
        assert lease.move == move
    # the owner's conditional writes still succeed, and each returns the request
    renewed = store.renew_lease(held)
    assert renewed.counter == held.counter + 1 and renewed.move == move
    checkpointed = store.checkpoint(renewed, SEQ_2)
    assert checkpointed.checkpoint == SEQ_2 and checkpointed.move == move
    assert store.get_lease(held.lease_key).move == move  # still pending: only the owner applies it


def test_apply_move_is_conditional_on_the_request_id(stores: Stores):
    store = stores.store
    held = _owned(store)
    older, newer = _move(TRIM_HORIZON, "alice"), _move(SEQ_2, "bob")
    store.request_move(held.lease_key, older)
    held = store.renew_lease(held)
    assert held.move == older
    store.request_move(held.lease_key, newer)
    with pytest.raises(LeaseLostError):
        store.apply_move(held, older)
    stored = store.get_lease(held.lease_key)
    assert (stored.checkpoint, stored.move, stored.owner, stored.counter) == (SEQ_1, newer, "w1", held.counter)
    # another worker cannot apply it either
    with pytest.raises(LeaseLostError):
        store.apply_move(held.with_(owner="w2"), newer)
    applied = store.apply_move(held, newer)
    assert (applied.checkpoint, applied.move, applied.counter) == (SEQ_2, None, held.counter + 1)
    stored = store.get_lease(held.lease_key)
    assert (stored.checkpoint, stored.move, stored.owner, stored.counter) == (SEQ_2, None, "w1", held.counter + 1)


def test_coordinator_apply_move_of_a_replaced_request_returns_none_and_keeps_the_newer(stores: Stores):
    store = stores.store
    store.create_lease_if_absent(_lease(checkpoint=SEQ_1))
    coord = LeaseCoordinator(store, worker_id="w1", stream_arns=[STREAM_ARN], failover_time_s=3.0,
                             logger=structlog.get_logger())
    [taken] = coord.acquire()
    key = taken.lease_key
    assert coord.pending_move(key) is None
    older, newer = _move(TRIM_HORIZON, "alice"), _move(SEQ_2, "bob")
    store.request_move(key, older)
    assert coord.pending_move(key) is None  # not seen before the next write
    assert coord.renew() == []
    assert coord.pending_move(key) == older
    store.request_move(key, newer)
    assert coord.apply_move(key, older) is None
    assert coord.owns(key) and coord.pending_move(key) == newer
    assert store.get_lease(key).checkpoint == SEQ_1
    applied = coord.apply_move(key, newer)
    assert applied is not None and applied.checkpoint == SEQ_2 and applied.move is None
    assert coord.pending_move(key) is None
    stored = store.get_lease(key)
    assert (stored.owner, stored.checkpoint, stored.move) == ("w1", SEQ_2, None)
    # the coordinator's next renewal still succeeds (its counter is the stored one)
    assert coord.renew() == [] and coord.owns(key)


def test_set_checkpoint_only_on_a_free_lease(stores: Stores):
    store = stores.store
    store.create_lease_if_absent(_lease(checkpoint=SEQ_1))
    free = store.get_lease(_lease().lease_key)
    store.request_move(free.lease_key, _move(SEQ_2))
    moved = store.set_checkpoint(free, TRIM_HORIZON)
    stored = store.get_lease(free.lease_key)
    for lease in (moved, stored):
        assert (lease.checkpoint, lease.owner, lease.counter, lease.move) == (TRIM_HORIZON, None, free.counter + 1, None)
    with pytest.raises(LeaseLostError):  # stale counter
        store.set_checkpoint(free, SEQ_2)
    owned = store.take_lease(stored, "w1")
    with pytest.raises(LeaseLostError):  # owned: the owner must apply a request instead
        store.set_checkpoint(owned, SEQ_2)
    with pytest.raises(LeaseLostError):  # even pretending it is free
        store.set_checkpoint(owned.with_(owner=None), SEQ_2)
    stored = store.get_lease(free.lease_key)
    assert (stored.checkpoint, stored.owner, stored.counter) == (TRIM_HORIZON, "w1", owned.counter)


def test_request_move_on_a_missing_lease_raises_lease_not_found(stores: Stores):
    with pytest.raises(LeaseNotFoundError):
        stores.store.request_move(_lease("shardId-missing").lease_key, _move(TRIM_HORIZON))
    assert stores.store.list_leases() == []  # nothing was created by the failed request
    assert stores.raw_keys() == []


def test_namespaces_never_see_each_other_and_drop_removes_only_the_namespace(stores: Stores):
    live, replay = stores.make(""), stores.make(NS)
    replay.ensure_table()
    key = _lease().lease_key
    assert live.create_lease_if_absent(_lease(checkpoint=SEQ_1))
    assert replay.create_lease_if_absent(_lease(checkpoint=SEQ_2))  # same key, other namespace
    assert replay.create_lease_if_absent(_lease(PARENT, checkpoint=SHARD_END))
    live.announce_worker(WorkerInfo("live-1", "h", 1, "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:01+00:00"))
    replay.announce_worker(WorkerInfo("replay-1", "h", 2, "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:01+00:00"))
    gap = dict(stream_arn=STREAM_ARN, table=TABLE, first_position_after=None,
               detected_at="2026-01-01T00:00:00+00:00", policy="fail")
    live.record_gap(Gap(shard_id=SHARD, last_checkpoint="1", **gap))
    replay.record_gap(Gap(shard_id=SHARD, last_checkpoint="2", **gap))

    assert [(lease.lease_key, lease.checkpoint) for lease in live.list_leases()] == [(key, SEQ_1)]
    assert sorted((lease.lease_key, lease.checkpoint) for lease in replay.list_leases()) == sorted(
        [(key, SEQ_2), (_lease(PARENT).lease_key, SHARD_END)])
    assert live.get_lease(key).checkpoint == SEQ_1 and replay.get_lease(key).checkpoint == SEQ_2
    assert live.get_lease(_lease(PARENT).lease_key) is None
    assert [w.worker_id for w in live.list_workers()] == ["live-1"]
    assert [w.worker_id for w in replay.list_workers()] == ["replay-1"]
    assert [g.last_checkpoint for g in live.list_gaps()] == ["1"]
    assert [g.last_checkpoint for g in replay.list_gaps()] == ["2"]
    # writes through one namespace never touch the other's lease of the same key
    held = replay.take_lease(replay.get_lease(key), "replayer")
    replay.checkpoint(held, SEQ_1)
    assert live.get_lease(key).owner is None and live.get_lease(key).counter == 0
    assert {k.split("#", 1)[0] for k in stores.raw_keys() if "#" in k} == {NS}

    with pytest.raises(ValueError):
        live.drop_namespace()  # the live leases are never dropped
    with pytest.raises(ValueError):
        stores.make("bad#ns")
    before = stores.raw_keys()
    assert replay.drop_namespace() >= 2
    after = stores.raw_keys()
    assert after == [k for k in before if not k.startswith(f"{NS}#")] and len(after) == 3
    assert replay.list_leases() == [] and replay.list_workers() == [] and replay.list_gaps() == []
    assert [lease.checkpoint for lease in live.list_leases()] == [SEQ_1]
    assert [w.worker_id for w in live.list_workers()] == ["live-1"] and len(live.list_gaps()) == 1


_OLD_SCHEMA = """
CREATE TABLE leases (
    leaseKey TEXT PRIMARY KEY,
    leaseOwner TEXT,
    leaseCounter INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT NOT NULL,
    checkpointSubSequenceNumber INTEGER NOT NULL DEFAULT 0,
    ownerSwitchesSinceCheckpoint INTEGER NOT NULL DEFAULT 0,
    parentShardId TEXT,
    streamArn TEXT NOT NULL,
    shardId TEXT NOT NULL,
    tableName TEXT NOT NULL,
    millisBehindLatest INTEGER
)
"""


def test_sqlite_file_without_move_columns_gets_them_from_ensure_table(tmp_path: Path):
    path = tmp_path / "old.sqlite"
    key = _lease().lease_key
    conn = sqlite3.connect(str(path))
    conn.execute(_OLD_SCHEMA)
    conn.execute("INSERT INTO leases (leaseKey, leaseOwner, leaseCounter, checkpoint, streamArn, shardId, tableName) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (key, "w1", 7, SEQ_1, STREAM_ARN, SHARD, TABLE))
    conn.commit()
    conn.close()

    def columns() -> set[str]:
        c = sqlite3.connect(str(path))
        try:
            return {row[1] for row in c.execute("PRAGMA table_info(leases)")}
        finally:
            c.close()

    move_columns = {"moveCheckpoint", "moveRequestId", "moveRequestedBy", "moveRequestedAt"}
    assert not move_columns & columns()
    store = SQLiteLeaseStore(path)
    store.ensure_table()
    assert move_columns <= columns()
    SQLiteLeaseStore(path).ensure_table()  # idempotent, also from another store object
    lease = store.get_lease(key)
    assert (lease.owner, lease.counter, lease.checkpoint, lease.move) == ("w1", 7, SEQ_1, None)
    move = _move(TRIM_HORIZON)
    assert store.request_move(key, move).move == move
    applied = store.apply_move(lease, move)
    assert store.get_lease(key) == applied and applied.checkpoint == TRIM_HORIZON and applied.counter == 8


# --------------------------------------------------------------------------------------------
# a running worker on DynamoDB Local, the CLI in-process


@dataclass
class Live:
    """A Worker thread on a DynamoDB Local table, its sink, store, JSON log and a CLI config."""

    client: Any
    table: str
    store: DynamoDBLeaseStore
    sink: RecordingSink
    worker: Worker
    thread: threading.Thread
    log_path: Path
    config: str
    codes: list[int] = field(default_factory=list)
    written_items: int = 0

    def put(self, n: int) -> None:
        for _ in range(n):
            i = self.written_items
            self.client.put_item(TableName=self.table, Item={"pk": {"S": f"item-{i:03d}"}, "n": {"N": str(i)}})
            self.written_items += 1

    def seqs(self) -> list[str]:
        with self.sink._lock:
            return [e.sequence_number for e in self.sink.written]

    def lease(self) -> Lease:
        [lease] = self.store.list_leases()
        return lease

    def wait_checkpointed(self, count: int, what: str) -> list[str]:
        """Wait until the sink holds ``count`` events and the lease's checkpoint is the last one."""
        def done() -> bool:
            seqs = self.seqs()
            return len(seqs) == count and self.lease().checkpoint == seqs[-1]
        wait_until(done, what, timeout=20, interval=0.05)
        return self.seqs()

    def consumer(self) -> ShardConsumer:
        [consumer] = list(self.worker.consumers.values())
        return consumer

    def settle(self, seconds: float = 1.5) -> None:
        """Long enough for a renewal (every 1 s) and a few reads: nothing unexpected arrives."""
        time.sleep(seconds)


@pytest.fixture
def live(tmp_path: Path, aws_env, dynamodb_local, make_table):
    client, table, _arn = make_table("cp")
    lease_table = f"cp-live-leases-{uuid.uuid4().hex[:8]}"
    aws = AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint, max_attempts=3)
    store = DynamoDBLeaseStore(aws, lease_table)
    sink = RecordingSink()
    log_path = tmp_path / "worker.jsonl"
    worker = make_worker(DynamoDBStreamSource(aws, table=table), tmp_path, sink,
                         store=DynamoDBLeaseStore(aws, lease_table), worker_id="cp-worker-1",
                         logger=_json_logger(log_path), max_records=1000, idle_interval_ms=50,
                         discovery_interval_s=5.0, failover_time_s=3.0, shutdown_grace_s=10.0)
    config = tmp_path / "cp.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"table": table},
        "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint, "max_attempts": 3},
        "checkpoints": {"store": "dynamodb", "table_name": lease_table, "failover_time_s": 3},
        "dead_letter": {"directory": str(tmp_path / "dead-letter")},
        "log": {"format": "json", "level": "INFO"},
        "sinks": [{"name": "cache", "type": "redis_cache",
                   "options": {"url": "redis://127.0.0.1:1/0", "key_templates": ["k:{pk}"]}}],
    }))
    result = Live(client, table, store, sink, worker, threading.Thread(target=lambda: None), log_path, str(config))
    # DynamoDB Local numbers stream records across all tables (-sharedDb): an iterator taken on an
    # *empty* shard points at sequence number 1, and once writes to other tables (the lease
    # table's!) advanced the counter, GetRecords on it raises TrimmedDataAccessException. So the
    # shard gets its first record before the worker takes its first iterator.
    result.put(1)
    result.thread = threading.Thread(target=lambda: result.codes.append(worker.run()), daemon=True)
    result.thread.start()
    result.wait_checkpointed(1, "the worker reads the first change")
    try:
        yield result
    finally:
        worker.stop()
        result.thread.join(20)
        try:
            client.delete_table(TableName=lease_table)
        except client.exceptions.ResourceNotFoundException:
            pass
    assert result.codes == [0], json_log_events(log_path, "shard_failed")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _cli_log(err: str, event: str) -> list[dict[str, Any]]:
    found = []
    for line in err.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


def test_set_all_to_trim_horizon_on_a_running_worker_redelivers_without_a_restart(live: Live, capsys):
    n = 8
    live.put(n - 1)  # and the fixture's first change
    seqs = live.wait_checkpointed(n, f"all {n} changes delivered and checkpointed")
    assert seqs == sorted(seqs, key=int) and len(set(seqs)) == n
    first_consumer = live.consumer()
    held_before = live.lease()
    assert held_before.owner == "cp-worker-1"

    code, out, err = _cli(capsys, "checkpoints", "set", "--config", live.config, "--all", "--to", "TRIM_HORIZON",
                          "--by", "tester", "--wait", "30")
    assert code == 0, err
    assert "requested move(s) applied by their owners" in err
    [requested] = _cli_log(err, "checkpoint_move_requested")
    assert (requested["requested_by"], requested["to_checkpoint"], requested["from_checkpoint"]) == \
        ("tester", "TRIM_HORIZON", seqs[-1])
    assert "requested" in out  # the table of moves

    again = live.wait_checkpointed(2 * n, "every change delivered a second time")
    assert again[n:] == seqs  # the same sequence numbers, in order
    live.settle()
    assert live.seqs() == seqs + seqs  # and nothing more
    # no restart: the same worker object, thread and id; only the shard's reader was replaced
    assert live.thread.is_alive() and live.codes == []
    assert live.lease().owner == "cp-worker-1" and live.lease().move is None
    assert live.lease().counter > held_before.counter  # the lease was never re-created
    assert [w.worker_id for w in live.store.list_workers()] == ["cp-worker-1"]
    assert live.consumer() is not first_consumer and first_consumer.outcome == "moved"
    assert first_consumer.stats.moves == 1
    assert len(json_log_events(live.log_path, "worker_started")) == 1
    assert len(json_log_events(live.log_path, "shard_consumer_started")) == 2
    [moved] = json_log_events(live.log_path, "checkpoint_moved")
    assert (moved["requested_by"], moved["request_id"], moved["to_checkpoint"], moved["from_checkpoint"],
            moved["worker_id"]) == ("tester", requested["request_id"], "TRIM_HORIZON", seqs[-1], "cp-worker-1")


def test_set_one_shard_to_a_sequence_number_redelivers_exactly_the_changes_after_it(live: Live, capsys):
    n = 7
    live.put(n - 1)
    seqs = live.wait_checkpointed(n, f"all {n} changes delivered and checkpointed")
    shard_id = live.lease().shard_id
    k = 3
    code, _, err = _cli(capsys, "checkpoints", "set", "--config", live.config, "--shard", shard_id,
                        "--to", seqs[k - 1], "--by", "tester", "--wait", "30")
    assert code == 0, err
    after = live.wait_checkpointed(n + n - k, f"the {n - k} changes after the {k}th delivered again")
    assert after[n:] == seqs[k:]
    live.settle()
    assert live.seqs() == seqs + seqs[k:]
    assert live.thread.is_alive() and live.codes == []
    [moved] = json_log_events(live.log_path, "checkpoint_moved")
    assert (moved["requested_by"], moved["to_checkpoint"]) == ("tester", seqs[k - 1])


def test_export_changes_import_redelivers_exactly_the_changes_after_the_snapshot(live: Live, capsys, tmp_path):
    a, b = 5, 4
    live.put(a - 1)
    first = live.wait_checkpointed(a, f"{a} changes checkpointed")
    snap = tmp_path / "snap.json"
    code, _, err = _cli(capsys, "checkpoints", "export", "--config", live.config, "--out", str(snap), "--by", "tester")
    assert code == 0, err
    data = json.loads(snap.read_text())
    assert data["format"] == "ddb-cdc/checkpoints/v1" and data["exported_by"] == "tester"
    assert data["exported_at"]
    lease = live.lease()
    assert data["leases"] == [{"lease_key": lease.lease_key, "table": live.table, "stream_arn": lease.stream_arn,
                               "shard_id": lease.shard_id, "checkpoint": first[-1], "parent_shard_ids": []}]
    assert lease.checkpoint == first[-1]

    live.put(b)
    both = live.wait_checkpointed(a + b, f"{b} more changes checkpointed")
    assert both[:a] == first
    later = both[a:]

    # a dry run writes nothing
    code, out, err = _cli(capsys, "checkpoints", "import", "--config", live.config, str(snap), "--dry-run")
    assert code == 0, err
    assert "dry run" in out and "move" in out
    live.settle()
    assert live.lease().checkpoint == both[-1] and live.lease().move is None
    assert live.seqs() == both

    code, _, err = _cli(capsys, "checkpoints", "import", "--config", live.config, str(snap), "--by", "tester",
                        "--wait", "30")
    assert code == 0, err
    redelivered = live.wait_checkpointed(a + b + b, f"the {b} changes after the snapshot delivered again")
    assert redelivered[a + b:] == later  # after the exported position, in order
    live.settle()
    assert live.seqs() == both + later  # nothing before it
    assert live.thread.is_alive() and live.codes == []
    [moved] = json_log_events(live.log_path, "checkpoint_moved")
    assert (moved["requested_by"], moved["to_checkpoint"]) == ("tester", first[-1])


@pytest.fixture
def sqlite_cli(tmp_path: Path) -> tuple[str, SQLiteLeaseStore]:
    """A config on a SQLite checkpoint file holding one free lease at SEQ_1 (no worker)."""
    path = tmp_path / "leases.sqlite"
    store = SQLiteLeaseStore(path)
    store.ensure_table()
    store.create_lease_if_absent(_lease(checkpoint=SEQ_1, counter=4))
    config = tmp_path / "sqlite.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"table": TABLE},
        "aws": {"region": "us-east-1"},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(path)},
        "dead_letter": {"directory": str(tmp_path / "dead-letter")},
        "log": {"format": "json", "level": "INFO"},
        "sinks": [{"name": "cache", "type": "redis_cache",
                   "options": {"url": "redis://127.0.0.1:1/0", "key_templates": ["k:{pk}"]}}],
    }))
    return str(config), store


def _snapshot(checkpoint: str) -> dict[str, Any]:
    lease = _lease()
    return {"format": "ddb-cdc/checkpoints/v1", "exported_at": "2026-11-22T10:15:00+00:00", "exported_by": "t",
            "leases": [{"lease_key": lease.lease_key, "table": TABLE, "stream_arn": STREAM_ARN, "shard_id": SHARD,
                        "checkpoint": checkpoint, "parent_shard_ids": []}]}


def test_import_dry_run_writes_nothing_and_import_moves_a_free_lease_at_once(sqlite_cli, capsys, tmp_path):
    config, store = sqlite_cli
    snap = tmp_path / "snap.json"
    snap.write_text(json.dumps(_snapshot(SEQ_2)))
    before = store.get_lease(_lease().lease_key)
    code, out, err = _cli(capsys, "checkpoints", "import", "--config", config, str(snap), "--dry-run")
    assert code == 0, err
    assert "dry run" in out and SEQ_2 in out
    after = store.get_lease(before.lease_key)
    assert (after.counter, after.checkpoint, after.owner, after.move) == (4, SEQ_1, None, None)
    code, _, err = _cli(capsys, "checkpoints", "import", "--config", config, str(snap), "--by", "tester")
    assert code == 0, err
    after = store.get_lease(before.lease_key)
    assert (after.counter, after.checkpoint, after.owner, after.move) == (5, SEQ_2, None, None)
    [moved] = _cli_log(err, "checkpoint_moved")
    assert (moved["requested_by"], moved["how"], moved["to_checkpoint"]) == ("tester", "direct", SEQ_2)


@pytest.mark.parametrize("content, says", [
    ("{not json", "not JSON"),
    (json.dumps({"format": "something/else", "leases": []}), "not a checkpoint snapshot"),
    (json.dumps([1, 2]), "not a checkpoint snapshot"),
    (json.dumps({**_snapshot(SEQ_2), "leases": [{"lease_key": "k", "table": TABLE}]}), "lease #1 is malformed"),
    (json.dumps(_snapshot("yesterday")), "lease #1 is malformed"),
    (None, "cannot read"),
])
def test_malformed_snapshot_is_exit_1_with_one_line_and_changes_nothing(sqlite_cli, capsys, tmp_path, content, says):
    config, store = sqlite_cli
    snap = tmp_path / "bad.json"
    if content is not None:
        snap.write_text(content)
    code, out, err = _cli(capsys, "checkpoints", "import", "--config", config, str(snap))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddb-cdc: ") and says in lines[0], err
    assert "Traceback" not in err + out
    lease = store.get_lease(_lease().lease_key)
    assert (lease.counter, lease.checkpoint, lease.move) == (4, SEQ_1, None)


def test_list_json_shows_a_pending_move_on_a_lease_whose_owner_is_not_running(
        tmp_path, aws_env, dynamodb_local, aws_client, capsys):
    lease_table = f"cp-list-leases-{uuid.uuid4().hex[:8]}"
    aws = AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint, max_attempts=3)
    store = DynamoDBLeaseStore(aws, lease_table)
    store.ensure_table()
    client = aws_client("dynamodb", dynamodb_local.endpoint)
    try:
        store.create_lease_if_absent(_lease(PARENT, checkpoint=SHARD_END, counter=3))
        store.create_lease_if_absent(_lease(SHARD, parent_shard_ids=(PARENT,)))
        held = store.take_lease(store.get_lease(_lease().lease_key), "ghost-worker")
        held = store.checkpoint(held, SEQ_1, behind_ms=4200)
        config = tmp_path / "list.yaml"
        config.write_text(yaml.safe_dump({
            "source": {"table": TABLE},
            "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint, "max_attempts": 3},
            "checkpoints": {"store": "dynamodb", "table_name": lease_table},
            "log": {"format": "json"},
            "sinks": [{"name": "cache", "type": "redis_cache",
                       "options": {"url": "redis://127.0.0.1:1/0", "key_templates": ["k:{pk}"]}}],
        }))
        cfg = str(config)
        code, _, err = _cli(capsys, "checkpoints", "set", "--config", cfg, "--shard", SHARD, "--to", "trim_horizon",
                            "--by", "tester")
        assert code == 0, err
        assert "1 move(s) requested" in err

        code, out, err = _cli(capsys, "checkpoints", "list", "--config", cfg, "--json")
        assert code == 0, err
        rows = {row["shard_id"]: row for row in json.loads(out)}
        assert set(rows) == {PARENT, SHARD}
        child = rows[SHARD]
        assert (child["table"], child["owner"], child["checkpoint"], child["parent_shard_ids"], child["behind_ms"]) == \
            (TABLE, "ghost-worker", SEQ_1, [PARENT], 4200)
        assert child["stream_arn"] == STREAM_ARN and child["lease_counter"] == held.counter
        pending = child["pending_move"]
        assert (pending["checkpoint"], pending["requested_by"]) == (TRIM_HORIZON, "tester")
        assert pending["request_id"] and pending["requested_at"]
        assert (rows[PARENT]["owner"], rows[PARENT]["checkpoint"], rows[PARENT]["pending_move"]) == (None, SHARD_END, None)

        code, out, _ = _cli(capsys, "checkpoints", "list", "--config", cfg)
        assert code == 0
        line = next(line for line in out.splitlines() if "ghost-worker" in line)
        assert "TRIM_HORIZON by tester" in line and SEQ_1 in line and "4.2 s" in line

        # --wait with nobody running to apply it: exit 1, one line; the newer request replaced the older
        code, _, err = _cli(capsys, "checkpoints", "set", "--config", cfg, "--shard", SHARD, "--to", "LATEST",
                            "--by", "tester2", "--wait", "1")
        assert code == 1 and "not applied within 1 s" in err
        assert [line for line in err.splitlines() if not line.startswith("{")] == [err.strip().splitlines()[-1]]
        lease = store.get_lease(_lease().lease_key)
        assert (lease.owner, lease.checkpoint, lease.counter) == ("ghost-worker", SEQ_1, held.counter)
        assert (lease.move.checkpoint, lease.move.requested_by) == ("LATEST", "tester2")

        # a free lease is moved at once (no request)
        code, _, err = _cli(capsys, "checkpoints", "set", "--config", cfg, "--shard", PARENT, "--to", "TRIM_HORIZON",
                            "--by", "tester")
        assert code == 0, err
        parent = store.get_lease(_lease(PARENT).lease_key)
        assert (parent.checkpoint, parent.move, parent.owner, parent.counter) == (TRIM_HORIZON, None, None, 4)
        # a sequence number names a position in one shard: with several leases, a usage error
        # (exit 2), nothing moved
        code, _, err = _cli(capsys, "checkpoints", "set", "--config", cfg, "--all", "--to", SEQ_2)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--shard" in err and "Traceback" not in err
        assert store.get_lease(_lease().lease_key).move.checkpoint == "LATEST"
        # an unknown shard: a usage error, exit 2, one line
        code, _, err = _cli(capsys, "checkpoints", "set", "--config", cfg, "--shard", "shardId-nope", "--to", "LATEST")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "shardId-nope" in err
    finally:
        client.delete_table(TableName=lease_table)


# --------------------------------------------------------------------------------------------
# throttling, on the API double


def test_throttled_get_records_backs_off_and_delivers_every_record_once_in_order(tmp_path):
    fake = FakeStreams()
    records = [make_stream_record(event_name="INSERT", keys={"pk": f"t-{i}"}, new_image={"pk": f"t-{i}", "i": i},
                                  sequence_number=seq(1, i)) for i in range(6)]
    fake.add_shard(SHARD, records, closed=True)
    fake.fail_get_records(SHARD, 2, "LimitExceededException", times=3)
    sink = RecordingSink()
    done: list[ShardConsumer] = []
    log_path = tmp_path / "worker.jsonl"
    store = sqlite_store(tmp_path / "l.sqlite")
    worker = make_worker(fake, tmp_path, sink, store=store, logger=_json_logger(log_path), exit_when_idle=True,
                         on_consumer_done=done.append)
    metric = {"table": TABLE, "shard": SHARD}
    before = REGISTRY.get_sample_value("ddb_cdc_get_records_throttles_total", metric) or 0.0
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(20)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), "the worker did not finish the closed shard"
    assert codes == [0] and worker.failed == []

    assert [e.sequence_number for e in sink.written] == [seq(1, i) for i in range(6)]
    assert [e.sequence_number for e in sink.flushed] == [seq(1, i) for i in range(6)]
    [consumer] = done
    assert (consumer.outcome, consumer.error, consumer.stats.throttles) == ("shard_end", None, 3)
    assert REGISTRY.get_sample_value("ddb_cdc_get_records_throttles_total", metric) - before == 3
    assert store.get_lease(_lease().lease_key).checkpoint == SHARD_END
    # the same iterator was asked again after each throttle: 3 failures + 1 success at index 2
    it_at_2 = [c["ShardIterator"] for c in fake.calls_of("GetRecords")][1]
    assert [c["ShardIterator"] for c in fake.calls_of("GetRecords")].count(it_at_2) == 4
    # backoff: 0.25 s · 2^(attempt-1) + up to 0.25 s jitter
    throttled = json_log_events(log_path, "get_records_throttled")
    assert [t["attempt"] for t in throttled] == [1, 2, 3]
    for t, low in zip(throttled, (0.25, 0.5, 1.0)):
        assert low <= t["backoff_s"] <= low + 0.25, throttled
    assert elapsed >= 1.75
    assert json_log_events(log_path, "shard_failed") == []
