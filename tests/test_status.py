"""``ddb-cdc status``: leases, checkpoints, lag and workers read from a real lease store.

- SQLite lease store in ``tmp_path``, the CLI in a subprocess, with the stream on a closed
  loopback port (status must still work, showing "in stream ?");
- the DynamoDB lease table on DynamoDB Local, with a real worker reading a real stream.
"""

from __future__ import annotations

import re
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.checkpoint import Lease, WorkerInfo
from pipeline.ops.status import format_duration_ms, gather_status, render_status, short_checkpoint, status_to_dict
from tests.helpers import wait_until as _wait_until
from tests.stacks import make_worker

ROOT = Path(__file__).resolve().parent.parent

STREAM_ARN = "arn:aws:dynamodb:us-east-1:000000000000:table/orders/stream/2026-01-01T00:00:00.000"
SEQ = "000000000000000000000000012345678901"  # 36 digits
PARENT, CHILD, FREE, STALE_OWNED = ("shardId-00000001700000000000-aaaa1111", "shardId-00000001700000000001-bbbb2222",
                                    "shardId-00000001700000000002-cccc3333", "shardId-00000001700000000003-dddd4444")


def wait_until(predicate, what: str) -> None:
    """This module's polling bounds: 30.0 s, every 0.05 s."""
    _wait_until(predicate, what, timeout=30.0, interval=0.05)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "connectors.app.cli", *args], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=60)


def write_config(tmp_path: Path, checkpoints: dict, aws: dict, source: dict) -> Path:
    path = tmp_path / "status.yaml"
    path.write_text(yaml.safe_dump({
        "source": source,
        "aws": {"region": "us-east-1", **aws},
        "checkpoints": checkpoints,
        "sinks": [{"name": "cache", "type": "redis_cache",
                   "options": {"url": "redis://127.0.0.1:1/0", "key_templates": ["k:{pk}"]}}],
    }))
    return path


def lease(shard_id: str, **changes) -> Lease:
    return Lease(lease_key=f"orders:2026-01-01T00:00:00.000:{shard_id}", table="orders", stream_arn=STREAM_ARN,
                 shard_id=shard_id, **changes)


@pytest.fixture
def sqlite_store(tmp_path) -> SQLiteLeaseStore:
    """Four leases (finished parent, owned child with lag, free, owned by a stale worker) and
    two announced workers (one fresh heartbeat, one 5 minutes old)."""
    store = SQLiteLeaseStore(tmp_path / "leases.sqlite")
    store.ensure_table()
    now = datetime.now(timezone.utc)
    store.create_lease_if_absent(lease(PARENT, checkpoint="SHARD_END", counter=9))
    store.create_lease_if_absent(lease(CHILD, owner="worker-live", counter=7, checkpoint=SEQ, behind_ms=3200,
                                       parent_shard_ids=(PARENT,)))
    store.create_lease_if_absent(lease(FREE))
    store.create_lease_if_absent(lease(STALE_OWNED, owner="worker-stale", counter=3, checkpoint="LATEST",
                                       behind_ms=3_900_000))
    store.announce_worker(WorkerInfo("worker-live", "host-a", 111, (now - timedelta(hours=1)).isoformat(),
                                     now.isoformat(), leases=1))
    store.announce_worker(WorkerInfo("worker-stale", "host-b", 222, (now - timedelta(hours=2)).isoformat(),
                                     (now - timedelta(minutes=5)).isoformat(), leases=1))
    return store


@pytest.fixture
def sqlite_config(tmp_path, sqlite_store) -> Path:
    return write_config(tmp_path, {"store": "sqlite", "sqlite_path": sqlite_store.path, "failover_time_s": 10},
                        {"endpoint_url": f"http://127.0.0.1:{closed_port()}", "max_attempts": 1,
                         "connect_timeout_s": 2},
                        {"table": "orders"})


# ---------------------------------------------------------------------------------------------
# formatting


@pytest.mark.parametrize("ms, text", [
    (None, "-"), (0, "0 s"), (-500, "0 s"), (400, "0.4 s"), (3200, "3.2 s"), (3000, "3 s"), (45_400, "45 s"),
    (725_000, "12 min 5 s"), (3_900_000, "1 h 5 min"), (7_200_000, "2 h"), (97_200_000, "1 d 3 h"),
])
def test_durations_are_human_readable(ms, text):
    assert format_duration_ms(ms) == text


def test_sequence_numbers_are_shortened_and_sentinels_kept():
    assert short_checkpoint(SEQ) == "0000…2345678901"
    assert short_checkpoint("000000000000000000042") == "0000…0000000042"  # 21 digits: still shortened
    assert short_checkpoint("1234567890") == "1234567890"
    for sentinel in ("TRIM_HORIZON", "LATEST", "SHARD_END"):
        assert short_checkpoint(sentinel) == sentinel


# ---------------------------------------------------------------------------------------------
# SQLite store, CLI in a subprocess, stream unreachable


def test_status_table_from_sqlite_with_unreachable_stream(sqlite_config, sqlite_store):
    before = sqlite_store.list_leases(), sqlite_store.list_workers()
    result = run_cli("status", "--config", str(sqlite_config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = {shard: next(line for line in out.splitlines() if shard in line and "orders" in line)
             for shard in (PARENT, CHILD, FREE, STALE_OWNED)}
    parent, child, free, stale = (lines[s].split() for s in (PARENT, CHILD, FREE, STALE_OWNED))
    assert parent == ["orders", PARENT, "free", "SHARD_END", "-", "9", "done", "?"]
    assert child == ["orders", CHILD, "worker-live", short_checkpoint(SEQ), PARENT, "7", "3.2", "s", "?"]
    assert free == ["orders", FREE, "free", "TRIM_HORIZON", "-", "0", "-", "?"]
    assert stale == ["orders", STALE_OWNED, "worker-stale", "(stale)", "LATEST", "-", "3", "1", "h", "5", "min", "?"]
    live_row = next(line for line in out.splitlines() if line.split()[:1] == ["worker-live"])
    stale_row = next(line for line in out.splitlines() if line.split()[:1] == ["worker-stale"])
    assert live_row.split()[1:3] == ["host-a", "111"] and live_row.split()[-1] == "live"
    assert "1 (announced 1)" in live_row
    assert stale_row.split()[1:3] == ["host-b", "222"] and stale_row.split()[-1] == "stale"
    assert re.search(r"5 min( [0-9]+ s)? ago", stale_row), stale_row  # the seconds since it was written may show
    assert "1 stream, 4 shards (1 finished, 1 free, 2 owned), 1 live worker, max behind 1 h 5 min" in out
    assert "note: stream orders not described" in out
    # read-only: nothing changed in the store
    assert (sqlite_store.list_leases(), sqlite_store.list_workers()) == before
    assert [le.counter for le in sqlite_store.list_leases()] == [le.counter for le in before[0]]


def test_status_json_from_sqlite(sqlite_config):
    result = run_cli("status", "--config", str(sqlite_config), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"generated_at", "failover_time_s", "stale_after_s", "leases", "workers", "streams", "summary",
                         "gaps", "snapshots", "sink_lanes"}  # sink_lanes: per-sink lanes (issue 15)
    assert data["snapshots"] == []  # issue 17: snapshots from the lease store's snapshot namespace
    assert data["summary"] == {"streams": 1, "shards": 4, "finished": 1, "free": 1, "owned": 2, "workers": 2,
                               "live_workers": 1, "max_behind_ms": 3_900_000, "gaps": 0}
    assert data["stale_after_s"] == 30.0
    by_shard = {row["shard_id"]: row for row in data["leases"]}
    assert by_shard[CHILD]["checkpoint"] == SEQ  # full text in JSON
    assert by_shard[CHILD]["owner"] == "worker-live" and by_shard[CHILD]["owner_state"] == "live"
    assert by_shard[CHILD]["parent_shard_ids"] == [PARENT] and by_shard[CHILD]["behind_ms"] == 3200
    assert by_shard[PARENT]["finished"] is True and by_shard[PARENT]["checkpoint"] == "SHARD_END"
    assert by_shard[FREE]["owner"] is None and by_shard[FREE]["behind_ms"] is None
    assert by_shard[STALE_OWNED]["owner_state"] == "stale"
    assert all(row["in_stream"] is None for row in data["leases"])
    workers = {w["worker_id"]: w for w in data["workers"]}
    assert workers["worker-live"]["state"] == "live" and workers["worker-live"]["leases_held"] == 1
    assert workers["worker-stale"]["state"] == "stale" and 290 < workers["worker-stale"]["heartbeat_age_s"] < 600
    [stream] = data["streams"]
    assert stream["stream_arn"] == STREAM_ARN and stream["described"] is False
    assert "cannot reach DynamoDB" in stream["error"]


def test_gather_status_with_fake_now_and_a_described_stream(sqlite_store):
    """``now`` decides live/stale; a described stream gives in_stream yes/no and unleased shards."""
    from pipeline.source import ShardInfo

    class Described:
        table, stream_arn = "orders", STREAM_ARN

        def list_shards(self):
            return [ShardInfo(CHILD, PARENT, "1", None), ShardInfo(FREE, None, "1", None),
                    ShardInfo(STALE_OWNED, None, "1", None), ShardInfo("shardId-new", CHILD, "2", None)]

    later = datetime.now(timezone.utc) + timedelta(seconds=31)
    report = gather_status(sqlite_store, [Described()], failover_time_s=10, now=later)
    assert [w.state for w in report.workers] == ["stale", "stale"]
    assert report.summary.live_workers == 0
    by_shard = {row.shard_id: row for row in report.leases}
    assert by_shard[PARENT].in_stream is False and by_shard[CHILD].in_stream is True
    [stream] = report.streams
    assert stream.described and stream.shards_in_stream == 4 and stream.shards_without_lease == ["shardId-new"]
    report = gather_status(sqlite_store, [Described()], failover_time_s=60, now=later)
    assert [w.state for w in report.workers] == ["live", "stale"]  # 5-min-old heartbeat > 3 × 60 s
    data = json.loads(json.dumps(status_to_dict(report)))
    assert data["summary"]["live_workers"] == 1 and data["streams"][0]["shards_without_lease"] == ["shardId-new"]


def test_status_module_does_not_import_boto3():
    code = "import sys, pipeline.ops.status; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 0, result.stderr


def test_lease_owner_without_announcement_is_listed(tmp_path):
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    store.create_lease_if_absent(lease(FREE, owner="ghost", counter=1))
    report = gather_status(store)
    [worker] = report.workers
    assert (worker.worker_id, worker.state, worker.leases_held, worker.host) == ("ghost", "unannounced", 1, None)
    assert report.leases[0].owner_state == "unannounced"


def test_missing_sqlite_file_is_exit_1_and_not_created(tmp_path):
    path = tmp_path / "missing.sqlite"
    config = write_config(tmp_path, {"store": "sqlite", "sqlite_path": str(path)}, {}, {"table": "orders"})
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ddb-cdc: CheckpointStoreError: no checkpoint file at {path}: check checkpoints.sqlite_path "
        "(a worker creates it on its first start)"]
    assert not path.exists()


def test_unreachable_dynamodb_lease_table_is_exit_1_one_line(tmp_path):
    port = closed_port()
    config = write_config(tmp_path, {"store": "dynamodb", "table_name": "leases"},
                          {"endpoint_url": f"http://127.0.0.1:{port}", "max_attempts": 1}, {"table": "orders"})
    started = time.monotonic()
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("ddb-cdc: CheckpointStoreError: cannot scan lease table 'leases'") and str(port) in line
    assert result.stdout == ""
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------------
# DynamoDB lease table on DynamoDB Local, a real worker




def rendered(report) -> str:
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    render_status(report, Console(file=buffer, width=250, highlight=False))
    return buffer.getvalue()


def test_status_of_a_running_worker_on_dynamodb_local(tmp_path, aws_env, dynamodb_local, make_table):
    import uuid

    from connectors.dynamodb_streams import DynamoDBStreamSource
    from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
    from pipeline.awsconfig import AwsConfig
    from pipeline.logs import get_logger
    from pipeline.testing import RecordingSink

    client, table, stream_arn = make_table("status")
    aws = AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint, max_attempts=3)
    lease_table = f"status-leases-{uuid.uuid4().hex[:8]}"
    store = DynamoDBLeaseStore(aws, lease_table)
    source = DynamoDBStreamSource(aws, table=table)
    sink = RecordingSink()
    worker = make_worker(source, tmp_path, sink, store=store, worker_id="status-worker-1", logger=get_logger(),
                         max_records=1000, idle_interval_ms=50, discovery_interval_s=1.0, failover_time_s=3.0,
                         shutdown_grace_s=10.0)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        for i in range(3):
            client.put_item(TableName=table, Item={"pk": {"S": f"item-{i}"}, "n": {"N": str(i)}})

        def checkpointed() -> bool:
            if len(sink.flushed) < 3:
                return False
            leases = store.list_leases()
            return len(leases) == 1 and leases[0].checkpoint == sink.flushed[-1].source.sequence_number

        wait_until(checkpointed, "the worker checkpoints the third record")
        wait_until(lambda: [w.leases for w in store.list_workers()] == [1], "the worker announces its lease")
        last_seq = sink.flushed[-1].source.sequence_number

        report = gather_status(store, [source], failover_time_s=3.0)
        [row] = report.leases
        assert (row.owner, row.owner_state, row.checkpoint, row.in_stream) == ("status-worker-1", "live", last_seq, True)
        assert row.table == table and row.stream_arn == stream_arn and row.behind_ms is not None
        [w] = report.workers
        assert (w.worker_id, w.state, w.leases_held, w.leases_announced) == ("status-worker-1", "live", 1, 1)
        assert w.pid == os.getpid()
        [stream] = report.streams
        assert stream.described and stream.shards_in_stream == 1 and stream.shards_without_lease == []
        s = report.summary
        assert (s.streams, s.shards, s.finished, s.free, s.owned, s.live_workers) == (1, 1, 0, 0, 1, 1)

        # the CLI on the same store and stream (a subprocess: the worker thread logs to this stdout)
        config = write_config(tmp_path, {"store": "dynamodb", "table_name": lease_table, "failover_time_s": 3},
                              {"dynamodb_endpoint_url": dynamodb_local.endpoint, "max_attempts": 3},
                              {"table": table})
        result = run_cli("status", "--config", str(config), "--json")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["leases"][0]["owner"] == "status-worker-1" and data["leases"][0]["checkpoint"] == last_seq
        assert data["leases"][0]["in_stream"] is True and data["summary"]["live_workers"] == 1
        assert data["workers"][0]["leases_held"] == 1 and data["workers"][0]["state"] == "live"
        out = rendered(report)
        shard_line = next(line for line in out.splitlines() if row.shard_id in line)
        assert "status-worker-1" in shard_line and shard_line.split()[-1] == "yes"
        worker_line = next(line for line in out.splitlines() if line.split()[:1] == ["status-worker-1"])
        assert worker_line.split()[-1] == "live" and "1 (announced 1)" in worker_line
        assert "1 stream, 1 shard (0 finished, 0 free, 1 owned), 1 live worker" in out
    finally:
        worker.stop()
        thread.join(20)
    assert codes == [0]

    report = gather_status(store, [source], failover_time_s=3.0)
    [row] = report.leases
    assert row.owner is None and row.checkpoint == last_seq and row.in_stream is True
    assert report.workers == []
    s = report.summary
    assert (s.shards, s.free, s.owned, s.workers, s.live_workers) == (1, 1, 0, 0, 0)
    out = rendered(report)
    assert "free" in next(line for line in out.splitlines() if row.shard_id in line)
    assert "no workers announced" in out
