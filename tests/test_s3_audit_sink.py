"""S3 audit sink against a real moto S3 server on 127.0.0.1 (ThreadedMotoServer)."""

from __future__ import annotations

import gzip
import os
import threading
import time
import uuid
from decimal import Decimal

import boto3
import orjson
from botocore.config import Config
import pytest
from pydantic import ValidationError

from connectors.s3.audit import S3AuditSink, audit_object_key, read_audit_objects
from pipeline.awsconfig import AwsConfig
from pipeline.codec import decode_record
from pipeline.errors import FatalSinkError, RetriableSinkError
from pipeline.events import Batch
from pipeline.render import event_from_record_dict, event_to_json_line
from pipeline.sink import SinkContext

TABLE = "orders"
STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-05-01T00:00:00.000"
SHARD = "shardId-00000001714521600000-aaaaaaaa"
SHARD_2 = "shardId-00000001714521600000-bbbbbbbb"
CREATED = 1714567200  # 2024-05-01T12:40:00Z
REGION = "us-east-1"


# -- servers and clients -----------------------------------------------------------------------


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class _MotoServer:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint


@pytest.fixture(scope="module")
def moto_server():
    """A moto server on a free loopback port (``.endpoint`` is its URL), as the shared conftest will give."""
    try:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
    except Exception as exc:  # noqa: BLE001 - any start failure means "no server"
        _unavailable(f"cannot start moto server: {type(exc).__name__}: {exc}")
    host, port = server.get_host_and_port()
    yield _MotoServer(f"http://{host}:{port}")
    server.stop()


@pytest.fixture
def moto_endpoint(moto_server) -> str:
    return moto_server.endpoint


@pytest.fixture(autouse=True)
def _dummy_aws_credentials(monkeypatch, tmp_path):
    """Credentials "testing", no profile or shared config files (so nothing real is ever used)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3(moto_endpoint):
    return boto3.client("s3", region_name=REGION, endpoint_url=moto_endpoint)


@pytest.fixture
def bucket(s3):
    name = f"audit-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def _context(endpoint: str | None = None) -> SinkContext:
    aws = AwsConfig(region=REGION, endpoint_url=endpoint, max_attempts=2)
    return SinkContext(sink_name="audit", worker_id="w1", logger=None, aws=aws)


def _sink(bucket: str, endpoint: str, **options) -> S3AuditSink:
    sink = S3AuditSink("audit", S3AuditSink.Options(bucket=bucket, **options))
    sink.open(_context(endpoint))
    return sink


# -- records -----------------------------------------------------------------------------------


def _seq(n: int) -> str:
    return f"{n:021d}"


def _record(n: int, *, event="MODIFY", pk="user#1", created=CREATED, new=None, old=None):
    body = {
        "Keys": {"pk": {"S": pk}, "sk": {"N": str(n)}},
        "SequenceNumber": _seq(n),
        "SizeBytes": 100 + n,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if created is not None:
        body["ApproximateCreationDateTime"] = created
    if new is not None:
        body["NewImage"] = new
    if old is not None:
        body["OldImage"] = old
    return {"eventID": f"ev-{n}", "eventName": event, "eventSource": "aws:dynamodb", "dynamodb": body}


def _rich_image(n: int) -> dict:
    return {
        "pk": {"S": "user#1"},
        "sk": {"N": str(n)},
        "name": {"S": "Zoë ✓"},
        "big": {"N": "12345678901234567890123456789012345678"},
        "tiny": {"N": "-0.00000000000000000000000000000000000001"},
        "ratio": {"N": "1.5"},
        "blob": {"B": "AAECA/8="},
        "tags": {"SS": ["b", "a"]},
        "scores": {"NS": ["1", "2.5", "99999999999999999999999999999999999999"]},
        "blobs": {"BS": ["AQ==", "Ag=="]},
        "active": {"BOOL": True},
        "nothing": {"NULL": True},
        "nested": {"M": {"list": {"L": [{"N": "1"}, {"S": "x"}, {"M": {}}]}}},
    }


def _event(n: int, *, shard=SHARD, **kwargs):
    kwargs.setdefault("new", _rich_image(n))
    kwargs.setdefault("old", {"pk": {"S": "user#1"}, "sk": {"N": str(n)}, "name": {"S": "old"}})
    return decode_record(_record(n, **kwargs), table=TABLE, stream_arn=STREAM_ARN, shard_id=shard)


def _batch(events, shard=SHARD) -> Batch:
    events = tuple(events)
    return Batch(TABLE, STREAM_ARN, shard, events=events,
                 checkpoint_sequence_number=events[-1].sequence_number if events else None)


def _keys(s3, bucket) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def _body(s3, bucket, key) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


# -- options -----------------------------------------------------------------------------------


def test_options_defaults_and_validation():
    o = S3AuditSink.Options(bucket="b")
    assert (o.prefix, o.max_buffer_bytes, o.max_buffer_age_s, o.sse, o.kms_key_id, o.compress_level) == (
        "ddb-cdc", 8 * 1024 * 1024, 60.0, None, None, 1)  # level 1 since issue 16 (BENCHMARKS.md)
    assert S3AuditSink.Options(bucket="b", sse="none").sse is None
    assert S3AuditSink.Options(bucket="b", sse="aws:kms").kms_key_id is None  # AWS managed key
    assert S3AuditSink.Options(bucket="b", sse="aws:kms", kms_key_id="alias/x").kms_key_id == "alias/x"
    assert S3AuditSink.Options(bucket="b", prefix="/a/b/").prefix == "a/b"
    with pytest.raises(ValidationError, match="kms_key_id"):
        S3AuditSink.Options(bucket="b", sse="AES256", kms_key_id="k")
    with pytest.raises(ValidationError, match="sse"):
        S3AuditSink.Options(bucket="b", sse="aws:kms:dsse")
    with pytest.raises(ValidationError, match="prefix"):
        S3AuditSink.Options(bucket="b/logs")
    with pytest.raises(ValidationError, match="bucket"):
        S3AuditSink.Options()
    with pytest.raises(ValidationError, match="compress_level"):
        S3AuditSink.Options(bucket="b", compress_level=10)
    with pytest.raises(ValidationError, match="bukcet"):
        S3AuditSink.Options(bucket="b", bukcet="typo")


def test_object_key_layout():
    from datetime import datetime, timezone

    t = datetime(2024, 5, 1, 23, 59, 59, tzinfo=timezone.utc)
    assert audit_object_key("p", "t", "s", "1", "2", t) == "p/t/dt=2024-05-01/s/1-2.jsonl.gz"
    assert audit_object_key("", "t", "s", "1", "2", None) == "t/dt=unknown/s/1-2.jsonl.gz"


# -- behaviour against moto --------------------------------------------------------------------


def test_flush_writes_one_lossless_object_at_the_deterministic_key(s3, bucket, moto_endpoint):
    events = [_event(1, event="INSERT", old=None), _event(2), _event(3, event="REMOVE", new=None)]
    sink = _sink(bucket, moto_endpoint)
    sink.write(_batch(events))
    assert _keys(s3, bucket) == []  # buffered, not yet uploaded
    sink.flush()

    expected = f"ddb-cdc/{TABLE}/dt=2024-05-01/{SHARD}/{_seq(1)}-{_seq(3)}.jsonl.gz"
    assert _keys(s3, bucket) == [expected]
    body = _body(s3, bucket, expected)
    assert body[:2] == b"\x1f\x8b"
    lines = gzip.decompress(body).splitlines(keepends=True)
    assert lines == [event_to_json_line(e) for e in events]
    decoded = [event_from_record_dict(orjson.loads(line)) for line in lines]
    assert decoded == events
    # the typed rendering keeps what floats would lose
    after = decoded[1].after
    assert after["big"] == Decimal("12345678901234567890123456789012345678")
    assert after["tiny"] == Decimal("-1E-38")
    assert after["blob"] == b"\x00\x01\x02\x03\xff"
    assert after["tags"] == {"a", "b"} and after["blobs"] == {b"\x01", b"\x02"}
    assert Decimal("99999999999999999999999999999999999999") in after["scores"]
    raw = orjson.loads(lines[1])
    assert raw["after"]["big"] == {"N": "12345678901234567890123456789012345678"}
    assert raw["after"]["tags"] == {"SS": ["a", "b"]}
    assert raw["after"]["blob"] == {"B": "AAECA/8="}
    # the helper reads the same lines back
    assert [event_from_record_dict(d) for d in read_audit_objects(s3, bucket, "ddb-cdc/")] == events
    sink.close()


def test_same_batch_twice_leaves_one_identical_object(s3, bucket, moto_endpoint):
    events = [_event(n) for n in (10, 11, 12)]
    sink = _sink(bucket, moto_endpoint)
    sink.write(_batch(events))
    sink.flush()
    (key,) = _keys(s3, bucket)
    first = _body(s3, bucket, key)

    sink.write(_batch(events))
    sink.flush()
    # a separate sink (a restarted worker) replaying the same batch writes the same key and bytes
    other = _sink(bucket, moto_endpoint)
    other.write(_batch(events))
    other.write(_batch(events))  # retried batch: not appended twice
    other.flush()

    assert _keys(s3, bucket) == [key]
    assert _body(s3, bucket, key) == first
    assert len(gzip.decompress(first).splitlines()) == 3


def test_replay_with_other_batch_boundaries_only_duplicates_identical_lines(s3, bucket, moto_endpoint):
    events = [_event(n) for n in range(20, 26)]
    first_run = _sink(bucket, moto_endpoint)
    first_run.write(_batch(events[:4]))
    first_run.flush()
    # restart: replay from a checkpoint at event 22, cut into different batches
    second_run = _sink(bucket, moto_endpoint)
    second_run.write(_batch(events[2:3]))
    second_run.flush()
    second_run.write(_batch(events[3:]))
    second_run.flush()

    lines_by_seq: dict[str, set[bytes]] = {}
    for record in read_audit_objects(s3, bucket, "ddb-cdc/"):
        lines_by_seq.setdefault(record["source"]["sequence_number"], set()).add(orjson.dumps(record))
    assert sorted(lines_by_seq) == [e.sequence_number for e in events]
    assert all(len(variants) == 1 for variants in lines_by_seq.values())  # duplicates are identical
    assert len(_keys(s3, bucket)) == 3


def test_size_bound_uploads_before_flush(s3, bucket, moto_endpoint):
    events = [_event(n) for n in range(30, 36)]
    line_size = len(event_to_json_line(events[0]))
    sink = _sink(bucket, moto_endpoint, max_buffer_bytes=line_size * 3)
    sink.write(_batch(events[:2]))
    assert _keys(s3, bucket) == []
    sink.write(_batch(events[2:4]))  # 4 lines ≥ 3 lines' worth: uploaded without a flush
    assert _keys(s3, bucket) == [f"ddb-cdc/{TABLE}/dt=2024-05-01/{SHARD}/{_seq(30)}-{_seq(33)}.jsonl.gz"]
    assert sink.pending_events() == 0
    sink.write(_batch(events[4:]))
    assert sink.pending_events() == 2
    sink.flush()
    assert len(_keys(s3, bucket)) == 2
    assert [r["source"]["sequence_number"] for r in read_audit_objects(s3, bucket, "ddb-cdc/")] == [
        e.sequence_number for e in events]


def test_age_bound_uploads_on_next_write(s3, bucket, moto_endpoint):
    sink = _sink(bucket, moto_endpoint, max_buffer_age_s=0.2)
    sink.write(_batch([_event(40)]))
    assert _keys(s3, bucket) == []
    time.sleep(0.3)
    sink.write(_batch([_event(41)]))  # the buffer's first line is now older than 0.2 s
    assert _keys(s3, bucket) == [f"ddb-cdc/{TABLE}/dt=2024-05-01/{SHARD}/{_seq(40)}-{_seq(41)}.jsonl.gz"]


def test_two_shards_give_two_objects(s3, bucket, moto_endpoint):
    sink = _sink(bucket, moto_endpoint, prefix="audit/v1")
    a = [_event(n, shard=SHARD) for n in (50, 51)]
    b = [_event(n, shard=SHARD_2) for n in (60, 61, 62)]
    threads = [threading.Thread(target=sink.write, args=(_batch(a, SHARD),)),
               threading.Thread(target=sink.write, args=(_batch(b, SHARD_2),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.flush()
    assert sorted(_keys(s3, bucket)) == sorted([
        f"audit/v1/{TABLE}/dt=2024-05-01/{SHARD}/{_seq(50)}-{_seq(51)}.jsonl.gz",
        f"audit/v1/{TABLE}/dt=2024-05-01/{SHARD_2}/{_seq(60)}-{_seq(62)}.jsonl.gz",
    ])
    sink.flush()  # nothing buffered: no new object
    assert len(_keys(s3, bucket)) == 2


def test_reset_shard_drops_only_that_shards_unflushed_buffer(s3, bucket, moto_endpoint):
    """A new reader of a shard (lease taken back, checkpoint moved) re-reads from the checkpoint:
    the old ownership period's unflushed events must not end up in one object with the new ones
    (issue 13, item 3b: e.g. 50-71 without 52..69, which another worker archived)."""
    sink = _sink(bucket, moto_endpoint, prefix="audit")
    sink.write(_batch([_event(n, shard=SHARD) for n in (50, 51)], SHARD))
    sink.write(_batch([_event(n, shard=SHARD_2) for n in (60, 61)], SHARD_2))
    sink.reset_shard(TABLE, SHARD)
    sink.reset_shard(TABLE, "shardId-never-seen")  # nothing buffered: a no-op
    assert sink.pending_events() == 2
    sink.write(_batch([_event(n, shard=SHARD) for n in (70, 71)], SHARD))  # the new reader, after the checkpoint
    sink.flush()
    assert sorted(_keys(s3, bucket)) == sorted([
        f"audit/{TABLE}/dt=2024-05-01/{SHARD}/{_seq(70)}-{_seq(71)}.jsonl.gz",
        f"audit/{TABLE}/dt=2024-05-01/{SHARD_2}/{_seq(60)}-{_seq(61)}.jsonl.gz",
    ])


def test_missing_creation_time_goes_under_dt_unknown(s3, bucket, moto_endpoint):
    sink = _sink(bucket, moto_endpoint)
    sink.write(_batch([_event(70, created=None)]))
    sink.flush()
    assert _keys(s3, bucket) == [f"ddb-cdc/{TABLE}/dt=unknown/{SHARD}/{_seq(70)}-{_seq(70)}.jsonl.gz"]


def test_sse_aes256_reaches_s3(s3, bucket, moto_endpoint):
    sink = _sink(bucket, moto_endpoint, sse="AES256")
    sink.write(_batch([_event(80)]))
    sink.flush()
    (key,) = _keys(s3, bucket)
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ContentType"] == "application/gzip"
    assert head["Metadata"]["records"] == "1"


def test_missing_bucket_is_fatal_at_open(moto_endpoint):
    sink = S3AuditSink("audit", S3AuditSink.Options(bucket="no-such-bucket-here"))
    with pytest.raises(FatalSinkError) as info:
        sink.open(_context(moto_endpoint))
    message = str(info.value)
    assert "'no-such-bucket-here'" in message and moto_endpoint in message
    assert "sinks[].options.bucket" in message and "\n" not in message


def test_options_endpoint_and_region_override_context(s3, bucket, moto_endpoint):
    sink = S3AuditSink("audit", S3AuditSink.Options(bucket=bucket, endpoint_url=moto_endpoint,
                                                    region="eu-west-1"))
    sink.open(SinkContext(sink_name="audit", worker_id="w1", logger=None,
                          aws=AwsConfig(region=REGION, endpoint_url="http://127.0.0.1:9")))
    assert sink._client.meta.region_name == "eu-west-1"
    assert sink._client.meta.endpoint_url == moto_endpoint


def test_bucket_deleted_after_open_is_fatal_and_keeps_the_buffer(s3, moto_endpoint):
    name = f"gone-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    sink = _sink(name, moto_endpoint)
    s3.delete_bucket(Bucket=name)
    sink.write(_batch([_event(90)]))
    with pytest.raises(FatalSinkError, match="NoSuchBucket"):
        sink.flush()
    assert sink.pending_events() == 1


def test_unreachable_endpoint_is_retriable_and_retry_reuploads(s3, bucket, moto_endpoint):
    sink = _sink(bucket, moto_endpoint)
    sink.write(_batch([_event(95)]))
    real_client = sink._client
    sink._client = boto3.client(
        "s3", region_name=REGION, endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(RetriableSinkError, match="will retry"):
        sink.flush()
    assert sink.pending_events() == 1
    sink._client = real_client
    sink.flush()
    assert [r["source"]["sequence_number"] for r in read_audit_objects(s3, bucket, "ddb-cdc/")] == [_seq(95)]


@pytest.mark.parametrize("code,status,kind", [
    ("SlowDown", 503, RetriableSinkError),
    ("InternalError", 500, RetriableSinkError),
    ("SomethingNew", 502, RetriableSinkError),
    ("AccessDenied", 403, FatalSinkError),
    ("NoSuchBucket", 404, FatalSinkError),
    ("KMS.NotFoundException", 400, FatalSinkError),
])
def test_error_classification(code, status, kind):
    # S3 cannot be made to throttle on demand; the classification is checked on botocore's error shape.
    from botocore.exceptions import ClientError

    sink = S3AuditSink("audit", S3AuditSink.Options(bucket="b"))
    exc = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                      "PutObject")
    assert type(sink._classify(exc, "k")) is kind


def test_concurrent_writes_and_flushes_lose_nothing(s3, bucket, moto_endpoint):
    sink = _sink(bucket, moto_endpoint, max_buffer_bytes=20_000)
    shards = [f"shardId-00000001714521600000-{i:08d}" for i in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(shard: str, base: int) -> None:
        try:
            for b in range(10):
                sink.write(_batch([_event(base + b * 3 + i, shard=shard) for i in range(3)], shard))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def flusher() -> None:
        while not stop.is_set():
            try:
                sink.flush()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            time.sleep(0.005)

    threads = [threading.Thread(target=writer, args=(s, 1000 * (i + 1))) for i, s in enumerate(shards)]
    f = threading.Thread(target=flusher)
    f.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    f.join()
    sink.flush()
    assert errors == []
    seen = {(r["source"]["shard_id"], r["source"]["sequence_number"]) for r in read_audit_objects(s3, bucket, "")}
    expected = {(s, _seq(1000 * (i + 1) + n)) for i, s in enumerate(shards) for n in range(30)}
    assert seen == expected
    assert sink.pending_events() == 0
