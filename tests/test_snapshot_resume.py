"""A snapshot survives ``kill -9`` (it resumes from each segment's last checkpoint and the sinks
end the same), keeps within ``--max-rcu`` over a 30 s window, and backs off from throttling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import orjson
import pytest
import structlog

from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.errors import SnapshotThrottledError
from pipeline.snapshot.progress import SnapshotProgressStore
from tests.helpers import wait_until
from tests.snapshot_helpers import audit_lines, fill_table, os_docs, scan_all
from tests.test_snapshot_scan import CREDS, write_config

ROOT = Path(__file__).resolve().parents[1]
LOG = structlog.get_logger()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_kill_9_mid_snapshot_then_rerun_resumes_and_the_sinks_end_the_same(tmp_path, aws_env, make_table,
                                                                              moto_server, opensearch_url):
    made = make_table("resume", range_key=("sk", "N"))
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
    bucket = f"audit-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    index = f"resume-{uuid.uuid4().hex[:6]}"
    cfg = write_config(tmp_path, table=made.table_name, ddb=made.client.meta.endpoint_url, s3=moto_server.endpoint,
                       bucket=bucket, os_url=opensearch_url, index=index)
    fill_table(made.client, made.table_name, 4000)
    args = [sys.executable, "-m", "connectors.app.cli", "snapshot", "--config", str(cfg), "--segments", "4",
            "--max-rcu", "8", "--json"]  # small pages (~4 items): slow enough to kill mid-way
    first = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    store = SnapshotProgressStore(SQLiteLeaseStore(tmp_path / "leases.sqlite"), "test")

    def some_progress() -> bool:
        if not (tmp_path / "leases.sqlite").exists():
            return False
        try:
            state = store.running(made.table_name)
        except Exception:  # noqa: BLE001 - the file is being created
            return False
        return state is not None and 600 <= state.items and state.segments_done < 4

    try:
        wait_until(some_progress, "the first run checkpointed some pages", timeout=120, interval=0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert first.returncode == -signal.SIGKILL
    at_kill = store.running(made.table_name)
    assert at_kill is not None and at_kill.items < 4000

    # `ddb-cdc status` shows the snapshot in progress
    from connectors.app.cli import main
    import contextlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--config", str(cfg), "--json"]) == 0
    (row,) = [r for r in orjson.loads(out.getvalue())["snapshots"] if r["table"] == made.table_name]
    assert row["state"] == "running" and row["items"] == at_kill.items and row["segments"] == 4
    assert row["age_s"] >= 0 and row["snapshot_id"] == at_kill.meta.snapshot_id

    second = subprocess.run(args[:-3] + ["--max-rcu", "0", "--json"], env=_env(), capture_output=True, cwd=tmp_path,
                            timeout=300)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    report = orjson.loads(second.stdout)
    assert report["resumed"] is True and report["snapshot_id"] == at_kill.meta.snapshot_id
    assert report["items"] == 4000 and report["ended"] == "done"
    assert report["items_this_run"] <= 4000 - at_kill.items, "resumed from the checkpoints, not from the start"

    table = scan_all(made.client, made.table_name)
    docs = os_docs(opensearch_url, index)
    assert set(docs) == set(table) and {v for v, _ in docs.values()} == {report["version"]}
    lines = audit_lines(s3, bucket, "audit/")
    keys = {line["key_id"] for _, line in lines}
    assert keys == set(table), "every item in S3"
    positions = {(line["source"]["shard_id"], line["source"]["sequence_number"]) for _, line in lines}
    assert len(positions) == 4000, "each item has one position (shard, ordinal) however often it was written"


class _RecordingReader:
    """Wraps a reader, recording (monotonic time, consumed RCU) per page."""

    def __init__(self, inner, pages: list):
        self.inner, self.pages = inner, pages
        self.key_names, self.segments = inner.key_names, inner.segments
        self.table_info = getattr(inner, "table_info", None)

    def read_page(self, segment, position, limit):
        page = self.inner.read_page(segment, position, limit)
        self.pages.append((time.monotonic(), page.consumed_rcu))
        return page


def test_max_rcu_is_kept_within_20_percent_over_30_s(tmp_path, aws_env, make_table, moto_server, monkeypatch):
    from connectors.snapshot import run as snapshot_run
    from pipeline.config import Settings
    from pipeline.registry import build_sinks

    made = make_table("rcu", range_key=("sk", "N"))
    fill_table(made.client, made.table_name, 1400, pad=2000)  # ~0.25 RCU per item on DynamoDB Local
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
    bucket = f"audit-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    cfg = write_config(tmp_path, table=made.table_name, ddb=made.client.meta.endpoint_url, s3=moto_server.endpoint,
                       bucket=bucket, os_url=None)
    import yaml
    settings = Settings(**yaml.safe_load(cfg.read_text()))
    pages: list = []
    real_plan = snapshot_run.plan_snapshot

    def plan(*a, **kw):
        reader, state, is_new, progress = real_plan(*a, **kw)
        return _RecordingReader(reader, pages), state, is_new, progress

    monkeypatch.setattr(snapshot_run, "plan_snapshot", plan)
    rate = 10.0
    report = snapshot_run.run_snapshot(settings, snapshot_run.SnapshotOptions(segments=4, max_rcu=rate),
                                       sinks=build_sinks(settings.sinks, "test"), logger=LOG)
    assert report.ended == "done" and report.items == 1400, report
    assert report.rcu > rate * 33, f"the table must take longer than the window: {report.rcu} RCU"
    start = pages[0][0]
    window = sum(rcu for t, rcu in pages if start + 1.0 <= t < start + 31.0)  # after the first second's burst
    assert 0.8 * rate * 30 <= window <= 1.2 * rate * 30, f"{window:.1f} RCU in 30 s at --max-rcu {rate}"
    worst = max(sum(rcu for t, rcu in pages if t0 <= t < t0 + 30.0) for t0, _ in pages if t0 + 30 <= pages[-1][0])
    assert worst <= 1.2 * rate * 30 + rate * 1.0, f"worst 30 s window {worst:.1f} RCU (incl. the 1 s burst)"


class _FakeReader:
    key_names = ("pk",)
    segments = 2

    def __init__(self, throttle_first: int):
        self.left = throttle_first
        self.calls = 0

    def read_page(self, segment, position, limit):
        from pipeline.snapshot.runner import Page

        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise SnapshotThrottledError("ProvisionedThroughputExceededException: slow down", operation="scan")
        start = position or 0
        items = [{"pk": {"S": f"s{segment}-{i}"}} for i in range(start, min(start + 10, 50))]
        nxt = start + 10 if start + 10 < 50 else None
        return Page(items=items, next_position=nxt, consumed_rcu=1.0)


def test_throttling_is_backed_off_never_fatal(tmp_path):
    from pipeline.deadletter import DirectoryDeadLetterQueue
    from pipeline.snapshot.progress import SnapshotMeta
    from pipeline.snapshot.ratelimit import RcuLimiter
    from pipeline.snapshot.runner import SnapshotRunner
    from datetime import datetime, timezone

    store = SnapshotProgressStore(SQLiteLeaseStore(tmp_path / "l.sqlite"), "me")
    store.store.ensure_table()
    meta = SnapshotMeta(table="t", snapshot_id="x1", started_at=datetime.now(timezone.utc), version=5 << 32, segments=2)
    state = store.create(meta)
    delivered = []
    reader = _FakeReader(throttle_first=5)
    runner = SnapshotRunner(reader=reader, progress=store, state=state, deliver=lambda b: delivered.extend(b.events),
                            flush=lambda: None, dead_letter=DirectoryDeadLetterQueue(tmp_path / "dl"),
                            limiter=RcuLimiter(None), logger=LOG, max_backoff_s=0.05)
    report = runner.run()
    assert report.ended == "done" and report.items == 100 and report.throttles == 5
    assert len({e.key_id for e in delivered}) == 100
    assert store.finished("t") is not None


def test_scan_reader_maps_throttling_to_a_backoff(aws_env):
    from botocore.stub import Stubber

    from connectors.snapshot.scan import ScanReader

    client = boto3.client("dynamodb", **CREDS)
    reader = ScanReader(client, "t", key_names=("pk",), segments=2)
    with Stubber(client) as stub:
        stub.add_client_error("scan", service_error_code="ProvisionedThroughputExceededException", http_status_code=400)
        stub.add_client_error("scan", service_error_code="ResourceNotFoundException", http_status_code=400)
        with pytest.raises(SnapshotThrottledError):
            reader.read_page(0, None, None)
        from pipeline.errors import SnapshotError
        with pytest.raises(SnapshotError) as err:
            reader.read_page(0, None, None)
        assert not isinstance(err.value, SnapshotThrottledError)


def test_progress_in_the_dynamodb_lease_table(aws_env, dynamodb_local):
    """Snapshot records and segment checkpoints in a DynamoDB lease table (KCL layout), namespaced."""
    from datetime import datetime, timezone

    from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
    from pipeline.awsconfig import AwsConfig
    from pipeline.snapshot.progress import SegmentProgress, SnapshotMeta

    lease_table = DynamoDBLeaseStore(AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint),
                                     f"leases-{uuid.uuid4().hex[:8]}")
    lease_table.ensure_table()
    store = SnapshotProgressStore(lease_table, "w1")
    meta = SnapshotMeta(table="orders", snapshot_id="s1", started_at=datetime.now(timezone.utc), version=7 << 32,
                        segments=2)
    store.create(meta)
    store.save_segment(meta, SegmentProgress(1, position={"pk": {"B64": "AAE="}}, items=10, pages=1, rcu=2.5))
    assert lease_table.list_leases() == [], "the live consumer's namespace sees nothing"
    state = SnapshotProgressStore(lease_table, "w2").running("orders")
    assert state is not None and state.items == 10 and state.segments[1].position == {"pk": {"B64": "AAE="}}
    other = SnapshotProgressStore(lease_table, "w2")
    other.take(state.meta)  # a rerun takes the leases over ...
    from pipeline.errors import LeaseLostError
    with pytest.raises(LeaseLostError):  # ... and the first owner can no longer move a checkpoint
        store.save_segment(meta, SegmentProgress(1, items=11))
    meta.state = "done"
    other.save_meta(meta)
    assert other.running("orders") is None and other.finished("orders").meta.snapshot_id == "s1"
