"""Issue 19 item 6: a single-table workload (users, orders, sessions in one table) through one
worker, to three real sinks with different filters and transforms:

- ``search`` (OpenSearch on osmem-server): only orders (a pattern on ``Keys``), ``email`` masked,
  card numbers masked by the example plugin ``mask_digits`` installed from ``examples/``;
- ``audit`` (S3 audit on moto): every change, card numbers and e-mails replaced by a keyed HMAC;
- ``cache`` (Redis): everything but sessions, TTL deletes dropped.

Each sink must end with exactly the subset computed from the table / the workload, the checkpoint
must reach the stream's last record although most changes were filtered out for some sinks, and
the raw card numbers and e-mails must not be in OpenSearch's answers or the S3 objects' bytes.
"""

from __future__ import annotations

import gzip
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import boto3
import orjson
import pytest
import redis
import structlog

from connectors.app.wiring import build_worker
from connectors.embedded.verify import read_stream_events
from connectors.opensearch.sink import restore_document
from connectors.embedded.workload import scan_items
from connectors.s3.archive import run_archive_replay
from connectors.s3.audit import read_audit_objects
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.codec import key_id
from pipeline.config import Settings
from pipeline.registry import build_sinks
from pipeline.shaping.transforms import hmac_text
from tests.helpers import wait_until
from tests.test_opensearch_modes import request
from tests.test_plugin import _activate_in_this_process, _pip_install

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_transform"
LOG = structlog.get_logger("test_shaping_e2e")
HMAC_KEY = "test-hmac-key-19"


def card(i: int) -> str:
    return f"4{i:03d}77{i:04d}55{i:04d}"  # 16 digits, unique per item


def email(kind: str, i: int) -> str:
    return f"{kind}{i}@example-{i}.test"


def write_workload(ddb, table: str) -> None:
    put = lambda item: ddb.put_item(TableName=table, Item=item)  # noqa: E731
    for i in range(12):
        put({"pk": {"S": f"USER#{i}"}, "sk": {"S": "PROFILE"}, "email": {"S": email("user", i)},
             "card": {"M": {"number": {"S": card(i)}, "brand": {"S": "visa"}}}, "name": {"S": f"User {i}"}})
    for i in range(20):
        put({"pk": {"S": f"ORDER#{i}"}, "sk": {"S": "ORDER"}, "status": {"S": "NEW"}, "total": {"N": str(10 * i)},
             "email": {"S": email("order", i)}, "card": {"M": {"number": {"S": card(100 + i)}}}})
    for i in range(10):
        put({"pk": {"S": f"SESSION#{i}"}, "sk": {"S": "S"}, "token": {"S": f"tok-{i}"}, "ttl": {"N": "1700000000"}})
    for i in range(0, 20, 2):  # orders paid
        ddb.update_item(TableName=table, Key={"pk": {"S": f"ORDER#{i}"}, "sk": {"S": "ORDER"}},
                        UpdateExpression="SET #s = :s, #t = #t + :one",
                        ExpressionAttributeNames={"#s": "status", "#t": "total"},
                        ExpressionAttributeValues={":s": {"S": "PAID"}, ":one": {"N": "1"}})
    for i in range(3):  # session churn
        ddb.update_item(TableName=table, Key={"pk": {"S": f"SESSION#{i}"}, "sk": {"S": "S"}},
                        UpdateExpression="SET #t = :t", ExpressionAttributeNames={"#t": "token"},
                        ExpressionAttributeValues={":t": {"S": f"tok-{i}-b"}})
    for i in (15, 16, 17):
        ddb.delete_item(TableName=table, Key={"pk": {"S": f"ORDER#{i}"}, "sk": {"S": "ORDER"}})
    for i in (0, 1, 2, 3):
        ddb.delete_item(TableName=table, Key={"pk": {"S": f"SESSION#{i}"}, "sk": {"S": "S"}})
    ddb.delete_item(TableName=table, Key={"pk": {"S": "USER#11"}, "sk": {"S": "PROFILE"}})


@pytest.fixture(scope="module")
def plugin():
    _pip_install("-e", str(EXAMPLE))
    _activate_in_this_process("ddb-cdc-mask-digits", "ddb_cdc_mask_digits")


def all_docs(url: str, index: str) -> dict[str, dict]:
    """Every document of ``index`` as the item it holds (the sink's ``restore_document``)."""
    body = request(url, "POST", f"/{index}/_search", {"query": {"match_all": {}}, "size": 1000})
    return {hit["_id"]: restore_document(hit["_source"]) for hit in body["hits"]["hits"]}


def raw_search_bytes(url: str, index: str) -> bytes:
    import urllib.request

    req = urllib.request.Request(f"{url}/{index}/_search?size=1000", method="GET")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def test_three_sinks_get_exactly_their_subsets(tmp_path, dynamodb_local, moto_server, opensearch_url,
                                               redis_server, plugin, aws_env, monkeypatch):
    monkeypatch.setenv("DDB_CDC_TEST_HMAC_KEY", HMAC_KEY)
    creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    ddb = boto3.client("dynamodb", endpoint_url=dynamodb_local.endpoint, **creds)
    streams = boto3.client("dynamodbstreams", endpoint_url=dynamodb_local.endpoint, **creds)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **creds)
    table = f"app-{uuid.uuid4().hex[:8]}"
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                           {"AttributeName": "sk", "AttributeType": "S"}],
                     StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"})
    stream_arn = ddb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    bucket = f"audit-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    index = f"orders-{uuid.uuid4().hex[:6]}"
    cache = redis.Redis(host="127.0.0.1", port=redis_server.port)
    all_keys = ([f"USER#{i}" for i in range(12)], [f"ORDER#{i}" for i in range(20)], [f"SESSION#{i}" for i in range(10)])
    sk_of = {"USER": "PROFILE", "ORDER": "ORDER", "SESSION": "S"}
    seeded = [f"item:{pk}:{sk_of[pk.split('#')[0]]}" for group in all_keys for pk in group] + ["item:GHOST#1:X"]
    for key in seeded:
        cache.set(key, "cached")

    config = {
        "source": {"table": table, "checkpoint_interval_s": 0.2, "idle_interval_ms": 50, "discovery_interval_s": 5},
        "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint,
                "s3_endpoint_url": moto_server.endpoint},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite")},
        "dead_letter": {"directory": str(tmp_path / "dead-letter")},
        "sinks": [
            {"name": "search", "type": "opensearch", "options": {"hosts": [opensearch_url], "index": index},
             "tables": ["app-*"],
             "filter": {"dynamodb": {"Keys": {"pk": {"S": [{"prefix": "ORDER#"}]}}}},
             "transforms": [{"type": "redact", "paths": ["email"], "mode": "mask"},
                            {"type": "mask_digits", "paths": ["card.number"], "keep": 4}]},
            {"name": "audit", "type": "s3_audit",
             "options": {"bucket": bucket, "prefix": "audit", "max_buffer_age_s": 0.3},
             "transforms": [{"type": "redact", "paths": ["card.number", "email"],
                             "hmac_key_env": "DDB_CDC_TEST_HMAC_KEY"}]},
            {"name": "cache", "type": "redis_cache",
             "options": {"url": redis_server.url, "key_templates": ["item:{pk}:{sk}"]},
             "filter": {"dynamodb": {"Keys": {"pk": {"S": [{"anything-but": {"prefix": "SESSION#"}}]}}}},
             "transforms": [{"type": "drop_ttl_deletes"}]},
        ],
    }
    settings = Settings(**config)
    worker = build_worker(settings, logger=LOG)
    outcome: dict[str, int] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("code", worker.run()), daemon=True)
    thread.start()
    try:
        write_workload(ddb, table)
        truth = read_stream_events(streams, stream_arn, table)
        assert len(truth) == 12 + 20 + 10 + 10 + 3 + 3 + 4 + 1
        last = truth[-1].sequence_number
        store = SQLiteLeaseStore(str(tmp_path / "leases.sqlite"))
        wait_until(lambda: [lease.checkpoint for lease in store.list_leases()] == [last],
                   "the checkpoint reaches the last record (filtered changes count as delivered)", timeout=90,
                   interval=0.3)
    finally:
        worker.stop()
        thread.join(60)
    assert outcome.get("code") == 0

    items = scan_items(ddb, table)
    plain = {key_id({"pk": it["pk"], "sk": it["sk"]}): it for it in items}

    # search: exactly the orders the table holds now, e-mail masked, card digits masked
    docs = all_docs(opensearch_url, index)
    orders = {k: it for k, it in plain.items() if it["pk"].startswith("ORDER#")}
    assert set(docs) == set(orders) and len(orders) == 17
    for doc_id, doc in docs.items():
        item = orders[doc_id]
        assert doc["status"] == item["status"] and Decimal(str(doc["total"])) == item["total"]
        assert doc["email"] == "***"
        assert doc["card"]["number"] == "*" * 12 + item["card"]["number"][-4:]
    body = raw_search_bytes(opensearch_url, index)
    for i in range(20):
        assert card(100 + i).encode() not in body and email("order", i).encode() not in body

    # audit: every change, exactly once per sequence number, redacted with the keyed HMAC
    lines = list(read_audit_objects(s3, bucket, "audit/"))
    assert {line["source"]["sequence_number"] for line in lines} == {ev.sequence_number for ev in truth}
    assert all(line["transforms"] == [{"type": "redact", "paths": ["card.number", "email"], "mode": "hmac",
                                       "hmac_key_env": "DDB_CDC_TEST_HMAC_KEY", "mask": "***"}] for line in lines)
    user3 = next(line for line in lines if line["key_id"] == "USER#3|PROFILE" and line["operation"] == "INSERT")
    assert user3["after"]["email"] == {"S": hmac_text(HMAC_KEY.encode(), email("user", 3))}  # joinable
    assert user3["after"]["card"]["M"]["number"]["S"].startswith("hmac-sha256:")
    assert user3["after"]["card"]["M"]["brand"] == {"S": "visa"} and user3["after"]["name"] == {"S": "User 3"}
    blobs = b""
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="audit/")["Contents"]:
        raw = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        blobs += raw + gzip.decompress(raw)
    for i in range(12):
        assert card(i).encode() not in blobs and email("user", i).encode() not in blobs
    for i in range(20):
        assert card(100 + i).encode() not in blobs and email("order", i).encode() not in blobs
    assert HMAC_KEY.encode() not in blobs

    # cache: every non-session key invalidated, sessions and untouched keys left alone
    remaining = {k.decode() for k in cache.keys("item:*")}
    assert remaining == {f"item:SESSION#{i}:S" for i in range(10)} | {"item:GHOST#1:X"}

    # nothing was dead-lettered
    dead = tmp_path / "dead-letter"
    assert not dead.exists() or not any(dead.rglob("*.json")), list(dead.rglob("*"))

    # item 4: an archive replay into the search sink applies its current filter and transforms
    replay_index = f"replayed-{uuid.uuid4().hex[:6]}"
    cfg = dict(config["sinks"][0], options={"hosts": [opensearch_url], "index": replay_index})
    replay_settings = Settings(**{**config, "sinks": [cfg]})
    report = run_archive_replay(replay_settings, f"s3://{bucket}/audit", sinks=build_sinks(replay_settings.sinks),
                                logger=LOG, progress=False)
    assert report.ok, report
    replayed = all_docs(opensearch_url, replay_index)
    assert set(replayed) == set(orders)
    assert all(doc["email"] == "***" for doc in replayed.values())
    assert not any(card(100 + i).encode() in orjson.dumps(replayed) for i in range(20))
