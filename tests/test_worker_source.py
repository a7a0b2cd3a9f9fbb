"""The real Worker + DynamoDBStreamSource + SQLite lease store, driven through a test double at the
DynamoDB Streams API boundary (connectors/dynamodb_streams/testing.py) for what DynamoDB Local cannot produce:
shard lineage, late children, trimmed data, expired iterators; and a real botocore client against
a tiny local HTTP server for throttling and 5xx (retried by botocore's standard retry mode)."""

from __future__ import annotations

import collections
import http.server
import json
import re
import threading
import time
from decimal import Decimal
from typing import Any

import pytest

from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.awsconfig import AwsConfig
from pipeline.codec import decode_record
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.errors import FatalSinkError, SourceError
from pipeline.events import SHARD_END, TRIM_HORIZON
from pipeline.runtime.lanes import LaneSettings  # noqa: F401 (tests pass lane_settings)
from pipeline.source import IteratorExpiredError, TrimmedDataError
from pipeline.testing import RecordingSink, make_stream_record
from pipeline.runtime.worker import Worker
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq
from tests import stacks
from tests.helpers import wait_until as _wait_until
from tests.stacks import Running, run_to_idle
from tests.test_hostile_records import ImageReadingSink

# shard ids in DynamoDB Streams' format
P = "shardId-00000001700000000000-0000000p"
C1 = "shardId-00000001700000100000-000000c1"
C2 = "shardId-00000001700000100000-000000c2"
Q = "shardId-00000001700000000000-0000000q"
Q1 = "shardId-00000001700000200000-000000q1"


def wait_until(predicate, what: str) -> None:
    """This module's polling bounds: 10.0 s, every 0.01 s."""
    _wait_until(predicate, what, timeout=10.0, interval=0.01)


def rec(shard_no: int, i: int, *, event_name: str = "INSERT") -> dict[str, Any]:
    k = {"pk": f"item-{shard_no}-{i}"}
    return make_stream_record(event_name=event_name, keys=k, new_image={**k, "n": Decimal(i), "b": b"\x01"},
                              sequence_number=seq(shard_no, i))


def recs(shard_no: int, n: int, start: int = 0) -> list[dict[str, Any]]:
    return [rec(shard_no, i) for i in range(start, start + n)]


def seqs_of(records) -> list[str]:
    return [r["dynamodb"]["SequenceNumber"] for r in records]


def written_seqs(sink: RecordingSink) -> list[str]:
    with sink._lock:
        return [e.sequence_number for e in sink.written]




def make_worker(fake: FakeStreams, tmp_path, sink: RecordingSink, *, worker_id: str = "w1",
                exit_when_idle: bool = False, max_records: int = 2, checkpoint_interval_s: float = 0.0,
                discovery_interval_s: float = 0.05, lane_settings: dict | None = None) -> Worker:
    return stacks.make_worker(fake, tmp_path, sink, worker_id=worker_id, max_records=max_records,
                              checkpoint_interval_s=checkpoint_interval_s, discovery_interval_s=discovery_interval_s,
                              failover_time_s=0.3, fast_retries=True, exit_when_idle=exit_when_idle,
                              lane_settings=lane_settings)


def leases(tmp_path) -> dict:
    return {lease.shard_id: lease for lease in SQLiteLeaseStore(tmp_path / "l.sqlite").list_leases()}


def failures(worker: Worker) -> list[tuple[str, str]]:
    """(shard id, outcome) of every failure the worker reported."""
    return [(f[0], f[1]) for f in worker.failed]


def iterator_calls(fake: FakeStreams, shard_id: str) -> list[tuple[str, str | None]]:
    return [(c["ShardIteratorType"], c["SequenceNumber"]) for c in fake.calls_of("GetShardIterator")
            if c["ShardId"] == shard_id]


# ---------------------------------------------------------------------------------------------
# lineage


def test_children_are_read_only_after_their_parent_reached_shard_end(tmp_path):
    fake = FakeStreams(page_size=2, get_records_delay_s=0.005)
    # children listed before their parent on purpose; 5 shards over 3 DescribeStream pages
    fake.add_shard(C1, recs(2, 3), parent=P)
    fake.add_shard(P, recs(1, 7))
    fake.add_shard(C2, recs(3, 3), parent=P)
    fake.add_shard(Q, recs(4, 5))
    late = fake.add_shard(Q1, recs(5, 3), parent=Q, visible_after=10**9)  # appears later
    all_seqs = {s: seqs_of(fake.shards[s].records) for s in (P, C1, C2, Q, Q1)}

    sink = RecordingSink()
    running = Running(make_worker(fake, tmp_path, sink, max_records=2))
    wait_until(lambda: leases(tmp_path).get(Q) is not None and leases(tmp_path)[Q].checkpoint == SHARD_END,
               "Q read to SHARD_END")
    assert Q1 not in leases(tmp_path)
    with fake._lock:
        late.visible_after = fake.listings + 1  # the next DescribeStream lists Q's child
    expected = sum(all_seqs.values(), [])
    wait_until(lambda: len(written_seqs(sink)) >= len(expected)
               and len(leases(tmp_path)) == 5
               and all(lease.checkpoint == SHARD_END for lease in leases(tmp_path).values()),
               "every record delivered and every lease at SHARD_END")
    time.sleep(0.1)  # let any stray duplicate arrive before asserting
    assert running.stop() == 0

    written = written_seqs(sink)
    counts = collections.Counter(written)
    assert sorted(counts) == sorted(expected)
    assert [s for s, n in counts.items() if n > 1] == []
    position = {s: i for i, s in enumerate(written)}
    for parent, children in ((P, (C1, C2)), (Q, (Q1,))):
        last_parent = max(position[s] for s in all_seqs[parent])
        for child in children:
            assert min(position[s] for s in all_seqs[child]) > last_parent, f"{child} read before {parent} ended"
    for shard, shard_seqs in all_seqs.items():  # per shard in sequence order
        assert [s for s in written if s in set(shard_seqs)] == shard_seqs

    stored = leases(tmp_path)
    assert set(stored) == {P, C1, C2, Q, Q1}
    assert all(lease.checkpoint == SHARD_END and lease.owner is None for lease in stored.values())
    assert stored[C1].parent_shard_ids == (P,) and stored[Q1].parent_shard_ids == (Q,)
    # discovery really followed the pages
    starts = [c["ExclusiveStartShardId"] for c in fake.calls_of("DescribeStream")]
    assert P in starts and Q in starts  # pages [C1, P], [C2, Q], [Q1]
    assert starts.count(None) >= 2  # re-discovered


def test_closed_shard_without_children_is_read_to_end_and_stays_finished(tmp_path):
    S, O = "shardId-closed-alone", "shardId-open"
    fake = FakeStreams()
    fake.add_shard(S, recs(1, 5), closed=True)
    fake.add_shard(O, recs(2, 2), closed=False)

    sink1 = RecordingSink()
    running = Running(make_worker(fake, tmp_path, sink1))
    wait_until(lambda: len(written_seqs(sink1)) == 7 and leases(tmp_path).get(S) is not None
               and leases(tmp_path)[S].checkpoint == SHARD_END, "S read to its end")
    assert running.stop() == 0
    assert sorted(written_seqs(sink1)) == sorted(seqs_of(fake.shards[S].records) + seqs_of(fake.shards[O].records))
    assert leases(tmp_path)[S].checkpoint == SHARD_END
    assert leases(tmp_path)[O].checkpoint == seq(2, 1)

    # a later run: S is still finished, not read again; O goes on
    calls_before = len(fake.calls)
    fake.append(O, [rec(2, 2)])
    sink2 = RecordingSink()
    running = Running(make_worker(fake, tmp_path, sink2, worker_id="w2"))
    wait_until(lambda: seq(2, 2) in written_seqs(sink2), "the new record of O")
    time.sleep(0.1)
    assert running.stop() == 0
    assert written_seqs(sink2) == [seq(2, 2)]
    assert leases(tmp_path)[S].checkpoint == SHARD_END
    assert not any(kw.get("ShardId") == S for op, kw in fake.calls[calls_before:] if op == "GetShardIterator")


def test_parent_absent_from_the_stream_does_not_block_its_child(tmp_path):
    child = "shardId-child-of-trimmed"
    fake = FakeStreams()
    fake.add_shard(child, recs(2, 3), parent="shardId-trimmed-away-long-ago")
    sink = RecordingSink()
    assert run_to_idle(make_worker(fake, tmp_path, sink, exit_when_idle=True)) == 0
    assert written_seqs(sink) == seqs_of(fake.shards[child].records)
    assert leases(tmp_path)[child].checkpoint == SHARD_END


# ---------------------------------------------------------------------------------------------
# iterators and trimmed data


def test_expired_iterator_is_replaced_after_the_last_processed_record(tmp_path):
    X = "shardId-expiring"
    fake = FakeStreams()
    fake.add_shard(X, recs(1, 7))
    fake.fail_get_records(X, 2, "ExpiredIteratorException", message="Iterator expired")
    fake.fail_get_records(X, 4, "ExpiredIteratorException", times=2, message="Iterator expired")
    sink = RecordingSink()
    # no checkpoint before SHARD_END: the new iterator must come from what was processed, not the checkpoint
    assert run_to_idle(make_worker(fake, tmp_path, sink, exit_when_idle=True, max_records=2,
                                   checkpoint_interval_s=3600)) == 0

    assert iterator_calls(fake, X) == [
        ("TRIM_HORIZON", None),
        ("AFTER_SEQUENCE_NUMBER", seq(1, 1)),  # last record of the first batch
        ("AFTER_SEQUENCE_NUMBER", seq(1, 3)),
        ("AFTER_SEQUENCE_NUMBER", seq(1, 3)),  # expired twice at the same place
    ]
    assert written_seqs(sink) == seqs_of(fake.shards[X].records)  # none lost, none twice
    assert leases(tmp_path)[X].checkpoint == SHARD_END


def test_expired_iterator_before_any_record_restarts_from_the_checkpoint(tmp_path):
    X = "shardId-expiring-early"
    fake = FakeStreams()
    fake.add_shard(X, recs(1, 3))
    fake.fail_get_records(X, 0, "ExpiredIteratorException")
    sink = RecordingSink()
    assert run_to_idle(make_worker(fake, tmp_path, sink, exit_when_idle=True)) == 0
    assert iterator_calls(fake, X) == [("TRIM_HORIZON", None), ("TRIM_HORIZON", None)]
    assert written_seqs(sink) == seqs_of(fake.shards[X].records)


def test_trimmed_data_stops_the_shard_and_is_reported(tmp_path):
    T, OK = "shardId-with-a-gap", "shardId-healthy"
    fake = FakeStreams()
    fake.add_shard(T, recs(1, 6))
    fake.fail_get_records(T, 3, "TrimmedDataAccessException", times=None,
                          message="Attempted to access data that has been trimmed")
    fake.add_shard(OK, recs(2, 2), closed=False)
    sink = RecordingSink()
    worker = make_worker(fake, tmp_path, sink, max_records=3)
    running = Running(worker)
    wait_until(lambda: worker.failed != [], "the trimmed shard reported")
    # the rest of the worker keeps running: a new record on the healthy shard is delivered
    fake.append(OK, [rec(2, 2)])
    wait_until(lambda: seq(2, 2) in written_seqs(sink), "healthy shard keeps going")
    assert running.stop() == 1

    assert failures(worker) == [(T, "trimmed")]
    t_seqs = seqs_of(fake.shards[T].records)
    delivered = written_seqs(sink)
    assert [s for s in delivered if s in t_seqs] == t_seqs[:3]  # nothing after the gap
    assert leases(tmp_path)[T].checkpoint != SHARD_END
    assert leases(tmp_path)[T].checkpoint in ("TRIM_HORIZON", *t_seqs[:3])


def test_exit_when_idle_returns_1_after_a_trimmed_shard(tmp_path):
    T = "shardId-gap-in-finite-run"
    fake = FakeStreams()
    fake.add_shard(T, recs(1, 4))
    fake.fail_get_records(T, 2, "TrimmedDataAccessException", times=None)
    sink = RecordingSink()
    worker = make_worker(fake, tmp_path, sink, exit_when_idle=True)
    assert Running(worker).join(timeout=3) == 1
    assert failures(worker) == [(T, "trimmed")]
    assert written_seqs(sink) == [seq(1, 0), seq(1, 1)]


def test_trimmed_position_at_get_shard_iterator_is_reported(tmp_path):
    T = "shardId-behind-horizon"
    fake = FakeStreams()
    fake.add_shard(T, recs(1, 3))
    original = fake.get_shard_iterator

    def trimmed_iterator(**kwargs):
        original(**kwargs)  # recorded
        from connectors.dynamodb_streams.testing import client_error
        raise client_error("TrimmedDataAccessException", "behind the trim horizon", "GetShardIterator")

    fake.get_shard_iterator = trimmed_iterator
    sink = RecordingSink()
    worker = make_worker(fake, tmp_path, sink)
    running = Running(worker)
    wait_until(lambda: worker.failed != [], "the trimmed shard reported")
    assert running.stop() == 1
    assert failures(worker) == [(T, "trimmed")]
    assert written_seqs(sink) == []
    assert leases(tmp_path)[T].checkpoint == "TRIM_HORIZON"


def test_vanished_shard_with_a_checkpoint_is_reported_as_trimmed(tmp_path):
    V, W = "shardId-vanishes", "shardId-stays"
    fake = FakeStreams()
    fake.add_shard(V, recs(1, 2), closed=False)
    fake.add_shard(W, recs(2, 1), closed=False)
    sink1 = RecordingSink()
    running = Running(make_worker(fake, tmp_path, sink1))
    wait_until(lambda: len(written_seqs(sink1)) == 3 and leases(tmp_path)[V].checkpoint == seq(1, 1)
               and leases(tmp_path)[W].checkpoint == seq(2, 0), "first run checkpointed")
    assert running.stop() == 0

    # more than 24 h later: V was trimmed away from the stream, its lease is still there
    del fake.shards[V]
    sink2 = RecordingSink()
    worker = make_worker(fake, tmp_path, sink2, worker_id="w2")
    running = Running(worker)
    try:
        wait_until(lambda: worker.failed != [], "the vanished shard reported")
        assert failures(worker) == [(V, "trimmed")]
        fake.append(W, [rec(2, 1)])
        wait_until(lambda: seq(2, 1) in written_seqs(sink2), "the other shard keeps going")
    finally:
        code = running.stop()
    assert code == 1
    assert failures(worker) == [(V, "trimmed")]
    assert written_seqs(sink2) == [seq(2, 1)]


# ---------------------------------------------------------------------------------------------
# decode failures


def test_malformed_record_is_dead_lettered_and_the_shard_goes_on(tmp_path):
    D = "shardId-with-bad-records"
    bad1 = rec(1, 1)
    bad1["dynamodb"]["NewImage"]["n"] = {"N": "not-a-number"}
    bad3 = rec(1, 3, event_name="BOGUS")
    records = [rec(1, 0), bad1, rec(1, 2), bad3]
    fake = FakeStreams()
    fake.add_shard(D, records, closed=False)
    # bad1's image is decoded when a sink reads it (the lazy event, issue 16): this sink reads
    # every image, as the built-in sinks do, so bad1 is found inside write and dead-lettered
    sink = ImageReadingSink()
    running = Running(make_worker(fake, tmp_path, sink, max_records=3))  # batches: [0, bad1, 2], [bad3]
    wait_until(lambda: leases(tmp_path).get(D) is not None and leases(tmp_path)[D].checkpoint == seq(1, 3),
               "checkpoint past the last (malformed) record")
    assert running.stop() == 0

    assert written_seqs(sink) == [seq(1, 0), seq(1, 2)]
    assert [e.sequence_number for e in sink.flushed] == [seq(1, 0), seq(1, 2)]
    entries = {e.sequence_number: e for e in DirectoryDeadLetterQueue(tmp_path / "dlq").list()}
    assert set(entries) == {seq(1, 1), seq(1, 3)}
    e1, e3 = entries[seq(1, 1)], entries[seq(1, 3)]
    for entry in (e1, e3):
        assert entry.kind == "decode"
        assert entry.sink is None
        assert entry.shard_id == D and entry.stream_arn == STREAM_ARN
        assert entry.table == "orders"
    assert "not-a-number" in e1.error
    assert e1.raw_record["dynamodb"]["NewImage"]["n"] == {"N": "not-a-number"}
    assert e1.raw_record["dynamodb"]["SequenceNumber"] == seq(1, 1)
    assert e1.raw_record["dynamodb"]["NewImage"]["b"] == {"B": bad1["dynamodb"]["NewImage"]["b"]["B"]}
    assert e3.raw_record["eventName"] == "BOGUS" and "BOGUS" in e3.error

    # a restart neither re-delivers nor re-dead-letters anything
    sink2 = RecordingSink()
    running = Running(make_worker(fake, tmp_path, sink2, worker_id="w2"))
    fake.append(D, [rec(1, 4)])
    wait_until(lambda: seq(1, 4) in written_seqs(sink2), "new record after restart")
    assert running.stop() == 0
    assert written_seqs(sink2) == [seq(1, 4)]
    assert len(list(DirectoryDeadLetterQueue(tmp_path / "dlq").list())) == 2


# ---------------------------------------------------------------------------------------------
# restart


def test_restart_resumes_after_the_checkpoint_exactly_once(tmp_path):
    R = "shardId-restart"
    fake = FakeStreams()
    fake.add_shard(R, recs(1, 5), closed=False)
    sink1 = RecordingSink()
    running = Running(make_worker(fake, tmp_path, sink1, max_records=2, checkpoint_interval_s=0))
    wait_until(lambda: len(written_seqs(sink1)) == 5 and leases(tmp_path)[R].checkpoint == seq(1, 4),
               "first run read and checkpointed 5 records")
    assert running.stop() == 0
    lease = leases(tmp_path)[R]
    assert lease.owner is None and lease.checkpoint == seq(1, 4)

    fake.append(R, recs(1, 5, start=5), close=True)
    fake.fail_get_records(R, 5, "ExpiredIteratorException")  # the resumed iterator expires once
    calls_before = len(fake.calls)
    sink2 = RecordingSink()
    assert run_to_idle(make_worker(fake, tmp_path, sink2, worker_id="w2", exit_when_idle=True)) == 0
    assert written_seqs(sink1) == [seq(1, i) for i in range(5)]
    assert written_seqs(sink2) == [seq(1, i) for i in range(5, 10)]
    resumed = [(kw["ShardIteratorType"], kw["SequenceNumber"]) for op, kw in fake.calls[calls_before:]
               if op == "GetShardIterator"]
    assert resumed == [("AFTER_SEQUENCE_NUMBER", seq(1, 4))] * 2  # from the stored checkpoint, both times
    assert leases(tmp_path)[R].checkpoint == SHARD_END


def test_restart_after_a_failed_flush_redelivers_only_the_uncheckpointed_tail(tmp_path):
    R = "shardId-crashy"

    class FailingFlush(RecordingSink):
        """Flushes the first page, then the disk is gone: every later flush fails. (Per-sink lanes
        write and flush on the sink's own thread: its second write waits until the first flush
        returned, so that flush holds exactly the first page.)"""

        def __init__(self):
            super().__init__("recording")
            self.flushes = 0
            self.flushed_once = threading.Event()

        def write(self, batch):
            if self.written:
                assert self.flushed_once.wait(10)
            super().write(batch)

        def flush(self):
            self.flushes += 1
            if self.flushes >= 2:
                raise FatalSinkError("disk gone")
            super().flush()
            self.flushed_once.set()

    fake = FakeStreams()
    fake.add_shard(R, recs(1, 6))
    sink1 = FailingFlush()
    worker1 = make_worker(fake, tmp_path, sink1, max_records=2, checkpoint_interval_s=0,
                          lane_settings={"recording": LaneSettings(coalesce_max_records=1)})
    assert run_to_idle(worker1) == 1  # the shard failed at the second flush
    assert failures(worker1) == [(R, "failed")]
    checkpoint = leases(tmp_path)[R].checkpoint
    assert [e.sequence_number for e in sink1.flushed] == [seq(1, 0), seq(1, 1)]
    assert checkpoint in (TRIM_HORIZON, seq(1, 1))  # never past what was flushed
    covered = 0 if checkpoint == TRIM_HORIZON else 2

    sink2 = RecordingSink()
    assert run_to_idle(make_worker(fake, tmp_path, sink2, worker_id="w2", exit_when_idle=True)) == 0
    assert written_seqs(sink2) == [seq(1, i) for i in range(covered, 6)]
    twice = set(written_seqs(sink1)) & set(written_seqs(sink2))
    # exactly the written-but-not-checkpointed tail
    assert twice == set(written_seqs(sink1)) - {seq(1, i) for i in range(covered)}
    assert {seq(1, 2), seq(1, 3)} <= twice
    assert set(written_seqs(sink1)) | set(written_seqs(sink2)) == set(seqs_of(fake.shards[R].records))


def test_processes_opening_a_fresh_sqlite_file_at_once_all_succeed(tmp_path):
    errors: list[str] = []
    for trial in range(300):
        path = tmp_path / f"fresh-{trial}.sqlite"
        barrier = threading.Barrier(4)

        def start_worker_store() -> None:  # what Worker.run does first
            store = SQLiteLeaseStore(path)
            barrier.wait()
            try:
                store.ensure_table()
                store.list_leases()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=start_worker_store) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        if errors:
            break
    assert errors == []


# ---------------------------------------------------------------------------------------------
# throttling and 5xx through a real botocore client


class _StreamsHTTP:
    """A tiny DynamoDB Streams JSON 1.0 endpoint on 127.0.0.1: GetRecords answers from ``script``."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append({"target": self.headers.get("X-Amz-Target"),
                                       "sdk": self.headers.get("amz-sdk-request"),
                                       "body": json.loads(body or b"{}")})
                status, payload = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-amzn-RequestId", f"req-{len(outer.requests)}")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def streams_http():
    servers: list[_StreamsHTTP] = []

    def start(script):
        server = _StreamsHTTP(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _attempt(request: dict) -> int:
    """The attempt number botocore's retry handler puts in the amz-sdk-request header."""
    return int(re.search(r"attempt=(\d+)", request["sdk"]).group(1))


def _error(code: str, message: str) -> dict:
    return {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}


def _ok_response() -> dict:
    return {"Records": [rec(1, 0), rec(1, 1, event_name="INSERT")], "NextShardIterator": "it-next"}


def _real_source(url: str, max_attempts: int = 5) -> DynamoDBStreamSource:
    aws = AwsConfig(region="us-east-1", access_key_id="testing", secret_access_key="testing",
                    streams_endpoint_url=url, max_attempts=max_attempts)
    return DynamoDBStreamSource(aws, stream_arn=STREAM_ARN)  # client from connectors.aws.make_client


@pytest.mark.parametrize("status,code", [(400, "LimitExceededException"), (500, "InternalServerError")])
def test_throttling_and_5xx_are_retried_by_botocore(aws_env, streams_http, status, code):
    server = streams_http([(status, _error(code, "throttled")), (status, _error(code, "throttled")),
                           (200, _ok_response())])
    source = _real_source(server.url)
    result = source.get_records("it-1", 100)  # one call of ours

    assert [r["dynamodb"]["SequenceNumber"] for r in result.records] == [seq(1, 0), seq(1, 1)]
    assert result.next_iterator == "it-next"
    event = decode_record(result.records[0], table="orders", stream_arn=STREAM_ARN, shard_id="s")
    assert event.after["b"] == b"\x01" and event.after["n"] == Decimal(0)
    # three HTTP requests, all the same GetRecords, numbered by botocore's retry handler
    assert len(server.requests) == 3
    assert {r["target"] for r in server.requests} == {"DynamoDBStreams_20120810.GetRecords"}
    assert all(r["body"] == {"ShardIterator": "it-1", "Limit": 100} for r in server.requests)
    assert [_attempt(r) for r in server.requests] == [1, 2, 3]


def test_throttling_beyond_max_attempts_is_a_source_error(aws_env, streams_http):
    server = streams_http([(400, _error("LimitExceededException", "throttled"))])
    source = _real_source(server.url, max_attempts=1)
    with pytest.raises(SourceError, match="LimitExceededException") as info:
        source.get_records("it-1", 100)
    assert not isinstance(info.value, (IteratorExpiredError, TrimmedDataError))
    # aws.max_attempts counts every request, the first included (botocore total_max_attempts)
    assert [_attempt(r) for r in server.requests] == [1]


@pytest.mark.parametrize("code,error_type", [("ExpiredIteratorException", IteratorExpiredError),
                                             ("TrimmedDataAccessException", TrimmedDataError)])
def test_stream_errors_are_mapped_and_not_retried(aws_env, streams_http, code, error_type):
    server = streams_http([(400, _error(code, "nope"))])
    source = _real_source(server.url)
    with pytest.raises(error_type):
        source.get_records("it-1", 100)
    assert len(server.requests) == 1
