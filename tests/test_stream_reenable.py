"""A table's stream disabled and enabled again is followed (issue 13, item 6b), on DynamoDB Local.

DynamoDB Local behaves as DynamoDB does here (measured): ``UpdateTable StreamEnabled=false``
closes the stream (DescribeStream: ``StreamStatus`` DISABLED, the shard gets an
EndingSequenceNumber, its records stay readable) and keeps its ARN in ``LatestStreamArn`` without
a ``StreamSpecification``; enabling it again creates a new stream with a new ARN and label.

Before, the worker kept reading the old stream only: it idled "healthy" and never read the new
stream's records.
"""

from __future__ import annotations

import threading


from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline import metrics
from pipeline.awsconfig import AwsConfig
from pipeline.runtime.shard_consumer import ShardSettings
from pipeline.testing import RecordingSink
from pipeline.runtime.worker import Worker
from tests.helpers import EventLog, wait_until
from tests.stacks import make_worker


def _worker(aws, table, store_path, sink, log, tmp_path, start_position="LATEST") -> Worker:
    source = DynamoDBStreamSource(aws, table=table, read_path="boto3")
    return make_worker(source, tmp_path, sink, store=SQLiteLeaseStore(store_path), logger=log,
                       start_position=start_position, max_records=ShardSettings.max_records_per_call,
                       discovery_interval_s=0.2, failover_time_s=3)


def _put(client, table, keys):
    for k in keys:
        client.put_item(TableName=table, Item={"pk": {"S": k}})


def _keys(sink):
    return [e.keys["pk"] for e in sink.written]


def _run(worker):
    thread = threading.Thread(target=worker.run)
    thread.start()
    return thread


def test_a_re_enabled_stream_is_followed_after_the_old_one_ends(make_table, dynamodb_local, tmp_path, aws_env):
    client, table, old_arn = make_table("reenable")
    aws = AwsConfig(region="us-east-1", endpoint_url=dynamodb_local.endpoint)
    sink, log = RecordingSink(), EventLog()
    worker = _worker(aws, table, tmp_path / "l.sqlite", sink, log, tmp_path)
    thread = _run(worker)
    try:
        wait_until(lambda: log.named("latest_resolved"), "the LATEST start was made concrete", timeout=20)
        _put(client, table, ["a0", "a1", "a2"])
        wait_until(lambda: set(_keys(sink)) >= {"a0", "a1", "a2"}, "the old stream's records", timeout=20)
        client.update_table(TableName=table, StreamSpecification={"StreamEnabled": False})
        wait_until(lambda: log.named("stream_disabled"), "stream_disabled logged", timeout=20)
        assert metrics.STREAM_ENABLED.labels(table=table)._value.get() == 0
        client.update_table(TableName=table,
                            StreamSpecification={"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"})
        new_arn = client.describe_table(TableName=table)["Table"]["LatestStreamArn"]
        assert new_arn != old_arn
        # written before the worker can have noticed: the new stream starts at TRIM_HORIZON
        _put(client, table, ["b0", "b1"])
        wait_until(lambda: set(_keys(sink)) >= {"b0", "b1"}, "the new stream's records", timeout=20)
        _put(client, table, ["b2"])
        wait_until(lambda: "b2" in _keys(sink), "a later record of the new stream", timeout=20)
    finally:
        worker.stop()
        thread.join(15)
    keys = _keys(sink)
    assert max(keys.index(k) for k in ("a0", "a1", "a2")) < min(keys.index(k) for k in ("b0", "b1", "b2"))
    assert {e.source.stream_arn for e in sink.written if e.keys["pk"].startswith("b")} == {new_arn}
    (followed,) = log.named("stream_followed")
    assert followed["stream_arn"] == new_arn and followed["previous_stream_arns"] == [old_arn]
    assert metrics.STREAM_ENABLED.labels(table=table)._value.get() == 1
    assert metrics.STREAM_CHANGES.labels(table=table, change="new_stream")._value.get() == 1
    assert worker.failed == []


def test_restart_after_re_enable_reads_the_old_stream_tail_first(make_table, dynamodb_local, tmp_path, aws_env):
    client, table, old_arn = make_table("readopt")
    aws = AwsConfig(region="us-east-1", endpoint_url=dynamodb_local.endpoint)
    store_path = tmp_path / "l.sqlite"
    first_sink, first_log = RecordingSink(), EventLog()
    _put(client, table, ["a0", "a1"])
    first = _worker(aws, table, store_path, first_sink, first_log, tmp_path, start_position="TRIM_HORIZON")
    thread = _run(first)
    try:
        wait_until(lambda: set(_keys(first_sink)) >= {"a0", "a1"}, "the first run read a0, a1", timeout=20)
    finally:
        first.stop()
        thread.join(15)
    # while no worker runs: one more change on the old stream, the stream re-enabled, one on the new
    _put(client, table, ["a2"])
    client.update_table(TableName=table, StreamSpecification={"StreamEnabled": False})
    client.update_table(TableName=table, StreamSpecification={"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"})
    _put(client, table, ["b0"])
    sink, log = RecordingSink(), EventLog()
    second = _worker(aws, table, store_path, sink, log, tmp_path, start_position="LATEST")
    assert second.source.stream_arn != old_arn  # it starts on the table's new stream
    thread = _run(second)
    try:
        wait_until(lambda: set(_keys(sink)) >= {"a2", "b0"}, "the old tail and the new stream", timeout=20)
    finally:
        second.stop()
        thread.join(15)
    keys = _keys(sink)
    assert keys.index("a2") < keys.index("b0"), keys
    assert "a0" not in keys and "a1" not in keys  # the old stream resumed from its checkpoint
    assert [kw["stream_arn"] for kw in log.named("stream_adopted")] == [old_arn]
