"""The stream double of the scale-out simulation (benchmarks/lease_scale.py), through a real
botocore client: lineage appears at the announced split, shards close at the announced end, and
iterators resume after a sequence number — what the figures in BENCHMARKS.md rely on."""

from __future__ import annotations

import json
import time

from benchmarks.lease_scale import ARN, ScaleDouble, seq, shard_id
from connectors.aws import make_client
from pipeline.awsconfig import AwsConfig


def _client(double: ScaleDouble):
    aws = AwsConfig(region="us-east-1", endpoint_url="https://streams.scale.invalid", access_key_id="AKIASCALE",
                    secret_access_key="scale-secret")
    return double.attach(make_client("dynamodbstreams", aws))


def _shards(client) -> dict[str, dict]:
    return {s["ShardId"]: s for s in client.describe_stream(StreamArn=ARN)["StreamDescription"]["Shards"]}


def test_split_and_end_follow_the_control_file(tmp_path):
    control = tmp_path / "control.json"
    control.write_text("{}")
    t0 = time.time() - 10  # 10 s of records already: 20 per shard at 2/s
    double = ScaleDouble(t0=t0, shards=3, splits=1, rate=2.0, control=str(control))
    client = _client(double)
    shards = _shards(client)
    assert sorted(shards) == [shard_id(0), shard_id(1), shard_id(2)]
    assert all("EndingSequenceNumber" not in s["SequenceNumberRange"] for s in shards.values())

    it = client.get_shard_iterator(StreamArn=ARN, ShardId=shard_id(0), ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    page = client.get_records(ShardIterator=it, Limit=5)
    assert [r["dynamodb"]["SequenceNumber"] for r in page["Records"]] == [seq(0, i) for i in range(5)]
    after = client.get_shard_iterator(StreamArn=ARN, ShardId=shard_id(0), ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                      SequenceNumber=seq(0, 4))["ShardIterator"]
    assert client.get_records(ShardIterator=after, Limit=1)["Records"][0]["dynamodb"]["SequenceNumber"] == seq(0, 5)

    now = time.time()
    control.write_text(json.dumps({"split_t": now, "end_t": now + 3600}))
    time.sleep(0.6)  # the double re-reads the file at most every 0.5 s
    shards = _shards(client)
    assert shards[shard_id(3)]["ParentShardId"] == shard_id(0)
    assert "EndingSequenceNumber" in shards[shard_id(0)]["SequenceNumberRange"]
    assert "EndingSequenceNumber" not in shards[shard_id(1)]["SequenceNumberRange"]
    final = double.final_count(0)
    it = client.get_shard_iterator(StreamArn=ARN, ShardId=shard_id(0), ShardIteratorType="AT_SEQUENCE_NUMBER",
                                   SequenceNumber=seq(0, final - 1))["ShardIterator"]
    last = client.get_records(ShardIterator=it, Limit=1000)
    assert [r["dynamodb"]["SequenceNumber"] for r in last["Records"]] == [seq(0, final - 1)]
    assert "NextShardIterator" not in last  # SHARD_END
    # the child shares its parent's item keys (lineage order is checked per item)
    child_it = client.get_shard_iterator(StreamArn=ARN, ShardId=shard_id(3), ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    time.sleep(0.6)
    child = client.get_records(ShardIterator=child_it, Limit=1)["Records"]
    assert child and child[0]["dynamodb"]["Keys"]["pk"]["S"].startswith("item-0-")
