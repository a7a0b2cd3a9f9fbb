"""Two processes configured with the same ``worker.id`` (issue 13, item 6a).

Lease owners compare as strings. With one owner name for two live workers, each counted the
other's leases as its own: one renewed (counter + 1), the other's renewal then failed
(``lease_lost``), it took the lease straight back ("own"), and so on — readers restarted on every
renewal and checkpoints failed. Now the lease owner is the configured id plus a per-process
suffix (:attr:`pipeline.config.WorkerConfig.lease_owner`), so they are two workers that split
the leases and keep them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from connectors.app.wiring import build_worker
from pipeline.config import load_settings
from pipeline.testing import RecordingSink
from tests.helpers import EventLog, wait_until

BASE = {"source": {"table": "t"}, "sinks": [{"name": "rec", "type": "recording"}]}


def test_configured_id_gets_a_unique_suffix_per_load_and_the_default_is_kept(monkeypatch):
    a = load_settings(None, overrides={**BASE, "worker": {"id": "orders-a"}})
    b = load_settings(None, overrides={**BASE, "worker": {"id": "orders-a"}})
    assert a.worker.id == b.worker.id == "orders-a"  # the configured name is kept for what shows it
    assert a.worker.lease_owner.startswith("orders-a:") and b.worker.lease_owner.startswith("orders-a:")
    assert a.worker.lease_owner != b.worker.lease_owner
    assert a.worker.lease_owner == a.worker.lease_owner  # fixed once computed
    monkeypatch.setenv("DDB_CDC_WORKER__ID", "from-env")
    assert load_settings(None, overrides=BASE).worker.lease_owner.startswith("from-env:")
    monkeypatch.delenv("DDB_CDC_WORKER__ID")
    default = load_settings(None, overrides=BASE).worker
    assert default.lease_owner == default.id  # host:pid:random is unique already


def test_two_workers_with_the_same_configured_id_both_hold_leases_and_checkpoint(make_table, dynamodb_local, aws_env):
    tables = [make_table("ident") for _ in range(2)]
    client = tables[0].client
    overrides = {
        "source": {"tables": [t.table_name for t in tables], "idle_interval_ms": 10, "checkpoint_interval_s": 0,
                   "discovery_interval_s": 0.2, "read_path": "boto3"},
        "aws": {"region": "us-east-1", "endpoint_url": dynamodb_local.endpoint},
        "checkpoints": {"store": "dynamodb", "table_name": f"leases-{uuid.uuid4().hex[:8]}", "failover_time_s": 6},
        "sinks": [{"name": "rec", "type": "recording"}],
        "worker": {"id": "same-id", "shutdown_grace_s": 5},
    }
    logs = [EventLog(), EventLog()]
    sinks = [RecordingSink("rec"), RecordingSink("rec")]
    workers = [build_worker(load_settings(None, overrides=overrides), logger=logs[i], sinks=[sinks[i]])
               for i in range(2)]
    store = workers[0].lease_store
    store.ensure_table()  # the workers create it too, but the test scans it before they may have
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    try:
        def owners():
            return sorted(lease.owner or "-" for lease in store.list_leases())

        wait_until(lambda: len(set(owners())) == 2 and "-" not in owners(), "one lease each", timeout=60)
        # the one balancing steal is over once each worker holds one lease and runs one reader
        wait_until(lambda: all(len(w.coordinator.held()) == 1 and len(w.consumers) == 1 for w in workers),
                   "each worker reads its one lease", timeout=60)
        steady_from = [len(log.events) for log in logs]
        counters = {lease.lease_key: lease.counter for lease in store.list_leases()}
        for n, t in enumerate(tables):
            for i in range(5):
                client.put_item(TableName=t.table_name, Item={"pk": {"S": f"t{n}-{i}"}})
        wait_until(lambda: {e.keys["pk"] for s in sinks for e in s.flushed} >= {f"t{n}-{i}" for n in range(2)
                                                                                for i in range(5)},
                   "every change flushed", timeout=60)
        # several renewal intervals (2 s) later: every lease renewed at least 4 times by its owner.
        # failover_time_s is 6 s, not less: a loaded test machine can stall a renewal (or a heartbeat
        # record) for seconds, and a lease not renewed within failover_time_s may rightly be taken
        wait_until(lambda: all(lease.counter >= counters[lease.lease_key] + 4 for lease in store.list_leases()),
                   "four renewals of every lease", timeout=60)
        before_stop = owners()
        leases = store.list_leases()
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(15)
    assert before_stop == sorted(w.worker_id for w in workers), "each worker holds one lease under its own name"
    assert workers[0].worker_id != workers[1].worker_id and all(w.worker_id.startswith("same-id:") for w in workers)
    for log, start in zip(logs, steady_from):
        steady = [(e, kw) for e, kw in log.events[start:] if e in ("lease_lost", "shard_lease_lost", "lease_taken")]
        assert not steady, f"no lease passes back and forth once split: {steady}"
    assert all(lease.checkpoint.isdigit() for lease in leases), [lease.checkpoint for lease in leases]


def _fake_worker(tmp_path, store_path, name, failover_s):
    from connectors.sqlite_store import SQLiteLeaseStore
    from pipeline.runtime.shard_consumer import ShardSettings
    from connectors.dynamodb_streams.testing import FakeStreams
    from tests.stacks import make_worker

    fake = FakeStreams()
    fake.add_shard("shardId-1", [], closed=False)
    log = EventLog()
    worker = make_worker(fake, tmp_path, RecordingSink(), store=SQLiteLeaseStore(store_path),
                         worker_id=f"{name}:{os.getpid()}:new", worker_name=name, logger=log,
                         max_records=ShardSettings.max_records_per_call,
                         checkpoint_interval_s=ShardSettings.checkpoint_interval_s,
                         discovery_interval_s=0.1, failover_time_s=failover_s)
    return worker, log


def _leave_lease(store_path, owner, pid, heartbeat_at):
    from connectors.sqlite_store import SQLiteLeaseStore
    from pipeline.checkpoint import Lease, WorkerInfo, lease_key_for
    from connectors.dynamodb_streams.testing import STREAM_ARN

    store = SQLiteLeaseStore(store_path)
    store.ensure_table()
    lease = Lease(lease_key=lease_key_for("orders", STREAM_ARN, "shardId-1"), table="orders",
                  stream_arn=STREAM_ARN, shard_id="shardId-1")
    store.create_lease_if_absent(lease)
    store.take_lease(lease, owner)
    store.announce_worker(WorkerInfo(worker_id=owner, host=socket.gethostname(), pid=pid,
                                     started_at=heartbeat_at, heartbeat_at=heartbeat_at))
    return store


@pytest.mark.parametrize("predecessor", ["dead-pid", "live-pid"])
def test_a_restarted_process_retakes_a_dead_predecessors_leases_at_once_but_not_a_live_ones(tmp_path, predecessor):
    """kill -9, restart: the new process (new suffix) takes the lease of its dead predecessor
    (same configured id, this host, pid gone, last heartbeat before this start) at once — as a
    fixed id did before — but a live process's lease only after failover_time_s."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists
    pid = proc.pid if predecessor == "dead-pid" else os.getppid()
    old = (datetime.now(timezone.utc) - timedelta(seconds=2)).isoformat()
    store = _leave_lease(tmp_path / "l.sqlite", f"same-id:{pid}:old", pid, old)
    worker, log = _fake_worker(tmp_path, tmp_path / "l.sqlite", "same-id", failover_s=30)
    thread = threading.Thread(target=worker.run)
    started = time.monotonic()
    thread.start()
    try:
        if predecessor == "dead-pid":
            wait_until(lambda: store.list_leases()[0].owner == worker.worker_id, "the lease re-taken", timeout=10)
            assert time.monotonic() - started < 5, "at once, not after failover_time_s (30 s)"
            assert [kw["reason"] for e, kw in log.events if e == "lease_taken"] == ["own"]
        else:
            wait_until(lambda: log.named("worker_started"), "started")
            wait_until(lambda: len([e for e in log.events if e[0] == "lease_taken"]) > 0
                       or time.monotonic() - started > 2, "two seconds of renewals")
            assert store.list_leases()[0].owner == f"same-id:{pid}:old", "a live process keeps its lease"
    finally:
        worker.stop()
        thread.join(10)
