"""A snapshot longer than the stream's retention: the stream is consumed *during* the snapshot, and
a consumer falling behind toward the trim horizon is alarmed (log, metric, /readyz) and throttles
the snapshot first. The retention is scaled down to 60 s; the stream is the streams API double
(a consumer kept behind by records stamped 45 s in the past), the table is DynamoDB Local."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import boto3
import structlog

from connectors.snapshot.initial import InitialSnapshot
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.config import Settings
from pipeline.snapshot.metrics import SNAPSHOT_RATE_FACTOR
from pipeline.snapshot.retention import assess
from pipeline.testing import RecordingSink, make_stream_record
from tests.helpers import wait_until
from tests.snapshot_helpers import fill_table
from tests.stacks import fake_source, make_worker
from connectors.dynamodb_streams.testing import FakeStreams
from tests.test_snapshot_scan import CREDS

LOG = structlog.get_logger()


def test_assessment_levels():
    assert assess(None, 100).level == "ok" and assess(10_000, 100).factor == 1.0
    warn = assess(30_000, 100)
    assert warn.level == "warn" and warn.factor == 0.5 and warn.reason is None
    alarm = assess(60_000, 100)
    assert alarm.level == "alarm" and alarm.factor == 0.1 and "behind" in alarm.reason


def test_stream_near_its_trim_horizon_throttles_the_snapshot_and_is_alarmed(tmp_path, aws_env, make_table,
                                                                             moto_server):
    made = make_table("retain", range_key=("sk", "N"))
    fill_table(made.client, made.table_name, 1500)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
    bucket = f"audit-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    settings = Settings(
        source={"table": made.table_name},
        aws={"region": "us-east-1", "dynamodb_endpoint_url": made.client.meta.endpoint_url,
             "s3_endpoint_url": moto_server.endpoint},
        checkpoints={"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite")},
        dead_letter={"directory": str(tmp_path / "dl")},
        sinks=[{"name": "audit", "type": "s3_audit", "options": {"bucket": bucket, "prefix": "audit"}}])

    arn = f"arn:aws:dynamodb:us-east-1:000000000000:table/{made.table_name}/stream/2026-01-01T00:00:00.000"
    fake = FakeStreams(stream_arn=arn)
    shard = fake.open_shard()
    stop = threading.Event()

    def old_records() -> None:  # the consumer reads records 45 s old: 75 % of a 60 s retention
        n = 0
        while not stop.is_set():
            created = datetime.now(timezone.utc) - timedelta(seconds=45)
            fake.put(shard, make_stream_record(keys={"pk": f"s{n}", "sk": 1}, new_image={"pk": f"s{n}", "sk": 1},
                                               created=created))
            n += 1
            stop.wait(0.05)

    store = SQLiteLeaseStore(tmp_path / "leases.sqlite")
    worker = make_worker(fake_source(fake, arn), tmp_path, RecordingSink(), store=store, logger=LOG, max_records=5,
                         checkpoint_interval_s=0.2, discovery_interval_s=0.5, failover_time_s=1.5, shutdown_grace_s=10)
    initial = InitialSnapshot(settings, table=made.table_name, lease_store=store, owner="w1", logger=LOG,
                              stopping=lambda: worker.stop_event.is_set(), failover_time_s=1.5, retention_s=60.0,
                              max_rcu=2.0, segments=2, lag_window_s=3.0)
    assert initial.start(), "a first start snapshots"
    worker.ready_checks.append(initial.ready_reasons)
    feeder = threading.Thread(target=old_records, daemon=True)
    feeder.start()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: initial.state == "running" and initial.assessment.level == "alarm",
                   "the stream's lag alarmed while the snapshot runs", timeout=60, interval=0.2)
        assert initial.limiter.rate == 2.0 * 0.1, "the snapshot is throttled first"
        ready, reasons = worker.ready()
        assert not ready and any("retention" in r for r in reasons), reasons
        assert SNAPSHOT_RATE_FACTOR.labels(table=made.table_name)._value.get() == 0.1
        # the stream is consumed meanwhile, not after the snapshot
        assert initial.assessment.behind_s >= 0.5 * 60
        read_before = len(worker.sinks[0].written)
        time.sleep(2.0)
        assert len(worker.sinks[0].written) > read_before, "the stream keeps being read during the snapshot"
        assert initial.state == "running"
        # the stream catches up (fresh records): the snapshot gets its rate back
        stop.set()
        feeder.join(5)
        wait_until(lambda: initial.assessment.level == "ok", "the alarm cleared", timeout=60, interval=0.2)
        assert initial.limiter.rate == 2.0 and worker.ready()[0]
    finally:
        stop.set()
        worker.stop()
        thread.join(30)
        initial.stop()
