"""The snapshot's pure parts: the version formula against the stream's, positions, LastEvaluatedKey
round trips, the audit key layout and the archive replay's reading of it, the RCU limiter."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from connectors.s3.audit import audit_object_key
from pipeline.codec import record_version
from pipeline.replay.archive import group_objects, order_shards, parse_object_key
from pipeline.snapshot.items import (key_from_json, key_to_json, parse_snapshot_shard_id, snapshot_event,
                                     snapshot_shard_id)
from pipeline.snapshot.plan import default_segments
from pipeline.snapshot.ratelimit import RcuLimiter
from pipeline.snapshot.version import snapshot_version

T0 = datetime(2026, 12, 3, 13, 0, 30, 400_000, tzinfo=timezone.utc)


def _minute(t: datetime) -> datetime:  # DynamoDB Local rounds ApproximateCreationDateTime to the minute
    return t.replace(second=0, microsecond=0)


@pytest.mark.parametrize("rounding", [lambda t: t.replace(microsecond=0), _minute])
def test_every_change_made_after_the_start_outranks_the_snapshot(rounding):
    v = snapshot_version(T0)
    for offset_s in (0, 0.5, 1, 29.6, 59, 61, 3600, 86400 * 3):
        t = T0 + timedelta(seconds=offset_s)
        for counter in ("00000000000000000000", "99999999999999999999", "4294967295"):
            assert record_version(rounding(t), "1" + counter) > v, (offset_s, counter)


def test_changes_more_than_the_margin_before_the_start_lose_to_it():
    v = snapshot_version(T0)
    for offset_s in (61.5, 120, 86400):
        t = (T0 - timedelta(seconds=offset_s)).replace(microsecond=0)
        assert record_version(t, "1" + "9" * 20) < v
    # a lineage floor only raises a stream version
    assert record_version(T0 - timedelta(hours=1), "100", floor=(v >> 32) + 1) > v


def test_the_margin_is_what_makes_minute_rounding_safe():
    """Without a margin, DynamoDB Local's minute rounding would let the snapshot beat a later change."""
    later = T0 + timedelta(seconds=5)
    assert record_version(_minute(later), "1" + "0" * 20) < snapshot_version(T0, margin_s=0)
    assert record_version(_minute(later), "1" + "0" * 20) > snapshot_version(T0)


def test_a_later_snapshot_has_a_higher_version_and_naive_times_are_utc():
    assert snapshot_version(T0 + timedelta(seconds=2)) > snapshot_version(T0)
    assert snapshot_version(T0.replace(tzinfo=None)) == snapshot_version(T0)
    with pytest.raises(ValueError):
        snapshot_version(T0, margin_s=-1)


def test_positions_and_keys():
    assert parse_snapshot_shard_id(snapshot_shard_id("20261203T130030Z-ab12cd", 7)) == ("20261203T130030Z-ab12cd", 7)
    assert parse_snapshot_shard_id("shardId-00000001414562045508-2bd5ba8e") is None
    lek = {"pk": {"S": "a|b"}, "sk": {"N": "-1.5E+3"}, "bin": {"B": b"\x00\xff"}}
    assert key_from_json(key_to_json(lek)) == lek
    assert key_from_json(key_to_json({"bin": {"B": "AP8="}})) == {"bin": {"B": b"\x00\xff"}}  # fast path: base64 text
    ev = snapshot_event({"pk": {"S": "u1"}, "sk": {"N": "2"}, "x": {"BOOL": True}}, key_names=("pk", "sk"), table="t",
                        snapshot_id="s1", segment=3, ordinal=12, read_at=T0, version=snapshot_version(T0))
    assert (ev.op, ev.before, ev.key_id, ev.source.shard_id, ev.sequence_number) == (
        "r", None, "u1|2", "snapshot-s1-seg00003", "00000000000000000012")


def test_audit_layout_and_archive_replay_of_snapshot_objects():
    sid = snapshot_shard_id("20261203T130030Z-ab12cd", 2)
    key = audit_object_key("audit", "orders", sid, "00000000000000000001", "00000000000000000500", T0)
    assert key == "audit/orders/snapshot=20261203T130030Z-ab12cd/seg00002/00000000000000000001-00000000000000000500.jsonl.gz"
    obj = parse_object_key(key, "audit")
    assert obj is not None and obj.shard_id == sid and obj.table == "orders" and obj.day is None
    stream = parse_object_key("audit/orders/dt=2026-12-03/shardId-1/100-200.jsonl.gz", "audit")
    ordered = order_shards(group_objects([stream, obj]))
    assert [s.shard_id for s in ordered] == [sid, "shardId-1"], "snapshot segments before stream shards"


def test_default_segments():
    assert default_segments(10 * 1024, item_count=50) == 1
    assert default_segments(0, item_count=10_000) == 4
    assert default_segments(7 * (1 << 30) + 1, item_count=10**7) == 8
    assert default_segments(10**15, item_count=10**10) == 16


def test_limiter_debt_and_slow_down():
    now = [0.0]
    lim = RcuLimiter(10.0, segments=2, clock=lambda: now[0])
    assert lim.wait_s() == 0
    lim.spend(30.0, items=60)  # 10 of burst, 20 of debt
    assert lim.wait_s() == pytest.approx(2.0)
    now[0] = 2.0
    assert lim.wait_s() == pytest.approx(0.0)
    assert lim.page_limit() == int(10 * 0.5 / 2 / 0.5)  # 2.5 RCU per page at 0.5 RCU per item
    lim.slow_down(0.1)
    assert lim.rate == pytest.approx(1.0)
    lim.spend(1.0)
    assert lim.wait_s() == pytest.approx(1.0)
    assert RcuLimiter(0).page_limit() is None and RcuLimiter(None).wait_s() == 0


def test_initial_snapshot_decision(tmp_path):
    import structlog

    from connectors.snapshot.initial import InitialSnapshot
    from connectors.sqlite_store import SQLiteLeaseStore
    from pipeline.checkpoint import Lease

    log = structlog.get_logger()

    def make(store, owner):
        return InitialSnapshot(None, table="orders", lease_store=store, owner=owner, logger=log, stopping=lambda: False)

    fresh = SQLiteLeaseStore(tmp_path / "a.sqlite")
    fresh.ensure_table()
    fresh.create_lease_if_absent(Lease(lease_key="orders:l:s1", table="orders", stream_arn="a/l", shard_id="s1",
                                       checkpoint="LATEST"))
    first = make(fresh, "w1")
    assert first.decide() and first.state == "waiting"  # no checkpoint yet: a first start
    claim = fresh.in_namespace("snapshot").get_lease("orders:initial")
    assert claim is not None and claim.owner == "w1"
    assert make(fresh, "w2").decide(), "another worker of the group sees the unfinished claim"
    fresh.in_namespace("snapshot").checkpoint(claim, '{"state": "done"}')
    assert not make(fresh, "w3").decide(), "done: never again"

    running = SQLiteLeaseStore(tmp_path / "b.sqlite")
    running.ensure_table()
    running.create_lease_if_absent(Lease(lease_key="orders:l:s1", table="orders", stream_arn="a/l", shard_id="s1",
                                         checkpoint="000000000000000000123"))
    late = make(running, "w1")
    assert not late.decide() and late.state == "skipped", "a group with checkpoints is not snapshotted behind its back"
    assert running.in_namespace("snapshot").get_lease("orders:initial") is None
