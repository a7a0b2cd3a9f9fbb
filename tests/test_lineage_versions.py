"""Versions across shard splits, trimmed child heads, and the version migration rule.

DynamoDB Local never splits a shard, so the splits come from the DynamoDB Streams API double in
its real layout (connectors/dynamodb_streams/testing.py: per-shard prefixes and counters as in the API
reference's DescribeStream example, splits within the same second as changes). The versions go
through a real Worker into a real OpenSearch API (osmem-server) with external versioning: a newer
change that got a lower version would be refused there (409) and the document would keep the
old state — or a REMOVE would leave a ghost document.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from urllib.parse import quote

import orjson
import pytest
import structlog
from hypothesis import given, settings, strategies as st

from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.opensearch.sink import OpenSearchSink, document_id, restore_document
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.codec import VERSION_EPOCH_S, record_version
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.events import SHARD_END, TRIM_HORIZON
from pipeline.runtime.shard_consumer import ShardSettings
from pipeline.testing import RecordingSink, make_stream_record
from pipeline.runtime.worker import Worker
from tests import stacks
from tests.helpers import wait_until
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()


def change(name: str, pk: str, n: int, created: float) -> dict:
    image = {"pk": pk, "n": n}
    return make_stream_record(event_name=name, keys={"pk": pk},
                              new_image=None if name == "REMOVE" else image,
                              old_image=None if name == "INSERT" else {"pk": pk, "n": n - 1},
                              created=created)


def make_worker(fake: FakeStreams, path, sinks, worker_id: str = "w1", *, on_trimmed: str = "fail") -> Worker:
    return stacks.make_worker(fake, path.parent, sinks, worker_id=worker_id, store_path=path,
                              dead_letter=DirectoryDeadLetterQueue(path.parent / f"dlq-{worker_id}"),
                              logger=structlog.get_logger(), max_records=4, on_trimmed=on_trimmed)


def run_until(worker: Worker, predicate, what: str, timeout: float = 20.0) -> None:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(predicate, what, timeout=timeout)
    finally:
        worker.stop()
        thread.join(15)
    assert not thread.is_alive()


def hot_lineage(fake: FakeStreams, keys: list[str], *, generations: int, per_generation: int,
                rng: random.Random, same_second: bool = True) -> list[tuple[str, str, int]]:
    """Hot items changing in every generation of a chain of shards that splits within the same
    second (one child per split: a roll-over; the chain is what one item sees). Returns the
    changes as (operation, pk, n) in stream order; the last change of some items is a REMOVE."""
    shard = fake.open_shard(prefix=8204, counter=1_192_334)
    # the API reference's chain: 8204|…1192334 → 16837|…1135967 → 25746|…935255, then random ones
    layout = [(16837, 1_135_967), (25746, 935_255)]
    state = {pk: 0 for pk in keys}
    written: list[tuple[str, str, int]] = []
    second = T0
    for gen in range(generations):
        for _ in range(per_generation):
            pk = rng.choice(keys)
            if state[pk] < 0:
                continue
            name = "INSERT" if state[pk] == 0 else "MODIFY"
            state[pk] += 1
            fake.put(shard, change(name, pk, state[pk], second))
            written.append((name, pk, state[pk]))
        if gen == generations - 1:
            for pk in keys[: len(keys) // 3]:  # deletes in the last generation
                if state[pk] > 0:
                    fake.put(shard, change("REMOVE", pk, state[pk] + 1, second))
                    written.append(("REMOVE", pk, state[pk] + 1))
                    state[pk] = -1
            break
        prefix, counter = layout[gen] if gen < len(layout) else (None, None)
        fake.shards[shard].closed = True
        shard = fake.open_shard(parent=shard, prefix=prefix, counter=counter)
        if not same_second:
            second += 1
    return written


# -- the formula -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(seconds=st.integers(0, 2**31 - 3), counter=st.integers(0, 10**20 - 1), prefix=st.integers(0, 10**19),
       later=st.integers(0, 5))
def test_new_versions_are_above_the_old_formula_for_the_same_and_every_earlier_change(seconds, counter, prefix,
                                                                                      later):
    """Migration: an index written with the old formula (seconds << 32 | seq mod 2**32) accepts
    every new version, and never takes a new change for an old one."""
    def old(sec: int, sequence: str) -> int:
        return (sec << 32) | (int(sequence) & 0xFFFFFFFF)

    sequence = f"{prefix}{counter:020d}" if prefix else f"{counter:021d}"
    created = datetime.fromtimestamp(VERSION_EPOCH_S + seconds, tz=timezone.utc)
    new = record_version(created, sequence)
    assert new > old(seconds, sequence)  # the same change
    earlier = max(0, seconds - later)
    assert new > old(earlier, "9" * 40)  # any change of an earlier (or the same) second
    assert new < 2**63


def test_versions_rise_across_the_api_reference_example_chain():
    """The DescribeStream example's chain in one second: the old formula's low bits fall from
    8204|…1192334 to 16837|…1135967; with the lineage floor every child outranks its parent."""
    created = datetime.fromtimestamp(T0, tz=timezone.utc)
    parent = record_version(created, "820400000000000001192334")
    child = record_version(created, "1683700000000000001135967", floor=(parent >> 32) + 1)
    grandchild = record_version(created, "2574600000000000000935255", floor=(child >> 32) + 1)
    assert parent < child < grandchild


# -- through a real worker into OpenSearch -----------------------------------------------------

def get_source(url: str, index: str, pk: str) -> dict | None:
    req = urllib.request.Request(f"{url}/{index}/_doc/{quote(document_id(pk), safe='')}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return body["_source"] if body.get("found") else None


@pytest.mark.e2e
def test_changes_split_within_one_second_end_at_their_last_state_in_opensearch(tmp_path, opensearch_url):
    fake = FakeStreams(seed=7)
    rng = random.Random(7)
    keys = [f"hot-{i}" for i in range(6)]
    written = hot_lineage(fake, keys, generations=5, per_generation=14, rng=rng)
    recording = RecordingSink()
    search = OpenSearchSink("search", OpenSearchSink.Options(hosts=[opensearch_url], index="lv-{table}",
                                                             refresh=True, retry_backoff_s=0))
    worker = make_worker(fake, tmp_path / "leases.sqlite", [recording, search])
    run_until(worker, lambda: len(recording.written) == len(written), f"{len(written)} changes delivered")

    # versions rise for every item in stream (lineage) order
    last: dict[str, int] = {}
    for event in recording.written:
        assert event.version > last.get(event.key_id, -1), f"{event.key_id}: version fell at {event.sequence_number}"
        last[event.key_id] = event.version

    final: dict[str, tuple[str, int]] = {}
    for name, pk, n in written:
        final[pk] = (name, n)
    for pk in keys:
        source = get_source(opensearch_url, "lv-orders", pk)
        if pk not in final:
            assert source is None
        elif final[pk][0] == "REMOVE":
            assert source is None, f"{pk} was removed last but its document is still there: {source}"
        else:
            assert source is not None, f"{pk} missing"
            assert int(restore_document(source)["n"]) == final[pk][1], f"{pk} kept an older state"


def test_a_replay_after_the_parent_left_gives_the_same_versions(tmp_path):
    """Hand-offs and replays through the same lease table: the child's floor is stored with its
    first checkpoint, so reading it again after the parent's lease is gone gives the same versions."""
    fake = FakeStreams(seed=3)
    written = hot_lineage(fake, ["a", "b", "c"], generations=3, per_generation=8, rng=random.Random(3))
    path = tmp_path / "leases.sqlite"
    first = RecordingSink()
    run_until(make_worker(fake, path, [first]), lambda: len(first.written) == len(written), "first read")
    by_shard = {}
    for event in first.written:
        by_shard.setdefault(event.source.shard_id, []).append((event.sequence_number, event.version))
    chain = list(fake.shards)
    store = SQLiteLeaseStore(path)
    leases = {lease.shard_id: lease for lease in store.list_leases()}
    assert leases[chain[1]].version_floor and leases[chain[2]].version_floor > leases[chain[1]].version_floor

    # the root and the middle shard leave the stream (trimmed): their leases can be removed
    with fake._lock:
        for shard_id in chain[:2]:
            del fake.shards[shard_id]
    for shard_id in chain[:2]:
        store.delete_lease(store.get_lease(leases[shard_id].lease_key))
    last = store.get_lease(leases[chain[2]].lease_key)
    store.set_checkpoint(last, TRIM_HORIZON)  # read the last shard again from its start
    again = RecordingSink()
    run_until(make_worker(fake, path, [again], "w2"),
              lambda: len(again.written) == len(by_shard[chain[2]]), "second read")
    assert [(e.sequence_number, e.version) for e in again.written] == by_shard[chain[2]]


# -- a child trimmed before it was read ----------------------------------------------------------

@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_child_whose_head_was_trimmed_before_it_was_read_is_a_recorded_gap(tmp_path, policy):
    fake = FakeStreams(seed=11)
    parent = fake.open_shard()
    for i in range(3):
        fake.put(parent, change("INSERT", f"p{i}", 1, T0))
    path = tmp_path / "leases.sqlite"
    # the child is found (after the first sync: every record of it is asked for) while the parent
    # is still being read: park the parent with a failure until the child's head has been trimmed
    # (the worker is ~24 h behind on the parent)
    fake.fail_get_records(parent, 0, "ProvisionedThroughputExceededException", times=None)
    sink = RecordingSink()
    worker = make_worker(fake, path, [sink], on_trimmed=policy)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        store = SQLiteLeaseStore(path)
        wait_until(lambda: len(store.list_leases()) == 1, "the parent's lease created")
        # a head is trimmed only once it is older than the 24 h retention: a child made 25 h ago
        child = fake.split(parent, created_ms=int((time.time() - 25 * 3600) * 1000))[0]
        child_seqs = [fake.put(child, change("INSERT", f"c{i}", 1, T0 + 1)) for i in range(5)]
        wait_until(lambda: len(store.list_leases()) == 2, "both leases created")
        child_lease = next(lease for lease in store.list_leases() if lease.shard_id == child)
        assert child_lease.starting_sequence_number == child_seqs[0]
        fake.trim_head(child, 2)
        with fake._lock:
            fake._failures.clear()
        if policy == "skip":
            wait_until(lambda: len(sink.written) == 3 + 3, "parent and the rest of the child delivered")
            wait_until(lambda: store.get_lease(child_lease.lease_key).checkpoint == child_seqs[-1] or
                       store.get_lease(child_lease.lease_key).checkpoint == SHARD_END, "child checkpointed")
        else:
            wait_until(lambda: store.list_gaps(), "gap recorded")
    finally:
        worker.stop()
        thread.join(15)
    gaps = store.list_gaps()
    assert len(gaps) == 1
    assert gaps[0].shard_id == child and gaps[0].policy == policy
    assert gaps[0].first_position_after == child_seqs[2]
    delivered = {e.key_id for e in sink.written}
    assert {"c0", "c1"}.isdisjoint(delivered)  # trimmed: never seen, but never silently
    if policy == "fail":
        assert not {"c2", "c3", "c4"} & delivered  # the shard stopped at the gap
        assert store.get_lease(child_lease.lease_key).checkpoint == TRIM_HORIZON


def test_a_replay_in_its_own_namespace_from_inside_the_lineage_gives_the_live_versions(tmp_path):
    """`replay --from sequence` after the splits starts inside a child: the replay's leases take the
    live leases' floors, so the replayed versions equal the live ones (else a repair could not
    re-apply them and a replayed REMOVE could be older than the change it should remove)."""
    from pipeline.replay.stream import StartSpec, StreamReplay

    fake = FakeStreams(seed=5)
    written = hot_lineage(fake, ["a", "b", "c"], generations=4, per_generation=6, rng=random.Random(5))
    path = tmp_path / "leases.sqlite"
    live = RecordingSink()
    run_until(make_worker(fake, path, [live]), lambda: len(live.written) == len(written), "live read")
    chain = list(fake.shards)
    live_versions = {(e.source.shard_id, e.sequence_number): e.version for e in live.written}

    source = DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=fake)
    replayed = RecordingSink()

    def make_replay_worker(**kw):
        return Worker(sources=[source], sinks=[replayed], dead_letter=DirectoryDeadLetterQueue(tmp_path / "dlq-r"),
                      logger=structlog.get_logger(), exit_when_idle=True, discovery_interval_s=0.05,
                      failover_time_s=0.6, shutdown_grace_s=5,
                      shard_settings=ShardSettings(max_records_per_call=4, idle_interval_ms=5, checkpoint_interval_s=0),
                      **kw)

    start = fake.shards[chain[2]].seq_at(1)  # inside the third generation, all in one second
    replay = StreamReplay(sources=[source], store=SQLiteLeaseStore(path, namespace="replay-v"),
                          spec=StartSpec("sequence", sequences={chain[2]: start}), until=None, sink_names=["recording"],
                          replay_id="replay-v", make_worker=make_replay_worker, logger=structlog.get_logger(),
                          idle_reads=2)
    replay.prepare()
    replay.run()
    assert replayed.written, "the replay delivered nothing"
    assert {e.source.shard_id for e in replayed.written} <= set(chain[2:])
    for event in replayed.written:
        assert event.version == live_versions[(event.source.shard_id, event.sequence_number)]


def test_a_redriven_decode_entry_keeps_its_shards_version_floor(tmp_path):
    from pipeline.deadletter import decode_entry
    from pipeline.ops.redrive import redrive

    rec = change("MODIFY", "x", 2, T0)
    rec["dynamodb"]["SequenceNumber"] = "1683700000000000001135967"
    floor = record_version(datetime.fromtimestamp(T0, tz=timezone.utc), "1") >> 32
    floor += 3  # a child shard whose split was in this second
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    dlq.put(decode_entry(rec, table="orders", stream_arn=STREAM_ARN, shard_id="shardId-c",
                         sequence_number=rec["dynamodb"]["SequenceNumber"], error="was broken", version_floor=floor))
    sink = RecordingSink()
    report = redrive(dlq, {"recording": sink}, logger=structlog.get_logger())
    assert [r.status for r in report.results] == ["delivered"]
    assert sink.written[0].version >> 32 == floor


def test_a_young_child_whose_first_record_is_after_its_starting_number_is_no_gap(tmp_path):
    """A shard younger than the 24 h retention cannot have lost its head (its id carries its
    creation time): a first record above StartingSequenceNumber is how the service numbers
    records then, not a gap — the shard is read and nothing is recorded (no false stop)."""
    import time as _time

    fake = FakeStreams(seed=12)
    parent = fake.open_shard()
    fake.put(parent, change("INSERT", "p0", 1, T0))
    fake.shards[parent].closed = True
    child = fake.open_shard(parent=parent, created_ms=int(_time.time() * 1000))
    child_seqs = [fake.put(child, change("INSERT", f"c{i}", 1, T0 + 1)) for i in range(3)]
    path = tmp_path / "leases.sqlite"
    fake.fail_get_records(parent, 0, "ProvisionedThroughputExceededException", times=None)
    sink = RecordingSink()
    worker = make_worker(fake, path, [sink], on_trimmed="fail")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        store = SQLiteLeaseStore(path)
        wait_until(lambda: len(store.list_leases()) == 2, "both leases created")
        fake.trim_head(child, 1)  # the first record the worker sees is above StartingSequenceNumber
        with fake._lock:
            fake._failures.clear()
        wait_until(lambda: {"c1", "c2"} <= {e.key_id for e in sink.written}, "the child read")
    finally:
        worker.stop()
        thread.join(15)
    assert store.list_gaps() == [] and worker.failed == []
    assert child_seqs[0] not in {e.sequence_number for e in sink.written}


def test_a_parents_dead_lettered_last_record_redriven_later_stays_below_the_childs_changes(tmp_path, monkeypatch):
    """The parent's last record fails to decode at read time (a decoder bug an upgrade fixes) and
    is dead-lettered; the item's next change is in the child, in the same second, with a lower
    record counter. The parent's highest high part (versionHigh, the child's floor) must count the
    dead-lettered record, so that redriving it later cannot give the OLD change a version above the
    child's newer change (OpenSearch would then keep, or re-create, the old state)."""
    from pipeline.errors import DecodeError
    from pipeline.ops.redrive import redrive
    from pipeline.runtime import shard_consumer

    fake = FakeStreams(seed=13)
    parent = fake.open_shard(prefix=8204, counter=1_192_334)  # the API reference's chain
    fake.put(parent, change("INSERT", "x", 1, T0))
    bad_seq = fake.put(parent, change("MODIFY", "x", 2, T0 + 5))
    fake.shards[parent].closed = True
    child = fake.open_shard(parent=parent, prefix=16837, counter=1_135_967)
    fake.put(child, change("MODIFY", "x", 3, T0 + 5))

    real_decode = shard_consumer.decode_record

    def decode_with_a_bug(record, **kw):
        if record["dynamodb"]["SequenceNumber"] == bad_seq:
            raise DecodeError("a decoder bug, fixed by the next release")
        return real_decode(record, **kw)

    monkeypatch.setattr(shard_consumer, "decode_record", decode_with_a_bug)
    path = tmp_path / "leases.sqlite"
    live = RecordingSink()
    run_until(make_worker(fake, path, [live]), lambda: len(live.written) == 2, "x v1 and x v3 delivered")
    assert bad_seq not in {e.sequence_number for e in live.written}
    child_change = live.written[1]
    assert child_change.source.shard_id == child

    monkeypatch.setattr(shard_consumer, "decode_record", real_decode)  # the upgrade
    redriven = RecordingSink()
    report = redrive(DirectoryDeadLetterQueue(tmp_path / "dlq-w1"), {"recording": redriven},
                     logger=structlog.get_logger())
    assert [r.status for r in report.results] == ["delivered"]
    (old_change,) = redriven.written
    assert old_change.sequence_number == bad_seq
    assert old_change.version < child_change.version, "the redriven parent change outranks the child's newer one"
