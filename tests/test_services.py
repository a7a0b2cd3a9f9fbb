"""Each fixture's server really works: one round trip per service, asserting what came back."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis


def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _assert_loopback(url: str) -> None:
    assert urlsplit(url).hostname == "127.0.0.1", url


def test_dynamodb_local_stream_records_new_image(make_table, dynamodb_local, aws_client):
    _assert_loopback(dynamodb_local.endpoint)
    client, table, stream_arn = make_table("svc", hash_key=("pk", "S"), range_key=("sk", "N"))
    assert stream_arn.startswith("arn:aws:dynamodb:")

    client.put_item(TableName=table, Item={"pk": {"S": "user#1"}, "sk": {"N": "7"}, "name": {"S": "Ada"}})
    client.update_item(
        TableName=table,
        Key={"pk": {"S": "user#1"}, "sk": {"N": "7"}},
        UpdateExpression="SET #n = :v",
        ExpressionAttributeNames={"#n": "name"},
        ExpressionAttributeValues={":v": {"S": "Grace"}},
    )

    streams = aws_client("dynamodbstreams", dynamodb_local.endpoint)
    shards = streams.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"]
    assert len(shards) == 1  # DynamoDB Local: one shard per stream
    iterator = streams.get_shard_iterator(
        StreamArn=stream_arn, ShardId=shards[0]["ShardId"], ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    records: list[dict] = []
    deadline = time.monotonic() + 10
    while len(records) < 2 and iterator and time.monotonic() < deadline:
        page = streams.get_records(ShardIterator=iterator, Limit=100)
        records += page["Records"]
        iterator = page.get("NextShardIterator")

    assert [r["eventName"] for r in records] == ["INSERT", "MODIFY"]
    insert, modify = (r["dynamodb"] for r in records)
    assert insert["Keys"] == {"pk": {"S": "user#1"}, "sk": {"N": "7"}}
    assert insert["NewImage"] == {"pk": {"S": "user#1"}, "sk": {"N": "7"}, "name": {"S": "Ada"}}
    assert "OldImage" not in insert
    assert modify["OldImage"]["name"] == {"S": "Ada"}
    assert modify["NewImage"]["name"] == {"S": "Grace"}
    assert modify["StreamViewType"] == "NEW_AND_OLD_IMAGES"
    assert int(insert["SequenceNumber"]) < int(modify["SequenceNumber"])


def test_make_table_rejects_short_names(make_table):
    with pytest.raises(ValueError):
        make_table("ab", unique=False)


def test_moto_s3_put_get(moto_server, aws_client):
    _assert_loopback(moto_server.endpoint)
    s3 = aws_client("s3", moto_server.endpoint)
    bucket = f"svc-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    body = b'{"op":"c"}\n' * 3
    s3.put_object(Bucket=bucket, Key="audit/2026/01/part-0001.jsonl", Body=body)

    got = s3.get_object(Bucket=bucket, Key="audit/2026/01/part-0001.jsonl")
    assert got["Body"].read() == body
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="audit/")
    assert [o["Key"] for o in listed["Contents"]] == ["audit/2026/01/part-0001.jsonl"]


def test_opensearch_server_index_and_get(opensearch_server):
    _assert_loopback(opensearch_server.url)
    index = f"svc-{uuid.uuid4().hex[:8]}"
    status, body = _http("PUT", f"{opensearch_server.url}/{index}/_doc/user%231?refresh=true", {"name": "Ada", "n": 7})
    assert status == 201 and body["result"] == "created"

    status, body = _http("GET", f"{opensearch_server.url}/{index}/_doc/user%231")
    assert status == 200 and body["found"] is True
    assert body["_id"] == "user#1"
    assert body["_source"] == {"name": "Ada", "n": 7}

    status, body = _http("POST", f"{opensearch_server.url}/{index}/_search", {"query": {"match": {"name": "ada"}}})
    assert status == 200 and [h["_id"] for h in body["hits"]["hits"]] == ["user#1"]


def test_opensearch_url_is_a_fresh_writable_namespace(opensearch_url, opensearch_server):
    _assert_loopback(opensearch_url)
    assert opensearch_url != opensearch_server.url
    status, body = _http("GET", f"{opensearch_url}/_cat/indices?format=json")
    assert status == 200 and body == []  # nothing from other tests

    status, _ = _http("PUT", f"{opensearch_url}/orders/_doc/1?refresh=true", {"total": 3})
    assert status == 201
    status, body = _http("GET", f"{opensearch_url}/orders/_doc/1")
    assert status == 200 and body["_source"] == {"total": 3}
    # The shared server is neither frozen nor affected by the clone.
    status, _ = _http("GET", f"{opensearch_server.url}/orders/_doc/1")
    assert status == 404
    status, _ = _http("PUT", f"{opensearch_server.url}/svc-after-clone-{uuid.uuid4().hex[:8]}/_doc/1", {"a": 1})
    assert status == 201


def test_redis_set_get_and_outage(redis_server):
    _assert_loopback(redis_server.url)
    assert redis_server.kind in {"redis-server", "fakeredis"}
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        assert client.set("svc:key", "v1") is True
        assert client.get("svc:key") == b"v1"

        redis_server.stop()
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            client.get("svc:key")

        redis_server.start()
        assert redis_server.running
        assert client.ping() is True
        assert client.get("svc:key") is None  # restarted empty, like redis-server --save ''
        assert client.set("svc:key", "v2") is True
        assert client.get("svc:key") == b"v2"
    finally:
        client.close()


def test_aws_env_sets_dummy_credentials(aws_env, moto_server):
    import boto3

    session = boto3.session.Session()
    creds = session.get_credentials()
    assert (creds.access_key, creds.secret_key, session.region_name) == ("testing", "testing", "us-east-1")
    assert session.profile_name == "default"  # no AWS_PROFILE
    sts = session.client("sts", endpoint_url=moto_server.endpoint)
    assert sts.get_caller_identity()["Account"].isdigit()


def test_redis_is_flushed_between_tests(redis_server):
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()
