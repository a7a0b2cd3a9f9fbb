"""The fast GetRecords read path (orjson) against the boto3 path (botocore's shape parser):
identical change events for every input — a differential test on generated GetRecords response
bodies — and the same behaviour through a real botocore client against DynamoDB Local (records,
errors, the configuration switch)."""

from __future__ import annotations

import os
from decimal import Decimal

import boto3
import botocore.parsers
import botocore.session
import orjson
import pytest
from boto3.dynamodb.types import TypeSerializer
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.dynamodb_streams.fastpath import parse_get_records_body
from connectors.dynamodb_streams.source import DynamoDBStreamSource
from pipeline.awsconfig import AwsConfig
from pipeline.codec import decode_record
from pipeline.errors import SourceError
from tests.test_codec import _to_base64_form, items

ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-01-01T00:00:00.000"
_OUTPUT_SHAPE = (botocore.session.get_session().get_service_model("dynamodbstreams")
                 .operation_model("GetRecords").output_shape)
_ser = TypeSerializer()


def _wire_av(value):
    """A Python value → its AttributeValue in DynamoDB's wire JSON (B as base64 text)."""
    return _to_base64_form(_ser.serialize(value))


keys = st.fixed_dictionaries({"pk": st.one_of(st.text(min_size=1, max_size=10), st.binary(min_size=1, max_size=8)),
                              "sk": st.integers(-(10**20), 10**20).map(Decimal)})
records = st.builds(
    lambda name, key, old, new, created, seq, view: {
        "eventID": f"e{seq}", "eventName": name, "eventVersion": "1.1", "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": {
            "ApproximateCreationDateTime": created,
            "Keys": {k: _wire_av(v) for k, v in key.items()},
            **({"NewImage": {k: _wire_av(v) for k, v in {**new, **key}.items()}}
               if name != "REMOVE" and view in ("NEW_IMAGE", "NEW_AND_OLD_IMAGES") else {}),
            **({"OldImage": {k: _wire_av(v) for k, v in {**old, **key}.items()}}
               if name != "INSERT" and view in ("OLD_IMAGE", "NEW_AND_OLD_IMAGES") else {}),
            "SequenceNumber": f"{seq:021d}", "SizeBytes": 100 + seq % 400, "StreamViewType": view,
        },
        **({"userIdentity": {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}}
           if name == "REMOVE" and seq % 3 == 0 else {}),
    },
    st.sampled_from(["INSERT", "MODIFY", "REMOVE"]), keys, items, items,
    st.one_of(st.integers(1_600_000_000, 1_900_000_000), st.floats(1_600_000_000, 1_900_000_000).map(lambda f: round(f, 3))),
    st.integers(1, 10**15), st.sampled_from(["NEW_AND_OLD_IMAGES", "NEW_IMAGE", "OLD_IMAGE", "KEYS_ONLY"]),
)


def _boto3_path(body: bytes) -> dict:
    return botocore.parsers.create_parser("json").parse({"body": body, "headers": {}, "status_code": 200},
                                                         _OUTPUT_SHAPE)


def _events(response: dict) -> list:
    return [decode_record(r, table="orders", stream_arn=ARN, shard_id="shardId-1") for r in response["Records"]]


@settings(max_examples=100, deadline=None)
@given(st.lists(records, max_size=6), st.one_of(st.none(), st.just("iterator-token-abc")))
def test_fast_path_decodes_exactly_what_the_boto3_path_decodes(recs, next_iterator):
    body = orjson.dumps({"Records": recs, **({"NextShardIterator": next_iterator} if next_iterator else {})})
    slow, fast = _boto3_path(body), parse_get_records_body(body)
    assert fast.get("NextShardIterator") == slow.get("NextShardIterator")
    slow_events, fast_events = _events(slow), _events(fast)
    assert fast_events == slow_events
    assert _events(parse_get_records_body(body, typed=True)) == slow_events  # read_path: typed (msgspec)
    # the shapes differ (datetime/bytes vs epoch/base64) but every derived field agrees
    for a, b in zip(fast_events, slow_events):
        assert a.version == b.version and a.key_id == b.key_id
        assert a.source.approximate_creation_time == b.source.approximate_creation_time


# -- through a real botocore client against DynamoDB Local ------------------------------------


@pytest.fixture
def table_with_changes(dynamodb_local, aws_env):
    creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    ddb = boto3.client("dynamodb", endpoint_url=dynamodb_local.endpoint, **creds)
    from connectors.embedded.workload import Workload, create_table, write_changes

    table = f"fastpath-{os.urandom(4).hex()}"
    create_table(ddb, table)
    write_changes(ddb, table, Workload(seed=41, items=40), 300)
    return dynamodb_local.endpoint, table


def _read_all(source: DynamoDBStreamSource) -> list:
    events = []
    for shard in source.list_shards():
        it = source.get_iterator(shard.shard_id, "TRIM_HORIZON")
        while it:
            result = source.get_records(it, 1000)
            events.extend(decode_record(r, table=source.table, stream_arn=source.stream_arn, shard_id=shard.shard_id)
                          for r in result.records)
            if not result.records:
                break
            it = result.next_iterator
    return events


def test_fast_and_boto3_read_paths_agree_on_dynamodb_local(table_with_changes):
    endpoint, table = table_with_changes
    aws = AwsConfig(region="us-east-1", endpoint_url=endpoint)
    fast = DynamoDBStreamSource(aws, table=table)  # the default
    slow = DynamoDBStreamSource(aws, table=table, read_path="boto3")
    assert fast.read_path == "fast"
    fast_events, slow_events = _read_all(fast), _read_all(slow)
    assert len(fast_events) == 300 and fast_events == slow_events
    typed = DynamoDBStreamSource(aws, table=table, read_path="typed")  # its own client: its own hook
    assert _read_all(typed) == slow_events
    # the fast path hands back the wire JSON untouched (epoch seconds, base64 text)
    it = fast.get_iterator(fast.list_shards()[0].shard_id, "TRIM_HORIZON")
    record = fast.get_records(it, 5).records[0]
    assert isinstance(record["dynamodb"]["ApproximateCreationDateTime"], (int, float))
    it = slow.get_iterator(slow.list_shards()[0].shard_id, "TRIM_HORIZON")
    assert not isinstance(slow.get_records(it, 5).records[0]["dynamodb"]["ApproximateCreationDateTime"], (int, float))


def test_errors_are_botocores_on_the_fast_path(table_with_changes):
    endpoint, table = table_with_changes
    aws = AwsConfig(region="us-east-1", endpoint_url=endpoint, max_attempts=1)
    for read_path in ("fast", "typed", "boto3"):
        source = DynamoDBStreamSource(aws, table=table, read_path=read_path)
        with pytest.raises(SourceError) as info:
            source.get_records("not-an-iterator", 10)
        assert "ValidationException" in str(info.value) or "Invalid" in str(info.value), (read_path, info.value)


def test_read_path_is_configurable(monkeypatch, tmp_path):
    from pipeline.config import load_settings

    monkeypatch.setenv("DDB_CDC_SOURCE__READ_PATH", "boto3")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("source: {table: t}\nsinks: [{name: c, type: redis_cache, options: {url: 'redis://127.0.0.1:1', "
                   "key_templates: ['k:{pk}']}}]\n")
    assert load_settings(cfg).source.read_path == "boto3"
    monkeypatch.delenv("DDB_CDC_SOURCE__READ_PATH")
    assert load_settings(cfg).source.read_path == "auto"  # since issue 16: typed or fast, from the sinks
