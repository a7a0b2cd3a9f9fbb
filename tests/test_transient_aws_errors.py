"""Transient AWS errors (issue 13 item 9): a burst of 5xx / timeouts / reset connections on reads,
checkpoints, lease renewals and discovery does not stop the worker, changes nothing delivered,
is counted by operation and flips ``/readyz`` while it lasts; errors that cannot pass
(AccessDeniedException) still fail with one line.

The stream side is the streams API double with failure injection (tests/failure_injection.py);
the lease table side is the real DynamoDB Local lease table behind a client that injects failures,
so the connectors' real error mapping runs.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from typing import Any

import pytest
import structlog
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.sqlite_store import SQLiteLeaseStore
from tests import stacks
from failure_injection import (
    FailurePlan,
    FlakyClient,
    FlakyStreams,
    access_denied,
    connection_closed,
    internal_server_error,
    read_timeout,
    service_unavailable,
)
from pipeline.awsconfig import AwsConfig
from pipeline.checkpoint import Lease
from pipeline.errors import LeaseLostError, SourceError
from pipeline.events import SHARD_END
from pipeline.runtime.leases import LeaseCoordinator
from pipeline.testing import RecordingSink, make_stream_record
from pipeline.runtime.worker import Worker
from connectors.dynamodb_streams.testing import STREAM_ARN, seq
from tests.helpers import run_to_exit, wait_until

P = "shardId-00000001700000000000-0000000p"
C = "shardId-00000001700000100000-000000c1"
LOG = structlog.get_logger("test_transient_aws_errors")


def recs(shard_no: int, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        k = {"pk": f"item-{shard_no}-{i}"}
        out.append(make_stream_record(keys=k, new_image={**k, "n": Decimal(i)}, sequence_number=seq(shard_no, i)))
    return out


def stream(plan: FailurePlan) -> FlakyStreams:
    """A parent shard of 6 records and its child of 5 (both closed)."""
    fake = FlakyStreams(plan=plan)
    fake.add_shard(P, recs(1, 6))
    fake.add_shard(C, recs(2, 5), parent=P)
    return fake


EXPECTED = [seq(1, i) for i in range(6)] + [seq(2, i) for i in range(5)]


def worker_for(fake, store, sink, tmp_path, **kw) -> Worker:
    opts = dict(worker_id="w1", failover_time_s=1.5, discovery_interval_s=0.05, shutdown_grace_s=5.0,
                exit_when_idle=True)
    opts.update(kw)
    return stacks.make_worker(fake, tmp_path, sink, store=store, logger=LOG, fast_retries=True, **opts)


def sqlite_store(tmp_path) -> SQLiteLeaseStore:
    return stacks.sqlite_store(tmp_path / "l.sqlite")


def run(worker: Worker, timeout: float = 30.0) -> int:
    return run_to_exit(worker, timeout)


def delivered(sink: RecordingSink) -> list[str]:
    with sink._lock:
        return [e.sequence_number for e in sink.written]


def transient_count(operation: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("ddb_cdc_aws_transient_errors_total", {"operation": operation}) or 0.0


# ---------------------------------------------------------------------------------------------
# classification in one place


@pytest.mark.parametrize("exc, kind", [
    (ClientError({"Error": {"Code": "InternalServerError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetRecords"),
     "transient"),
    (ClientError({"Error": {"Code": "ServiceUnavailable"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Scan"),
     "transient"),
    (ClientError({"Error": {"Code": "SomethingNew"}, "ResponseMetadata": {"HTTPStatusCode": 502}}, "Scan"),
     "transient"),
    (ClientError({"Error": {"Code": "LimitExceededException"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                 "GetRecords"), "throttled"),
    (ClientError({"Error": {"Code": "AccessDeniedException"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                 "GetRecords"), "permanent"),
    (ClientError({"Error": {"Code": "ResourceNotFoundException"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                 "DescribeTable"), "permanent"),
    (ClientError({"Error": {"Code": "ValidationException"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                 "GetShardIterator"), "permanent"),
    (ReadTimeoutError(endpoint_url="http://x"), "transient"),
    (ConnectionClosedError(endpoint_url="http://x"), "transient"),
    (EndpointConnectionError(endpoint_url="http://x"), "transient"),
    (SSLError(endpoint_url="http://x", error="certificate verify failed"), "permanent"),
    (NoCredentialsError(), "permanent"),
    (ValueError("not an AWS error"), "permanent"),
])
def test_classify_maps_botocore_errors_to_transient_throttled_or_permanent(exc, kind):
    from connectors.dynamodb_streams.errors import classify

    assert classify(exc) == kind


# ---------------------------------------------------------------------------------------------
# the stream side


def test_a_burst_of_5xx_and_timeouts_on_reads_changes_nothing_delivered(tmp_path):
    """GetRecords and GetShardIterator fail with 500, 503, read timeouts and reset connections
    (after botocore's own attempts): the worker retries and delivers exactly what it delivers
    without the burst, in order, once, and exits 0; the failures are counted by operation."""
    clean_sink = RecordingSink("clean")
    assert run(worker_for(stream(FailurePlan()), sqlite_store(tmp_path / "a"), clean_sink, tmp_path / "a")) == 0
    assert delivered(clean_sink) == EXPECTED

    plan = FailurePlan()
    plan.fail("GetRecords", internal_server_error, times=1)
    plan.fail("GetRecords", read_timeout, times=1)
    plan.fail("GetRecords", connection_closed, times=1)
    plan.fail("GetShardIterator", service_unavailable, times=2)
    plan.fail("GetShardIterator", read_timeout, times=1)
    before = {op: transient_count(op) for op in ("get_records", "get_shard_iterator")}
    sink = RecordingSink("burst")
    worker = worker_for(stream(plan), sqlite_store(tmp_path / "b"), sink, tmp_path / "b")
    assert run(worker) == 0, worker.failed
    assert plan.raised("GetRecords") == 3 and plan.raised("GetShardIterator") == 3
    assert delivered(sink) == delivered(clean_sink) == EXPECTED  # nothing lost, nothing twice, same order
    assert transient_count("get_records") - before["get_records"] == 3
    assert transient_count("get_shard_iterator") - before["get_shard_iterator"] == 3
    leases = {lease.shard_id: lease.checkpoint for lease in worker.lease_store.list_leases()}
    assert leases == {P: SHARD_END, C: SHARD_END}


def test_discovery_failing_at_start_and_later_is_retried_while_leases_are_renewed(tmp_path):
    """DescribeStream fails for the first calls (the first discovery included, which used to be
    fatal) and again later: the worker keeps going and reads everything."""
    plan = FailurePlan()
    plan.fail("DescribeStream", service_unavailable, times=2)
    plan.fail("DescribeStream", connection_closed, times=1)
    before = transient_count("describe_stream")
    sink = RecordingSink()
    worker = worker_for(stream(plan), sqlite_store(tmp_path), sink, tmp_path)
    assert run(worker) == 0, worker.failed
    assert plan.raised("DescribeStream") == 3
    assert delivered(sink) == EXPECTED
    assert transient_count("describe_stream") - before == 3


def test_describe_table_at_start_retries_errors_that_pass():
    """Resolving the table's stream (DescribeTable) retries a 500 and a timeout, then succeeds."""
    plan = FailurePlan()
    plan.fail("DescribeTable", internal_server_error, times=1)
    plan.fail("DescribeTable", read_timeout, times=1)

    class Tables:
        def describe_table(self, TableName):
            return {"Table": {"LatestStreamArn": STREAM_ARN, "StreamSpecification": {"StreamEnabled": True}}}

    source = DynamoDBStreamSource(AwsConfig(), table="orders", dynamodb=FlakyClient(Tables(), plan),
                                  streams=FlakyStreams(plan=plan))
    assert source.stream_arn == STREAM_ARN and plan.raised("DescribeTable") == 2


def test_access_denied_on_reads_fails_the_shard_and_the_worker_with_one_line(tmp_path):
    plan = FailurePlan()
    plan.fail("GetRecords", access_denied)  # every call
    sink = RecordingSink()
    worker = worker_for(stream(plan), sqlite_store(tmp_path), sink, tmp_path)
    assert run(worker) == 1
    assert len(worker.failed) == 1
    shard, outcome, error = worker.failed[0]
    assert (shard, outcome) == (P, "failed")
    assert "AccessDeniedException" in error and "\n" not in error
    assert plan.raised("GetRecords") == 1  # not retried
    assert delivered(sink) == []


def test_access_denied_on_the_first_discovery_is_a_one_line_source_error(tmp_path):
    plan = FailurePlan()
    plan.fail("DescribeStream", access_denied)
    worker = worker_for(stream(plan), sqlite_store(tmp_path), RecordingSink(), tmp_path)
    with pytest.raises(SourceError) as info:
        worker.run()  # raises at once: the CLI prints it as one line and exits 1
    assert "AccessDeniedException" in str(info.value) and "\n" not in str(info.value)


def test_readyz_is_not_ready_during_a_long_burst_and_ready_again_after(tmp_path):
    """While GetRecords keeps failing longer than aws_unready_after_s, /readyz is 503 naming the
    dependency and ddb_cdc_aws_degraded is 1; once the calls pass again, 200 and 0, and the rest of
    the stream is delivered."""
    from pipeline.metrics import serve, track_worker

    plan = FailurePlan()
    fake = FlakyStreams(plan=plan)
    fake.add_shard(P, recs(1, 4), closed=False)
    sink = RecordingSink()
    worker = worker_for(fake, sqlite_store(tmp_path), sink, tmp_path, exit_when_idle=False,
                        aws_unready_after_s=0.3, failover_time_s=3.0)
    track_worker(worker)
    server = serve("127.0.0.1", 0, probe=lambda: worker)
    port = server.server_address[1]

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def degraded() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("ddb_cdc_aws_degraded ")))

    box: dict[str, int] = {}
    thread = threading.Thread(target=lambda: box.setdefault("code", worker.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: delivered(sink) == [seq(1, i) for i in range(4)], "the first records", timeout=10)
        wait_until(lambda: readyz()[0] == 200, "ready", timeout=10)
        outage = plan.fail("GetRecords", read_timeout)  # until stopped
        fake.append(P, recs(1, 7)[4:])
        wait_until(lambda: readyz()[0] == 503, "not ready during the outage", timeout=10)
        status, body = readyz()
        assert "dynamodb_streams failing" in body and "ReadTimeoutError" in body, body
        assert degraded() == 1.0
        assert delivered(sink) == [seq(1, i) for i in range(4)]
        outage.stop()
        wait_until(lambda: readyz()[0] == 200, "ready again after the outage", timeout=15)
        assert degraded() == 0.0
        wait_until(lambda: delivered(sink) == [seq(1, i) for i in range(7)], "the records after", timeout=15)
        assert outage.raised >= 1
    finally:
        worker.stop()
        thread.join(15)
        server.shutdown()
    assert box.get("code") == 0


# ---------------------------------------------------------------------------------------------
# the lease table side (real DynamoDB Local table, failing client)


@pytest.fixture
def ddb_store(dynamodb_local, aws_client):
    plan = FailurePlan()
    client = FlakyClient(aws_client("dynamodb", dynamodb_local.endpoint), plan)
    store = DynamoDBLeaseStore(AwsConfig(), f"leases-{uuid.uuid4().hex[:8]}", client=client)
    store.ensure_table()
    yield store, plan
    try:
        client._client.delete_table(TableName=store.table_name)
    except Exception:
        pass


def test_a_burst_on_checkpoints_and_renewals_changes_nothing_delivered(tmp_path, ddb_store):
    """UpdateItem (checkpoints, renewals, takes) and Scan fail with 500s, timeouts — one of which
    was applied before its response was lost — and reset connections: the worker keeps its
    leases, delivers everything once and checkpoints both shards to SHARD_END."""
    store, plan = ddb_store
    plan.fail("UpdateItem", internal_server_error, times=3)
    plan.fail("UpdateItem", read_timeout, times=1, after_call=True)  # landed, but no answer
    plan.fail("UpdateItem", connection_closed, times=2)
    plan.fail("Scan", service_unavailable, times=2)
    before = transient_count("checkpoint") + transient_count("lease_renew") + transient_count("lease_take")
    sink = RecordingSink()
    worker = worker_for(stream(FailurePlan()), store, sink, tmp_path, failover_time_s=3.0)
    assert run(worker, timeout=60) == 0, worker.failed
    assert plan.raised("UpdateItem") == 6 and plan.raised("Scan") == 2
    assert delivered(sink) == EXPECTED
    after = transient_count("checkpoint") + transient_count("lease_renew") + transient_count("lease_take")
    assert after - before == 6
    assert {lease.shard_id: lease.checkpoint for lease in store.list_leases()} == {P: SHARD_END, C: SHARD_END}


class FailingRenewals:
    """A lease store whose renewals (and, when asked, checkpoints) fail transiently."""

    def __init__(self, inner, plan: FailurePlan):
        self.inner, self.plan = inner, plan

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def renew_lease(self, lease, **kw):
        return self.plan.call("renew", lambda: self.inner.renew_lease(lease, **kw))

    def checkpoint(self, lease, checkpoint, *a, **kw):
        return self.plan.call("checkpoint", lambda: self.inner.checkpoint(lease, checkpoint, *a, **kw))


def _transient(op):
    from pipeline.errors import TransientCheckpointStoreError

    return TransientCheckpointStoreError(f"{op}: InternalServerError (HTTP 500) (injected)", operation=op)


def _coordinator(tmp_path, plan, clock, failover=1.0):
    store = FailingRenewals(sqlite_store(tmp_path), plan)
    lease = Lease(lease_key="orders:label:" + P, table="orders", stream_arn=STREAM_ARN, shard_id=P,
                  checkpoint="TRIM_HORIZON")
    store.create_lease_if_absent(lease)
    coordinator = LeaseCoordinator(store, worker_id="w1", stream_arns=[STREAM_ARN], failover_time_s=failover,
                                   logger=LOG, clock=clock)
    assert [taken.lease_key for taken in coordinator.acquire()] == [lease.lease_key]
    return coordinator, store, lease.lease_key


def test_a_failed_renewal_keeps_the_lease_until_it_would_have_expired_then_loses_it(tmp_path):
    now = [100.0]
    plan = FailurePlan()
    coordinator, store, key = _coordinator(tmp_path, plan, lambda: now[0], failover=1.0)
    token = coordinator.token(key)
    outage = plan.fail("renew", _transient)
    now[0] += 0.4
    assert coordinator.renew() == []  # a transient failure does not lose the lease ...
    assert coordinator.owns(key, token)
    now[0] += 0.4
    assert coordinator.renew() == [] and coordinator.owns(key, token)
    now[0] += 0.25  # ... but failover_time_s after the last successful write it is lost
    assert not coordinator.owns(key, token)  # even before the next renewal says so
    with pytest.raises(LeaseLostError, match="expired"):
        coordinator.checkpoint(key, seq(1, 0), token=token)  # never written as owner past expiry
    assert coordinator.get(key) is None and coordinator.renew() == []
    outage.stop()
    assert store.get_lease(key).checkpoint == "TRIM_HORIZON"


def test_renewals_failing_past_the_expiry_report_the_lease_lost(tmp_path):
    now = [100.0]
    plan = FailurePlan()
    coordinator, _store, key = _coordinator(tmp_path, plan, lambda: now[0], failover=1.0)
    plan.fail("renew", _transient)
    now[0] += 0.5
    assert coordinator.renew() == []
    now[0] += 0.6
    assert [lease.lease_key for lease in coordinator.renew()] == [key]
    assert coordinator.get(key) is None


def test_a_renewal_that_recovers_in_time_keeps_the_lease(tmp_path):
    now = [100.0]
    plan = FailurePlan()
    coordinator, _store, key = _coordinator(tmp_path, plan, lambda: now[0], failover=1.0)
    plan.fail("renew", _transient, times=2)
    for _ in range(3):
        now[0] += 0.4
        assert coordinator.renew() == []
    now[0] += 0.7  # 1.1 s after the failures began, 0.7 s after the renewal that passed
    assert coordinator.owns(key)


def test_a_checkpoint_that_fails_transiently_is_retried_and_written(tmp_path):
    plan = FailurePlan()
    coordinator, store, key = _coordinator(tmp_path, plan, time.monotonic, failover=5.0)
    plan.fail("checkpoint", _transient, times=3)
    coordinator.checkpoint(key, seq(1, 3), token=coordinator.token(key))
    assert plan.raised("checkpoint") == 3
    assert store.get_lease(key).checkpoint == seq(1, 3)


def test_a_checkpoint_failing_until_the_lease_expires_raises_lease_lost_and_writes_nothing(tmp_path):
    plan = FailurePlan()
    coordinator, store, key = _coordinator(tmp_path, plan, time.monotonic, failover=0.6)
    plan.fail("checkpoint", _transient)
    started = time.monotonic()
    with pytest.raises(LeaseLostError, match="expired"):
        coordinator.checkpoint(key, seq(1, 3), token=coordinator.token(key))
    assert time.monotonic() - started < 0.6 + 2.5  # at most one backoff step past the expiry
    assert coordinator.get(key) is None
    assert store.get_lease(key).checkpoint == "TRIM_HORIZON"


def test_a_conditional_failure_of_a_checkpoint_is_not_retried(tmp_path):
    plan = FailurePlan()
    coordinator, store, key = _coordinator(tmp_path, plan, time.monotonic, failover=5.0)
    token = coordinator.token(key)
    store.inner.take_lease(store.inner.get_lease(key), "w2")  # another worker took it
    with pytest.raises(LeaseLostError):
        coordinator.checkpoint(key, seq(1, 3), token=token)
    assert coordinator.get(key) is None
