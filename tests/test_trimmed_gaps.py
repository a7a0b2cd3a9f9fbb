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


def first_start_hours_ago(monkeypatch, hours: float) -> None:
    """Make the first sync's ``retainedSince`` that of a worker that first started ``hours`` ago
    (the catch-up of a parent took that long)."""
    import pipeline.runtime.leases as leases_module

    real = leases_module.first_sync_retained_since
    monkeypatch.setattr(leases_module, "first_sync_retained_since", lambda now_s: real(now_s - hours * 3600))


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_closed_child_whose_records_were_all_trimmed_is_a_recorded_gap(tmp_path, policy, monkeypatch):
    """TRIM_HORIZON of a closed shard whose every record was trimmed returns no record and SHARD_END:
    no first record to compare with StartingSequenceNumber. Reaching SHARD_END having read nothing
    of a shard that may be trimmed is the gap (old code: C ended silently, exit 0 under ``fail``).
    The worker first started 3 h ago (its first catch-up took that long): records retained then
    were lost."""
    first_start_hours_ago(monkeypatch, 3)
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
    # read and checked: the head check's StartingSequenceNumber is cleared with the SHARD_END checkpoint
    assert next(lease for lease in store.list_leases() if lease.shard_id == child).starting_sequence_number is None


def test_a_child_split_again_before_any_write_is_no_gap(tmp_path):
    """The double's own splits make shards as a live stream does, created now: a child that is
    split again before a change reached it (a split within a second of the last one) is read
    to SHARD_END with nothing in it and is no gap. On the double that dated every shard it opened
    to 2014 this was a false trimmed-data stop under ``fail`` (the chaos test's flake)."""
    fake = FakeStreams()
    fake.add_shard("shardId-R", recs(1, 0, 1), closed=True)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    first, first_sink = run_worker(fake, store, tmp_path, "fail")
    assert first.run() == 0  # the first sync; what follows is found later, read from its first record
    parent = fake.open_shard()
    fake.put(parent, make_stream_record(event_name="INSERT", keys={"pk": "p"}, new_image={"pk": "p"}))
    (child,) = fake.split(parent)
    (grandchild,) = fake.split(child)  # the child closes empty
    fake.put(grandchild, make_stream_record(event_name="MODIFY", keys={"pk": "p"}, new_image={"pk": "p"},
                                            old_image={"pk": "p"}))
    fake.shards[grandchild].closed = True
    worker, sink = run_worker(fake, store, tmp_path, "fail")
    assert worker.run() == 0
    assert store.list_gaps() == []
    assert {lease.shard_id: lease.checkpoint for lease in store.list_leases()} == {
        "shardId-R": SHARD_END, parent: SHARD_END, child: SHARD_END, grandchild: SHARD_END}
    assert [e.source.shard_id for e in first_sink.written + sink.written] == ["shardId-R", parent, grandchild]


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


# -- false gaps (review 13): nothing was lost, the shard must not stop ------------------------------

H = 3600


def child_stream(*, closed: bool = True, parent_age_h: int = 31, child_age_h: int = 30) -> tuple[FakeStreams, str]:
    """P (``parent_age_h`` old, 1 record, closed) → C (``child_age_h`` old, 4 records c0..c3 one
    hour apart, closed or open)."""
    import time as _time

    now = _time.time()
    fake = FakeStreams()
    parent = fake.open_shard(created_ms=int((now - parent_age_h * H) * 1000))
    fake.put(parent, make_stream_record(keys={"pk": "p0"}, new_image={"pk": "p0"}, created=now - parent_age_h * H))
    fake.shards[parent].closed = True
    child = fake.open_shard(parent=parent, created_ms=int((now - child_age_h * H) * 1000))
    for i in range(4):
        fake.put(child, make_stream_record(keys={"pk": f"c{i}"}, new_image={"pk": f"c{i}"},
                                           created=now - child_age_h * H + i * H))
    fake.shards[child].closed = closed
    return fake, child


def read_child_whose_head_is_trimmed_later(store, tmp_path) -> tuple[FakeStreams, str]:
    """:func:`child_stream`, read completely by a worker (under ``fail``); then C's two oldest
    records are trimmed (24 h later, as it were)."""
    fake, child = child_stream()
    worker, sink = run_worker(fake, store, tmp_path, "fail")
    assert worker.run() == 0 and [e.keys["pk"] for e in sink.written] == ["p0", "c0", "c1", "c2", "c3"]
    fake.trim_head(child, 2)
    return fake, child


def test_a_rewind_to_trim_horizon_of_a_child_read_before_is_no_gap(tmp_path):
    """`checkpoints set --to TRIM_HORIZON` of a child shard whose head was read (and checked) and
    trimmed since: TRIM_HORIZON asks for the oldest record retained, nothing was lost. Old code:
    the lease kept its startingSequenceNumber, the new reader checked the head again and stopped
    the shard with a gap (exit 1 under ``on_trimmed: fail``)."""
    from pipeline.ops.checkpoint_moves import move_lease

    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    fake, child = read_child_whose_head_is_trimmed_later(store, tmp_path)
    lease = next(lease for lease in store.list_leases() if lease.shard_id == child)
    assert move_lease(store, lease, "TRIM_HORIZON", requested_by="ops").how == "direct"
    worker, sink = run_worker(fake, store, tmp_path, "fail")
    assert worker.run() == 0
    assert store.list_gaps() == []
    assert [e.keys["pk"] for e in sink.written] == ["c2", "c3"]


def test_a_move_to_trim_horizon_applied_by_the_owner_is_no_gap(tmp_path):
    """The same rewind asked of an owned lease of an open child (a move request its owner applies
    at a batch boundary): no gap either (old code: the shard stopped, exit 1)."""
    from pipeline.events import TRIM_HORIZON
    from pipeline.ops.checkpoint_moves import move_lease
    from tests.helpers import wait_until
    from tests.stacks import Running

    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    fake, child = child_stream(closed=False)
    worker, sink = run_worker(fake, store, tmp_path, "fail", exit_when_idle=False)
    running = Running(worker)
    pks = lambda: [e.keys["pk"] for e in sink.written]  # noqa: E731
    lease_of_child = lambda: next(lease for lease in store.list_leases() if lease.shard_id == child)  # noqa: E731
    wait_until(lambda: pks() == ["p0", "c0", "c1", "c2", "c3"] and lease_of_child().checkpoint == fake.shards[child].seq_at(3),
               "C read and checkpointed")
    fake.trim_head(child, 2)
    lease = lease_of_child()
    assert lease.owner and move_lease(store, lease, TRIM_HORIZON, requested_by="ops").how == "requested"
    wait_until(lambda: pks()[5:] == ["c2", "c3"], "C read again from TRIM_HORIZON")
    assert running.stop() == 0
    assert store.list_gaps() == []


def test_a_childs_head_trimmed_before_the_first_start_is_no_gap(tmp_path):
    """First start (no lease yet, start_position TRIM_HORIZON): the child C of a listed parent lost
    its two oldest records to the 24 h retention long before this worker existed. Nothing was
    promised then: C's lease counts only records created after ``retainedSince`` (first sync − 24 h
    + 1 h). Old code: C was checked from its StartingSequenceNumber — a gap, exit 1 under ``fail``."""
    fake, child = child_stream(closed=False, parent_age_h=29, child_age_h=26)  # c2: 24 h old, c3: 23 h
    fake.trim_head(fake.shards[child].parent_shard_id, 1)
    fake.trim_head(child, 2)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    worker, sink = run_worker(fake, store, tmp_path, "fail", exit_when_idle=False)
    from tests.stacks import Running
    from tests.helpers import wait_until

    running = Running(worker)
    wait_until(lambda: [e.keys["pk"] for e in sink.written] == ["c2", "c3"], "C's retained records delivered")
    assert running.stop() == 0
    assert store.list_gaps() == []


def test_a_childs_head_trimmed_during_the_first_catch_up_is_a_gap(tmp_path, monkeypatch):
    """The other side of ``retainedSince``: the worker first started 3 h ago (its first sync's
    time, simulated) and C's oldest record — 25 h old now, 22 h old then: retained — was trimmed
    before the worker got to it: a gap, as before."""
    import time as _time

    first_start_hours_ago(monkeypatch, 3)
    now = _time.time()
    fake = FakeStreams()
    parent = fake.open_shard(created_ms=int((now - 27 * H) * 1000))
    fake.put(parent, make_stream_record(keys={"pk": "p0"}, new_image={"pk": "p0"}, created=now - 27 * H))
    fake.shards[parent].closed = True
    child = fake.open_shard(parent=parent, created_ms=int((now - 25 * H) * 1000))
    for i in range(3):
        fake.put(child, make_stream_record(keys={"pk": f"c{i}"}, new_image={"pk": f"c{i}"},
                                           created=now - 25 * H + i * 1800))
    fake.shards[child].closed = True
    fake.trim_head(child, 1)
    store = SQLiteLeaseStore(tmp_path / "l.sqlite")
    store.ensure_table()
    worker, sink = run_worker(fake, store, tmp_path, "fail")
    assert worker.run() == 1
    (gap,) = store.list_gaps()
    assert gap.shard_id == child and gap.first_position_after == fake.shards[child].seq_at(1)
