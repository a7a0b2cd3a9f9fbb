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

import pytest
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


# -- heads trimmed where no TrimmedDataAccessException is raised (issue 13, item 2) -------------

def lineage_with_trimmed_child(*, trimmed: int) -> FakeStreams:
    """P (2 records) → C (3 records, closed) → G (1 record, closed), all listed at the first sync,
    so C's lease records its StartingSequenceNumber; the oldest ``trimmed`` records of C are gone
    (older than 24 h: the worker was ~24 h behind on P). Shard ids of this form carry no creation
    time, so every shard may be trimmed."""
    fake = FakeStreams()
    fake.add_shard("shardId-P", recs(1, 0, 2), closed=True)
    fake.add_shard("shardId-C", recs(2, 0, 3), parent="shardId-P", closed=True)
    fake.add_shard("shardId-G", recs(3, 0, 1), parent="shardId-C", closed=True)
    fake.trim_head("shardId-C", trimmed)
    return fake


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_closed_child_whose_records_were_all_trimmed_is_a_recorded_gap(tmp_path, policy):
    """TRIM_HORIZON of a closed shard whose every record was trimmed returns no record and SHARD_END:
    no first record to compare with StartingSequenceNumber. Reaching SHARD_END having read nothing
    of a shard that may be trimmed is the gap (old code: C ended silently, exit 0 under ``fail``)."""
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    worker, sink = run_worker(lineage_with_trimmed_child(trimmed=3), store, tmp_path, policy)
    code = worker.run()
    (gap,) = store.list_gaps()
    assert (gap.shard_id, gap.policy, gap.last_checkpoint) == ("shardId-C", policy, "TRIM_HORIZON")
    assert gap.first_position_after == SHARD_END and "no record" in gap.error
    leases = {lease.shard_id: lease.checkpoint for lease in store.list_leases()}
    delivered = [e.sequence_number for e in sink.written]
    if policy == "fail":
        assert code == 1, "on_trimmed: fail stops the shard and the worker exits 1"
        assert leases["shardId-C"] == "TRIM_HORIZON" and leases["shardId-G"] == "TRIM_HORIZON"
        assert delivered == [seq(1, 0), seq(1, 1)], "the grandchild waits behind the stopped shard"
    else:
        assert code == 0
        assert leases == {"shardId-P": SHARD_END, "shardId-C": SHARD_END, "shardId-G": SHARD_END}
        assert delivered == [seq(1, 0), seq(1, 1), seq(3, 0)]


def test_a_young_empty_closed_child_is_no_gap(tmp_path):
    """A shard younger than the 24 h retention (its id carries its creation time) cannot have lost
    a record: a closed child with no record at all (a split with no writes) is read to SHARD_END
    without a gap (no false stop under ``fail``)."""
    import time as _time

    fake = FakeStreams()
    parent = fake.open_shard()
    fake.put(parent, make_stream_record(event_name="INSERT", keys={"pk": "p"}, new_image={"pk": "p"}))
    fake.shards[parent].closed = True
    child = fake.open_shard(parent=parent, created_ms=int(_time.time() * 1000) - 3600_000)  # an hour old
    fake.shards[child].closed = True  # no record was ever written to it
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    worker, sink = run_worker(fake, store, tmp_path, "fail")
    assert worker.run() == 0
    assert store.list_gaps() == []
    assert {lease.shard_id: lease.checkpoint for lease in store.list_leases()} == {parent: SHARD_END,
                                                                                   child: SHARD_END}
    assert next(lease for lease in store.list_leases() if lease.shard_id == child).starting_sequence_number


T_OLD = 1_700_000_000.0  # 2023-11-14: long past the 24 h retention


def timed_recs(n: int, start_s: float) -> list[dict]:
    """``n`` records of shard 1, one second apart from ``start_s`` (epoch s)."""
    return [make_stream_record(event_name="INSERT", keys={"pk": f"t{i}"}, new_image={"pk": f"t{i}"},
                               sequence_number=seq(1, i), created=start_s + i) for i in range(n)]


def at_timestamp_lease(store, bound: float) -> None:
    """The lease a LATEST start made concrete leaves when its reader died before reading a record."""
    from pipeline.checkpoint import AT_TIMESTAMP_PREFIX, Lease, lease_key_for

    store.create_lease_if_absent(Lease(lease_key=lease_key_for("orders", STREAM_ARN, "shardId-A"), table="orders",
                                       stream_arn=STREAM_ARN, shard_id="shardId-A",
                                       checkpoint=f"{AT_TIMESTAMP_PREFIX}{int(bound)}"))


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_an_at_timestamp_checkpoint_read_after_its_records_were_trimmed_is_a_recorded_gap(tmp_path, policy):
    """``AT_TIMESTAMP:t`` is read from TRIM_HORIZON. When the first readable record was created after
    t and is not the shard's first (its head was trimmed), the records created from t until it may
    be lost: a gap (old code: read on from the trim horizon, no gap, exit 0)."""
    fake = FakeStreams()
    fake.add_shard("shardId-A", timed_recs(6, T_OLD), closed=True)
    fake.trim_head("shardId-A", 4)  # records t0..t3 are gone; t = T_OLD + 2 lies inside them
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    at_timestamp_lease(store, T_OLD + 2)
    worker, sink = run_worker(fake, store, tmp_path, policy)
    code = worker.run()
    (gap,) = store.list_gaps()
    assert (gap.shard_id, gap.policy, gap.last_checkpoint) == ("shardId-A", policy, f"AT_TIMESTAMP:{int(T_OLD + 2)}")
    assert gap.first_position_after == seq(1, 4)
    delivered = [e.sequence_number for e in sink.written]
    if policy == "fail":
        assert code == 1 and delivered == []
        assert store.list_leases()[0].checkpoint == f"AT_TIMESTAMP:{int(T_OLD + 2)}"
    else:
        assert code == 0 and delivered == [seq(1, 4), seq(1, 5)]
        assert store.list_leases()[0].checkpoint == SHARD_END


def test_an_at_timestamp_checkpoint_whose_records_are_all_readable_is_no_gap(tmp_path):
    """The trimmed records are all older than t (the first readable record was created before t):
    every record from t on is read and nothing is recorded."""
    fake = FakeStreams()
    fake.add_shard("shardId-A", timed_recs(6, T_OLD), closed=True)
    fake.trim_head("shardId-A", 2)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    at_timestamp_lease(store, T_OLD + 3)
    worker, sink = run_worker(fake, store, tmp_path, "fail")
    assert worker.run() == 0
    assert store.list_gaps() == []
    assert [e.sequence_number for e in sink.written] == [seq(1, 3), seq(1, 4), seq(1, 5)]


@pytest.mark.parametrize("starting_known", [True, False])
def test_an_at_timestamp_checkpoint_whose_first_record_is_the_shards_first(tmp_path, starting_known):
    """Every record of the shard was created after t and none was trimmed. With the shard's
    StartingSequenceNumber in the lease (LATEST leases record it) the first record read is seen to
    be the shard's first: no gap. Without it (a lease written before they did), nothing proves
    that the head was not trimmed, and the shard is older than 24 h: a gap is recorded — the
    documented false positive of an ``AT_TIMESTAMP:`` checkpoint left unread for over 24 h."""
    from pipeline.checkpoint import AT_TIMESTAMP_PREFIX, Lease, lease_key_for

    fake = FakeStreams()
    fake.add_shard("shardId-A", timed_recs(3, T_OLD), closed=True)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    store.create_lease_if_absent(Lease(lease_key=lease_key_for("orders", STREAM_ARN, "shardId-A"), table="orders",
                                       stream_arn=STREAM_ARN, shard_id="shardId-A",
                                       checkpoint=f"{AT_TIMESTAMP_PREFIX}{int(T_OLD) - 100}",
                                       starting_sequence_number=seq(1, 0) if starting_known else None))
    worker, sink = run_worker(fake, store, tmp_path, "skip")
    assert worker.run() == 0
    assert [e.sequence_number for e in sink.written] == [seq(1, 0), seq(1, 1), seq(1, 2)]
    assert len(store.list_gaps()) == (0 if starting_known else 1)


def test_a_latest_lease_records_its_shards_starting_sequence_number(tmp_path):
    from pipeline.events import LATEST
    from pipeline.runtime.leases import LeaseCoordinator
    from pipeline.source import ShardInfo

    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    coordinator = LeaseCoordinator(store, worker_id="w", stream_arns=[STREAM_ARN], failover_time_s=1,
                                   logger=structlog.get_logger())
    (lease,) = coordinator.sync_shards("orders", STREAM_ARN, [ShardInfo("shardId-A", None, seq(1, 0), None)], LATEST)
    assert (lease.checkpoint, store.get_lease(lease.lease_key).starting_sequence_number) == (LATEST, seq(1, 0))
