"""``dlq redrive``: re-delivery of dead-lettered entries against real servers (osmem, Redis).

Order under failure: a change dead-lettered by a sink and redriven after newer changes of the same
item were delivered never overwrites them (OpenSearch external versions), and the entry is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
import redis
import structlog
import yaml

from connectors.opensearch.sink import OpenSearchSink
from connectors.redis_cache import RedisCacheSink
from pipeline.codec import decode_record, record_sequence_number
from pipeline.deadletter import (
    DirectoryDeadLetterQueue,
    decode_entry,
    delivery_entry,
    jsonable,
    utc_now,
)
from pipeline.errors import PermanentSinkError
from pipeline.events import Batch
from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.ops.redrive import redrive, unjsonable
from pipeline.sink import Sink, SinkContext
from pipeline.testing import make_stream_record

ROOT = Path(__file__).resolve().parent.parent
TABLE = "Users"
STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/Users/stream/2024-05-01T00:00:00.000"
SHARD = "shardId-00000001714521600000-aaaaaaaa"
T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
LOG = structlog.get_logger()


def event(name: str, pk: str, seq: int, *, new=None, old=None, at: datetime = T0, shard: str = SHARD):
    record = make_stream_record(event_name=name, keys={"pk": pk}, new_image=new, old_image=old,
                                sequence_number=f"{seq:021d}", created=at)
    return decode_record(record, table=TABLE, stream_arn=STREAM_ARN, shard_id=shard)


def batch_of(*events) -> Batch:
    return Batch(table=TABLE, stream_arn=STREAM_ARN, shard_id=events[0].source.shard_id, events=tuple(events),
                 checkpoint_sequence_number=events[-1].sequence_number)


def dead_letter(dlq, ev, sink: str, error: str = "PermanentSinkError: boom") -> str:
    now = utc_now()
    return dlq.put(delivery_entry(ev, sink=sink, error=error, attempts=1, first_failure=now, last_failure=now))


def ctx(name: str) -> SinkContext:
    return SinkContext(sink_name=name, worker_id="test", logger=LOG)


def os_sink(url: str, name: str = "search") -> OpenSearchSink:
    return OpenSearchSink(name, OpenSearchSink.Options(hosts=[url], index="cdc-{table}", refresh=True,
                                                       mapping="dynamic", max_retries=0, retry_backoff_s=0))


def redis_sink(url: str, name: str = "cache", templates=("user:{pk}",)) -> RedisCacheSink:
    return RedisCacheSink(name, RedisCacheSink.Options(url=url, key_templates=list(templates), socket_timeout_s=2))


def get_doc(url: str, pk: str):
    from opensearchpy import OpenSearch
    from opensearchpy.exceptions import NotFoundError

    client = OpenSearch(hosts=[url])
    try:
        return client.get(index="cdc-users", id=pk)
    except NotFoundError:
        return None
    finally:
        client.close()


class FailingOnce(Sink):
    """Wraps a real sink; its first ``write`` raises PermanentSinkError (a dead-lettering sink)."""

    def __init__(self, inner: Sink):
        super().__init__(inner.name)
        self.inner = inner
        self.failures = 1

    def open(self, context):
        self.inner.open(context)

    def write(self, batch):
        if self.failures:
            self.failures -= 1
            raise PermanentSinkError("mapping refused (simulated)")
        self.inner.write(batch)

    def flush(self):
        self.inner.flush()

    def close(self):
        self.inner.close()


# --------------------------------------------------------------------------------------------
# OpenSearch: order under failure


def test_older_modify_redriven_after_newer_keeps_newer_doc_and_removes_entry(opensearch_url, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    v0 = {"pk": "k", "name": "v0"}
    v1 = {"pk": "k", "name": "v1"}
    v2 = {"pk": "k", "name": "v2"}
    ins = event("INSERT", "k", 100, new=v0, at=T0)
    mod1 = event("MODIFY", "k", 200, old=v0, new=v1, at=T0 + timedelta(seconds=1))
    mod2 = event("MODIFY", "k", 300, old=v1, new=v2, at=T0 + timedelta(seconds=2))
    assert ins.version < mod1.version < mod2.version

    wrapped = FailingOnce(os_sink(opensearch_url))
    fanout = FanOut([SinkRunner(wrapped, FailurePolicy(on_failure="dead_letter"))], dlq,
                    stop_event=threading.Event(), logger=LOG)
    wrapped.open(ctx("search"))
    wrapped.inner.write(batch_of(ins))
    fanout.deliver(batch_of(mod1))  # permanent failure → dead-lettered for sink "search"
    fanout.deliver(batch_of(mod2))  # delivered normally
    fanout.flush()
    wrapped.close()
    [entry] = list(dlq.list())
    assert entry.kind == "delivery" and entry.sink == "search" and entry.sequence_number == mod1.sequence_number
    assert get_doc(opensearch_url, "k")["_source"]["name"] == "v2"

    report = redrive(dlq, {"search": os_sink(opensearch_url)}, sink_filter=None, ids=None, logger=LOG)

    assert (report.delivered, report.kept, report.skipped, report.exit_code) == (1, 0, 0, 0)
    doc = get_doc(opensearch_url, "k")
    assert doc["_source"]["name"] == "v2" and doc["_version"] == mod2.version
    assert list(dlq.list()) == []  # a version conflict is delivered (idempotent): removed


def test_redriven_older_remove_does_not_delete_newer_insert(opensearch_url, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    old = {"pk": "k", "name": "old"}
    new = {"pk": "k", "name": "new"}
    sink = os_sink(opensearch_url)
    sink.open(ctx("search"))
    sink.write(batch_of(event("INSERT", "k", 100, new=old, at=T0)))
    remove = event("REMOVE", "k", 200, old=old, at=T0 + timedelta(seconds=1))
    dead_letter(dlq, remove, "search")  # the REMOVE could not be delivered
    reinsert = event("INSERT", "k", 300, new=new, at=T0 + timedelta(seconds=2))
    sink.write(batch_of(reinsert))
    sink.close()

    report = redrive(dlq, {"search": os_sink(opensearch_url)}, sink_filter=None, ids=None, logger=LOG)

    assert report.delivered == 1 and report.exit_code == 0
    doc = get_doc(opensearch_url, "k")
    assert doc is not None and doc["_source"]["name"] == "new" and doc["_version"] == reinsert.version
    assert list(dlq.list()) == []


def test_redrive_applies_a_sinks_entries_in_sequence_order(opensearch_url, tmp_path):
    """Two dead-lettered changes of one item (listed in id order, not sequence order) end as the newer."""
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    a = event("INSERT", "k", 9, new={"pk": "k", "name": "first"}, at=T0)
    b = event("MODIFY", "k", 10, new={"pk": "k", "name": "second"}, at=T0)
    dead_letter(dlq, a, "search")
    dead_letter(dlq, b, "search")
    report = redrive(dlq, {"search": os_sink(opensearch_url)}, sink_filter=None, ids=None, logger=LOG)
    assert report.delivered == 2
    assert [r.sequence_number for r in report.results] == [a.sequence_number, b.sequence_number]
    assert get_doc(opensearch_url, "k")["_source"]["name"] == "second"


# --------------------------------------------------------------------------------------------
# Redis


def _set_keys(url: str, *keys: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    for key in keys:
        client.set(key, "cached")
    return client


def test_redrive_to_redis_deletes_keys_and_removes_entry(redis_server, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    client = _set_keys(redis_server.url, "user:a", "user:b")
    ids = [dead_letter(dlq, event("MODIFY", pk, seq, new={"pk": pk}), "cache") for pk, seq in (("a", 1), ("b", 2))]

    report = redrive(dlq, {"cache": redis_sink(redis_server.url)}, sink_filter=None, ids=None, logger=LOG)

    assert (report.delivered, report.kept, report.exit_code) == (2, 0, 0)
    assert {r.entry_id for r in report.results} == set(ids)
    assert client.exists("user:a", "user:b") == 0
    assert list(dlq.list()) == []
    # idempotent: a second redrive finds nothing to do
    again = redrive(dlq, {"cache": redis_sink(redis_server.url)}, sink_filter=None, ids=None, logger=LOG)
    assert again.results == [] and again.exit_code == 0


def test_redrive_with_redis_down_keeps_entry_and_fails(redis_server, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    entry_id = dead_letter(dlq, event("MODIFY", "a", 1, new={"pk": "a"}), "cache")
    before = (tmp_path / "dlq" / f"{entry_id}.json").read_bytes()
    redis_server.stop()

    report = redrive(dlq, {"cache": redis_sink(redis_server.url)}, sink_filter=None, ids=None, logger=LOG)

    assert (report.delivered, report.kept, report.exit_code) == (0, 1, 1)
    assert "could not open" in report.results[0].reason
    assert (tmp_path / "dlq" / f"{entry_id}.json").read_bytes() == before  # not attempted: unchanged

    redis_server.start()
    client = _set_keys(redis_server.url, "user:a")
    report = redrive(dlq, {"cache": redis_sink(redis_server.url)}, sink_filter=None, ids=None, logger=LOG)
    assert report.exit_code == 0 and client.exists("user:a") == 0 and list(dlq.list()) == []


def test_failed_write_bumps_attempts_and_holds_newer_change_of_same_item(tmp_path):
    from pipeline.testing import RecordingSink

    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    old = dead_letter(dlq, event("MODIFY", "a", 1, new={"pk": "a"}), "rec")
    new = dead_letter(dlq, event("MODIFY", "a", 2, new={"pk": "a"}), "rec")
    other = dead_letter(dlq, event("MODIFY", "b", 3, new={"pk": "b"}), "rec")
    sink = RecordingSink("rec")
    sink.fail_next = [PermanentSinkError("still refused")]

    report = redrive(dlq, {"rec": sink}, sink_filter=None, ids=None, logger=LOG)

    results = report.by_id()
    assert results[old].status == "kept" and "still refused" in results[old].reason
    assert results[new].status == "kept" and "held back" in results[new].reason
    assert results[other].status == "delivered"
    assert [e.sequence_number for e in sink.flushed] == [f"{3:021d}"]
    assert dlq.get(old).attempts == 2 and "still refused" in dlq.get(old).error
    assert dlq.get(old).extra["first_error"] == "PermanentSinkError: boom"
    assert dlq.get(new).attempts == 1  # not attempted: unchanged
    assert dlq.get(other) is None and report.exit_code == 1


def test_sink_filter_id_and_dry_run(redis_server, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    client = _set_keys(redis_server.url, "user:a", "user:b", "user:c", "profile:a")
    a_cache = dead_letter(dlq, event("MODIFY", "a", 1, new={"pk": "a"}), "cache")
    b_cache = dead_letter(dlq, event("MODIFY", "b", 2, new={"pk": "b"}), "cache")
    c_cache = dead_letter(dlq, event("MODIFY", "c", 3, new={"pk": "c"}), "cache")
    a_profile = dead_letter(dlq, event("MODIFY", "a", 1, new={"pk": "a"}), "profiles")

    def sinks():
        return {"cache": redis_sink(redis_server.url),
                "profiles": redis_sink(redis_server.url, "profiles", ("profile:{pk}",))}

    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "dlq").iterdir()}
    dry = redrive(dlq, sinks(), sink_filter=None, ids=None, logger=LOG, dry_run=True)
    assert dry.would_deliver == 4 and dry.delivered == 0 and dry.exit_code == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "dlq").iterdir()} == snapshot
    assert client.exists("user:a", "user:b", "user:c", "profile:a") == 4

    by_id = redrive(dlq, sinks(), sink_filter=None, ids={b_cache, "no-such-entry"}, logger=LOG)
    assert by_id.by_id()[b_cache].status == "delivered" and by_id.by_id()["no-such-entry"].status == "missing"
    assert by_id.exit_code == 1  # an --id that does not exist
    assert client.exists("user:b") == 0 and client.exists("user:a", "user:c", "profile:a") == 3

    only_profiles = redrive(dlq, sinks(), sink_filter={"profiles"}, ids=None, logger=LOG)
    assert [r.entry_id for r in only_profiles.results] == [a_profile] and only_profiles.exit_code == 0
    assert client.exists("profile:a") == 0 and client.exists("user:a", "user:c") == 2
    assert {e.id for e in dlq.list()} == {a_cache, c_cache}


def test_entry_of_an_unconfigured_sink_is_skipped(redis_server, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    gone = dead_letter(dlq, event("MODIFY", "a", 1, new={"pk": "a"}), "removed-sink")
    report = redrive(dlq, {"cache": redis_sink(redis_server.url)}, sink_filter=None, ids=None, logger=LOG)
    assert report.skipped == 1 and "not configured" in report.results[0].reason
    assert dlq.get(gone) is not None and report.exit_code == 0


# --------------------------------------------------------------------------------------------
# decode entries


def test_unjsonable_inverts_jsonable_for_raw_records():
    raw = {"eventName": "INSERT", "dynamodb": {
        "ApproximateCreationDateTime": T0, "SequenceNumber": "000000000000000000007", "SizeBytes": 10,
        "Keys": {"pk": {"B": b"\x00\xffkey"}}, "NewImage": {"pk": {"B": b"\x00\xffkey"}, "n": {"N": "1.5"},
                                                           "l": {"L": [{"B": b"x"}]}}}}
    assert unjsonable(orjson.loads(orjson.dumps(jsonable(raw)))) == raw


def _decode_entry(raw, dlq) -> str:
    return dlq.put(decode_entry(jsonable(raw), table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD,
                                sequence_number=record_sequence_number(raw), error="DecodeError: bad"))


def test_fixed_decode_entry_is_delivered_and_broken_one_kept(redis_server, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    client = _set_keys(redis_server.url, "user:fixed", "user:broken")
    fixable = make_stream_record(event_name="MODIFY", keys={"pk": "fixed"}, new_image={"pk": "fixed"},
                                 sequence_number="000000000000000000011")
    fixable["dynamodb"]["NewImage"]["n"] = {"N": "not-a-number"}
    broken = make_stream_record(event_name="MODIFY", keys={"pk": "broken"}, sequence_number="000000000000000000012")
    broken["dynamodb"]["Keys"]["pk"] = {"Q": "broken"}
    # a boto3-shaped record: bytes and a datetime, stored through jsonable
    binary = make_stream_record(event_name="REMOVE", keys={"pk": "bin"}, sequence_number="000000000000000000013")
    binary["dynamodb"]["ApproximateCreationDateTime"] = T0
    binary["dynamodb"]["OldImage"] = {"pk": {"S": "bin"}, "blob": {"B": b"\x00\x01"}, "bad": {"X": 1}}
    for raw in (fixable, broken, binary):
        with pytest.raises(Exception):  # bad images are found at read time only when decoded eagerly
            decode_record(raw, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD, eager=True)
    fixed_id, broken_id, binary_id = (_decode_entry(r, dlq) for r in (fixable, broken, binary))

    # an operator fixes two records by editing the JSON files
    path = tmp_path / "dlq" / f"{fixed_id}.json"
    data = orjson.loads(path.read_bytes())
    data["raw_record"]["dynamodb"]["NewImage"]["n"] = {"N": "42"}
    path.write_bytes(orjson.dumps(data))
    path = tmp_path / "dlq" / f"{binary_id}.json"
    data = orjson.loads(path.read_bytes())
    assert data["raw_record"]["dynamodb"]["OldImage"]["blob"] == {"B": {"__bytes__": "AAE="}}
    del data["raw_record"]["dynamodb"]["OldImage"]["bad"]
    path.write_bytes(orjson.dumps(data))

    report = redrive(dlq, {"cache": redis_sink(redis_server.url)}, sink_filter=None, ids=None, logger=LOG)

    results = report.by_id()
    assert results[fixed_id].status == "delivered" and results[fixed_id].sinks == ("cache",)
    assert results[binary_id].status == "delivered"
    assert results[broken_id].status == "kept" and results[broken_id].reason.startswith("still undecodable: ")
    assert client.exists("user:fixed") == 0 and client.exists("user:broken") == 1
    assert {e.id for e in dlq.list()} == {broken_id}
    assert dlq.get(broken_id).attempts == 2 and report.exit_code == 1


def test_decode_entry_redriven_to_some_sinks_leaves_delivery_entries_for_others(redis_server, tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    raw = make_stream_record(event_name="MODIFY", keys={"pk": "a"}, new_image={"pk": "a"},
                             sequence_number="000000000000000000021")
    entry_id = _decode_entry(raw, dlq)
    report = redrive(dlq, {"cache": redis_sink(redis_server.url)}, sink_filter={"cache"}, ids=None, logger=LOG,
                     configured_sinks=["cache", "search"])
    assert report.delivered == 1 and "search" in report.results[0].reason
    [left] = list(dlq.list())
    assert left.id != entry_id and left.kind == "delivery" and left.sink == "search"
    assert left.sequence_number == "000000000000000000021"


# --------------------------------------------------------------------------------------------
# CLI end to end


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("DDB_CDC_")}
    return subprocess.run([sys.executable, "-m", "connectors.app.cli", *args], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=120)


def test_cli_dlq_list_and_redrive(redis_server, tmp_path):
    directory = tmp_path / "dlq"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"table": TABLE},
        "dead_letter": {"directory": str(directory)},
        "log": {"format": "json"},
        "sinks": [{"name": "cache", "type": "redis_cache",
                   "options": {"url": redis_server.url, "key_templates": ["user:{pk}"], "socket_timeout_s": 2}}],
    }))
    dlq = DirectoryDeadLetterQueue(directory)
    entry_id = dead_letter(dlq, event("MODIFY", "a", 1, new={"pk": "a"}), "cache")
    client = _set_keys(redis_server.url, "user:a")

    listed = run_cli("dlq", "list", "--config", str(config))
    assert listed.returncode == 0 and entry_id in listed.stdout

    dry = run_cli("dlq", "redrive", "--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert entry_id in dry.stdout and "would_deliver" in dry.stdout and "dry run: 1 would be delivered" in dry.stdout
    assert dlq.get(entry_id) is not None and client.exists("user:a") == 1

    bad = run_cli("dlq", "redrive", "--config", str(config), "--sink", "nope")
    assert bad.returncode == 2 and "'nope' is not a configured sink" in bad.stderr

    redis_server.stop()
    down = run_cli("dlq", "redrive", "--config", str(config))
    assert down.returncode == 1, down.stdout + down.stderr
    assert "redrive: 0 delivered, 1 kept, 0 skipped" in down.stdout
    assert dlq.get(entry_id) is not None
    redis_server.start()
    client = _set_keys(redis_server.url, "user:a")

    done = run_cli("dlq", "redrive", "--config", str(config), "--sink", "cache", "--id", entry_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "redrive: 1 delivered, 0 kept, 0 skipped" in done.stdout
    assert dlq.get(entry_id) is None and client.exists("user:a") == 0
