"""Trimmed data: a checkpoint behind the trim horizon, or a shard that left the stream unread, is
never skipped without a recorded gap (lease table, log, status), under ``on_trimmed: fail | skip``.

DynamoDB Local never trims, so TrimmedDataAccessException / ResourceNotFoundException come from
the API double (connectors/dynamodb_streams/testing.py); the lease store is the real SQLite store, and the gap
is also checked in the real DynamoDB lease table on DynamoDB Local.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import structlog
import yaml

from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.checkpoint import Gap
from pipeline.events import SHARD_END
from pipeline.testing import RecordingSink, make_stream_record
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq
from tests.stacks import make_worker

ROOT = Path(__file__).resolve().parent.parent


def recs(shard_no: int, start: int, n: int) -> list[dict]:
    return [make_stream_record(event_name="INSERT", keys={"pk": f"s{shard_no}-{i}"},
                               new_image={"pk": f"s{shard_no}-{i}"}, sequence_number=seq(shard_no, i))
            for i in range(start, start + n)]




def run_worker(fake, store, tmp_path, on_trimmed: str, *, exit_when_idle: bool = True):
    sink = RecordingSink()
    worker = make_worker(fake, tmp_path, sink, store=store, logger=structlog.get_logger(), on_trimmed=on_trimmed,
                         exit_when_idle=exit_when_idle)
    return worker, sink


def trimmed_stream() -> FakeStreams:
    """Shard A: 6 records; reading from index 2 on fails as trimmed once (the first 2 are read,
    then the stream 'trims' past them); the records from index 4 on are what TRIM_HORIZON gives."""
    fake = FakeStreams()
    fake.add_shard("shardId-A", recs(1, 0, 6), closed=True)
    fake.fail_get_records("shardId-A", 2, "TrimmedDataAccessException", times=1)
    return fake


def test_fail_policy_stops_the_shard_and_records_the_gap(tmp_path):
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    worker, sink = run_worker(trimmed_stream(), store, tmp_path, "fail")
    code = worker.run()
    assert code == 1, "a stopped shard is reported in the exit code"
    assert [e.sequence_number for e in sink.written] == [seq(1, 0), seq(1, 1)], "nothing after the gap"
    gaps = store.list_gaps()
    assert len(gaps) == 1
    gap = gaps[0]
    assert (gap.shard_id, gap.policy, gap.stream_arn) == ("shardId-A", "fail", STREAM_ARN)
    assert gap.last_checkpoint == seq(1, 1)  # the last record read before the gap
    assert gap.first_position_after is None and "TrimmedDataAccessException" in gap.error
    lease = store.list_leases()[0]
    assert lease.checkpoint == seq(1, 1), "the checkpoint is not moved over the gap"


def test_skip_policy_goes_on_from_trim_horizon_with_the_gap_recorded(tmp_path):
    fake = trimmed_stream()
    # what TRIM_HORIZON returns after the trim: the double serves the shard from index 0, so
    # drop the trimmed records to model the trim horizon having moved past them
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    original = fake.get_shard_iterator

    def trimmed_iterator(**kwargs):
        if kwargs["ShardIteratorType"] == "TRIM_HORIZON" and store.list_gaps():
            return original(**{**kwargs, "ShardIteratorType": "AT_SEQUENCE_NUMBER", "SequenceNumber": seq(1, 4)})
        return original(**kwargs)

    fake.get_shard_iterator = trimmed_iterator
    worker, sink = run_worker(fake, store, tmp_path, "skip")
    assert worker.run() == 0
    assert [e.sequence_number for e in sink.written] == [seq(1, 0), seq(1, 1), seq(1, 4), seq(1, 5)]
    (gap,) = store.list_gaps()
    assert gap.policy == "skip" and gap.last_checkpoint == seq(1, 1)
    assert gap.first_position_after == seq(1, 4), "the first position read after the gap is recorded"
    assert store.list_leases()[0].checkpoint == SHARD_END


def test_vanished_shard_with_skip_is_finished_and_its_child_starts(tmp_path):
    fake = FakeStreams()
    fake.add_shard("shardId-P", recs(1, 0, 4), closed=True)
    fake.add_shard("shardId-C", recs(2, 0, 2), parent="shardId-P", closed=True)
    fake.fail_get_records("shardId-P", 2, "ResourceNotFoundException", times=None)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    worker, sink = run_worker(fake, store, tmp_path, "skip")
    assert worker.run() == 0
    assert [e.sequence_number for e in sink.written] == [seq(1, 0), seq(1, 1), seq(2, 0), seq(2, 1)]
    (gap,) = store.list_gaps()
    assert gap.shard_id == "shardId-P" and "no longer in the stream" in gap.error
    leases = {lease.shard_id: lease.checkpoint for lease in store.list_leases()}
    assert leases == {"shardId-P": SHARD_END, "shardId-C": SHARD_END}


def test_gap_in_dynamodb_lease_table_and_status(tmp_path, dynamodb_local, aws_env):
    aws = AwsConfig(region="us-east-1", dynamodb_endpoint_url=dynamodb_local.endpoint)
    store = DynamoDBLeaseStore(aws, f"gaps-{os.urandom(4).hex()}")
    store.ensure_table()
    gap = Gap(stream_arn=STREAM_ARN, table="orders", shard_id="shardId-A", last_checkpoint=seq(1, 1),
              first_position_after=None, detected_at="2026-11-21T10:00:00+00:00", policy="skip", error="trimmed")
    store.record_gap(gap)
    store.record_gap(Gap(**{**gap.__dict__, "first_position_after": seq(1, 4)}))  # update, same id
    assert store.list_gaps() == [Gap(**{**gap.__dict__, "first_position_after": seq(1, 4)})]
    assert store.list_leases() == [], "gap items are not leases"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"stream_arn": STREAM_ARN},
        "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint,
                "streams_endpoint_url": "http://127.0.0.1:9", "max_attempts": 1},
        "checkpoints": {"store": "dynamodb", "table_name": store.table_name},
        "sinks": [{"name": "c", "type": "redis_cache", "options": {"url": "redis://x", "key_templates": ["k:{pk}"]}}],
    }))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "connectors.app.cli", "status", "--config", str(config), "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["gaps"] == [{"stream_arn": STREAM_ARN, "table": "orders", "shard_id": "shardId-A",
                             "last_checkpoint": seq(1, 1), "first_position_after": seq(1, 4),
                             "detected_at": "2026-11-21T10:00:00+00:00", "policy": "skip", "error": "trimmed"}]
    assert data["summary"]["gaps"] == 1
    text = subprocess.run([sys.executable, "-m", "connectors.app.cli", "status", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert "Recorded gaps" in text.stdout and "shardId-A" in text.stdout and seq(1, 4)[-6:] in text.stdout
