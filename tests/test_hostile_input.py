"""Hostile input, end to end through all three built-in sinks: every stream record is delivered or
dead-lettered (with its full before/after images), and the worker never crashes.

1. The real worker (``python -m connectors.app.cli run``) in a subprocess against DynamoDB Local, four
   tables (composite key; BINARY partition key; KEYS_ONLY stream; NEW_IMAGE stream) holding items
   near the 400 KB limit, 38-digit numbers and exponents at DynamoDB's range ends, empty strings
   and binary, unicode and emoji in keys and attribute names, OpenSearch-reserved and dotted
   attribute names, 32-level nested maps, binary partition keys — with updates and deletes —
   fanned out to osmem-server (OpenSearch API), moto server (S3) and redis-server.
2. Malformed records (missing fields, wrong types), which DynamoDB cannot produce, through the
   test double at the DynamoDB Streams API boundary (connectors/dynamodb_streams/testing.py) and a real Worker
   with the same three real sinks: they become ``decode`` dead-letter entries with their raw
   content and position; every other record is delivered.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import redis
import structlog
import yaml

from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
from tests.stacks import fast_policies, make_worker, run_to_idle
from connectors.opensearch.sink import OpenSearchSink, document_id, restore_document
from connectors.redis_cache import RedisCacheSink
from connectors.s3.audit import S3AuditSink, read_audit_objects
from connectors.embedded.verify import check_s3_audit, read_stream_events, values_match
from pipeline.awsconfig import AwsConfig
from pipeline.codec import DYNAMODB_CONTEXT
from pipeline.events import ChangeEvent, Operation
from pipeline.render import event_to_record_dict
from pipeline.testing import make_stream_record
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
INDEX = "hx-{table}"
SENTINEL = "unrelated:sentinel"


# ---------------------------------------------------------------------------------------------
# helpers


def S(v: str) -> dict:
    return {"S": v}


def N(v: str) -> dict:
    return {"N": v}


def B(v: bytes) -> dict:
    return {"B": v}


def M(**kv: Any) -> dict:
    return {"M": dict(kv)}


def Mn(d: dict) -> dict:
    return {"M": d}


def nested(levels: int) -> dict:
    """A map attribute value nesting ``levels`` maps (the attribute's own map is level 1)."""
    value: dict = {"leaf": S("bottom"), "n": N("-1E-130")}
    for i in range(levels - 1):
        value = {f"l{i}": Mn(value), "i": N(str(i))}
    return Mn(value)


def os_search_all(url: str, index: str) -> dict[str, dict]:
    urllib.request.urlopen(urllib.request.Request(f"{url}/{index}/_refresh", method="POST"), timeout=30).read()
    body = json.dumps({"size": 10000, "query": {"match_all": {}}}).encode()
    req = urllib.request.Request(f"{url}/{index}/_search", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = json.loads(resp.read(), parse_float=Decimal)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise
    return {h["_id"]: h["_source"] for h in data["hits"]["hits"]}


def dead_letters(directory: Path) -> list[dict]:
    return [orjson.loads(p.read_bytes()) for p in sorted(directory.glob("*.json")) if not p.name.startswith(".tmp-")]


def expected_index(events: list[ChangeEvent], os_failed: set[str]) -> dict[str, Any]:
    """The OpenSearch end state: the stream replayed in order without the dead-lettered events.

    _id → the item as the sink indexes it (the new image, or the keys for keys-only streams)."""
    state: dict[str, Any] = {}
    for ev in events:
        if ev.sequence_number in os_failed:
            continue
        doc_id = document_id(ev.key_id)
        if ev.operation is Operation.REMOVE:
            state.pop(doc_id, None)
        else:
            state[doc_id] = ev.after if ev.after is not None else dict(ev.keys)
    return state


def check_index(url: str, index: str, events: list[ChangeEvent], os_failed: set[str]) -> list[str]:
    want = expected_index(events, os_failed)
    got = os_search_all(url, index)
    problems = [f"{index}: missing {k!r}" for k in sorted(set(want) - set(got))]
    problems += [f"{index}: unexpected {k!r}" for k in sorted(set(got) - set(want))]
    for doc_id in sorted(set(want) & set(got)):
        item = restore_document(got[doc_id])
        if not values_match(want[doc_id], item):
            diff = sorted(k for k in set(want[doc_id]) | set(item)
                          if not values_match(want[doc_id].get(k), item.get(k)))
            problems.append(f"{index}: document {doc_id!r} differs in {diff}")
    return problems


def check_dead_letters(entries: list[dict], events: list[ChangeEvent]) -> dict[str, set[str]]:
    """Every delivery entry holds the full event of a stream record; returns {sink: {seq}}."""
    by_seq = {(ev.source.shard_id, ev.sequence_number): ev for ev in events}
    failed: dict[str, set[str]] = {}
    for entry in entries:
        assert entry["kind"] == "delivery", entry
        pos = entry["position"]
        ev = by_seq.get((pos["shard_id"], pos["sequence_number"]))
        assert ev is not None, f"dead letter for an unknown record: {pos}"
        assert entry["event"] == event_to_record_dict(ev), "dead letter must hold the full event (before/after)"
        assert entry["error"] and entry["sink"]
        failed.setdefault(entry["sink"], set()).add(ev.sequence_number)
    return failed


# ---------------------------------------------------------------------------------------------
# 1. DynamoDB Local → worker subprocess → osmem / moto S3 / redis


class Tables:
    """The four tables and the hostile changes written to them."""

    def __init__(self, make_table):
        self.cmp = make_table("hx-cmp", hash_key=("pk", "S"), range_key=("sk", "N"))
        self.bin = make_table("hx-bin", hash_key=("bk", "B"))
        self.keys = make_table("hx-keys", hash_key=("pk", "S"), range_key=("sk", "S"), stream_view_type="KEYS_ONLY")
        self.new = make_table("hx-new", hash_key=("pk", "S"), stream_view_type="NEW_IMAGE")
        self.all = [self.cmp, self.bin, self.keys, self.new]
        self.ddb = self.cmp.client

    def put(self, t, item: dict) -> None:
        self.ddb.put_item(TableName=t.table_name, Item=item)

    def delete(self, t, key: dict) -> None:
        self.ddb.delete_item(TableName=t.table_name, Key=key)

    def update(self, t, key: dict, expr: str, names: dict, values: dict | None = None) -> None:
        kwargs: dict[str, Any] = dict(TableName=t.table_name, Key=key, UpdateExpression=expr,
                                      ExpressionAttributeNames=names)
        if values:
            kwargs["ExpressionAttributeValues"] = values
        self.ddb.update_item(**kwargs)

    def write_hostile_changes(self) -> None:
        cmp, bn, ko, nw = self.cmp, self.bin, self.keys, self.new
        # near the 400 KB item limit (insert, then a MODIFY whose record carries both ~390 KB images)
        big_key = {"pk": S("big"), "sk": N("1")}
        self.put(cmp, {**big_key, "blob": S("x" * 390_000), "note": S("near 400 KB")})
        self.update(cmp, big_key, "SET #n = :v", {"#n": "note"}, {":v": S("modified")})
        # numbers: 38 significant digits (also as a sort key), DynamoDB's exponent range ends
        n38 = "12345678901234567890123456789012345678"
        nums_key = {"pk": S("nums"), "sk": N("5")}
        # a 38-digit sort key: rendered as a JSON string where the other items' sk are numbers, so
        # OpenSearch refuses it (mixed field types): dead-lettered for the opensearch sink only
        self.put(cmp, {"pk": S("n38key"), "sk": N(n38), "v": S("38-digit sort key")})
        self.put(cmp, {**nums_key, "n38": N("-" + n38), "frac38": N("0.12345678901234567890123456789012345678"),
                       "tiny": N("1E-130"), "tiny38": N("-1.2345678901234567890123456789012345678E-100"),
                       "e37": N("1E+37"), "int64": N("9223372036854775807"),
                       "ns": {"NS": ["1E-130", "-1E+37", "0.5"]}})
        # (an empty map is in test_empty_map_in_a_stream_record_decodes, numbers of 39+ integer digits, e.g. 1E+125, are in
        # test_numbers_with_more_than_38_integer_digits_decode)
        self.update(cmp, nums_key, "SET #t = :v", {"#t": "tiny"}, {":v": N("2E-130")})
        # a number set mixing a 38-digit number (a JSON string) with a fraction (a JSON number):
        # OpenSearch refuses the array (mixed field types), so this item is dead-lettered for the
        # opensearch sink only — with its full images — and still reaches S3 and Redis
        self.put(cmp, {"pk": S("mixed"), "sk": N("9"), "mix": {"NS": [n38, "1.5"]}})
        # empty strings and empty binary, also inside maps and lists
        empty_key = {"pk": S("empty"), "sk": N("0")}
        self.put(cmp, {**empty_key, "es": S(""), "eb": B(b""), "el": {"L": [S(""), B(b"")]},
                       "em": M(s=S(""), b=B(b"")), "elist": {"L": []},
                       "ess": {"SS": ["", "a"]}, "ebs": {"BS": [b"", b"a"]}})
        # unicode and emoji in key values and attribute names
        uni_key = {"pk": S("ключ 🚀 日本語 |\\ pipe"), "sk": N("-1.5")}
        self.put(cmp, {**uni_key, "名前 🚀": S("値 🎉"), "ünï": M(**{"ïnner 🧪": S("ok")}),
                       "zwj 👩‍👩‍👧": S("family"), "rtl \u05d0": S("\u05d0\u05d1")})
        # OpenSearch-reserved and dotted attribute names, also nested and inside lists
        names_key = {"pk": S("names"), "sk": N("2")}
        self.put(cmp, {**names_key, "_id": S("not the id"), "_source": S("not the source"), "_index": N("7"),
                       "_routing": S("r"), "_version": N("3"), "_seq_no": N("4"), "_cdc": S("item's own _cdc"),
                       "_ddbx": S("looks escaped"), "a": N("1"), "a.b": N("2"), "a.b.c": S("three"), ".": S("dot"),
                       "..": S("dots"), "x.": S("trailing"), ".y": S("leading"), "50%.x": S("percent"),
                       "m": M(**{"_id": S("nested _id"), "k.k": S("nested dotted"), "_source": N("5")}),
                       "l": {"L": [M(**{"_index": S("in list"), "q.r": {"BOOL": True}})]}})
        self.update(cmp, names_key, "SET #i = :v REMOVE #d", {"#i": "_id", "#d": "a.b"}, {":v": S("changed id")})
        # deeply nested maps: 32 levels, DynamoDB's limit (it counts the item as level 1), also in a list
        deep_key = {"pk": S("deep"), "sk": N("3")}
        self.put(cmp, {**deep_key, "deep": nested(31), "dl": {"L": [nested(30)]}, "ok19": nested(19)})
        self.update(cmp, deep_key, "SET #o = :v", {"#o": "ok19"}, {":v": nested(20)})
        # deletes of hostile items
        self.delete(cmp, nums_key)
        self.delete(cmp, empty_key)
        self.put(cmp, {**empty_key, "es": S(""), "again": {"BOOL": True}})

        # binary partition keys: bytes that are not text, '|' and '\\', a key long enough to be hashed
        for bk in (b"\x00\xff\x01", b"|\\|", b"\xf0\x9f\x9a\x80", bytes(range(256)) * 4):
            self.put(bn, {"bk": B(bk), "payload": B(bk[::-1]), "tag": S("bin")})
        self.update(bn, {"bk": B(b"|\\|")}, "SET #t = :v", {"#t": "tag"}, {":v": S("changed")})
        self.delete(bn, {"bk": B(b"\x00\xff\x01")})

        # KEYS_ONLY stream: INSERT/MODIFY carry no image at all
        for sk in ("a.b", "_id", "🚀"):
            self.put(ko, {"pk": S("k"), "sk": S(sk), "_source": S("never seen"), "v": N("1")})
        self.update(ko, {"pk": S("k"), "sk": S("🚀")}, "SET #v = :v", {"#v": "v"}, {":v": N("2")})
        self.delete(ko, {"pk": S("k"), "sk": S("a.b")})

        # NEW_IMAGE stream: REMOVE carries no image, MODIFY no old image
        self.put(nw, {"pk": S("n1"), "v": S("one"), "_id": S("x")})
        self.put(nw, {"pk": S("n2"), "v": S("two")})
        self.update(nw, {"pk": S("n1")}, "SET #v = :v", {"#v": "v"}, {":v": S("uno")})
        self.delete(nw, {"pk": S("n2")})


def test_hostile_items_reach_every_sink_or_the_dead_letter_directory(
        tmp_path, aws_env, make_table, moto_server, opensearch_url, redis_server):
    tables = Tables(make_table)
    tables.write_hostile_changes()
    creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    endpoint = tables.ddb.meta.endpoint_url
    streams = boto3.client("dynamodbstreams", endpoint_url=endpoint, **creds)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **creds)
    bucket = f"hx-audit-{os.urandom(3).hex()}"
    s3.create_bucket(Bucket=bucket)
    events = {t.table_name: read_stream_events(streams, t.stream_arn, t.table_name) for t in tables.all}
    assert all(events.values())
    every = [ev for evs in events.values() for ev in evs]
    assert any(ev.after is None and ev.operation is not Operation.REMOVE for ev in every)  # KEYS_ONLY
    assert max(ev.source.size_bytes for ev in every) > 700_000  # the MODIFY of the ~390 KB item

    key_templates = {
        tables.cmp.table_name: ["c:{pk}:{sk}", "tiny:{tiny}", "es:{es}"],
        tables.bin.table_name: ["b:{bk}", "p:{payload}"],
        tables.keys.table_name: ["k:{pk}:{sk}", "v:{v}"],
        tables.new.table_name: ["n:{pk}", "nv:{v}"],
    }
    cache = RedisCacheSink("cache", RedisCacheSink.Options(url=redis_server.url, key_templates=key_templates))
    cache_keys = sorted({k for ev in every for k in cache.keys_for(ev)})
    assert any(k.startswith("b:") for k in cache_keys) and any("🚀" in k for k in cache_keys)
    rds = redis.Redis.from_url(redis_server.url)
    pipe = rds.pipeline(transaction=False)
    for key in cache_keys + [SENTINEL]:
        pipe.set(key, "cached")
    pipe.execute()

    dead_dir = tmp_path / "dead-letter"
    config = tmp_path / "config.yaml"
    lease_table = f"hx-leases-{os.urandom(4).hex()}"
    config.write_text(yaml.safe_dump({
        "source": {"tables": [t.table_name for t in tables.all], "checkpoint_interval_s": 0.3,
                   "idle_interval_ms": 100, "discovery_interval_s": 5},
        "aws": {"region": "us-east-1", "dynamodb_endpoint_url": endpoint, "s3_endpoint_url": moto_server.endpoint},
        "checkpoints": {"store": "dynamodb", "table_name": lease_table, "failover_time_s": 3},
        "dead_letter": {"directory": str(dead_dir)},
        "worker": {"shutdown_grace_s": 30},
        "log": {"format": "json"},
        "sinks": [
            # mapping: dynamic, so OpenSearch refuses the items whose attribute types vary (dead-lettered)
            {"name": "search", "type": "opensearch",
             "options": {"hosts": [opensearch_url], "index": INDEX, "mapping": "dynamic"}},
            {"name": "audit", "type": "s3_audit", "options": {"bucket": bucket, "prefix": "audit", "max_buffer_age_s": 1}},
            {"name": "cache", "type": "redis_cache", "options": {"url": redis_server.url, "key_templates": key_templates}},
        ],
    }, allow_unicode=True))
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "connectors.app.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    try:
        last = {t.stream_arn: events[t.table_name][-1].sequence_number for t in tables.all}
        store = DynamoDBLeaseStore(AwsConfig(region="us-east-1", dynamodb_endpoint_url=endpoint), lease_table,
                                   client=tables.ddb)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"worker exited early with {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                reached = {lease.stream_arn: lease.checkpoint for lease in store.list_leases()}
            except Exception:
                reached = {}
            if all(reached.get(arn) == seq_no for arn, seq_no in last.items()):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"checkpoints {reached} did not reach {last}: {log_path.read_text()[-3000:]}")
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log_text = log_path.read_text(errors="replace")
    assert code == 0, log_text[-3000:]
    assert "Traceback" not in log_text and "shard_failed" not in log_text, log_text[-3000:]

    # dead letters: full events of real stream records only
    failed = check_dead_letters(dead_letters(dead_dir), every)
    assert set(failed) <= {"search"}, f"only OpenSearch may refuse documents; dead letters: {failed}"

    # S3 accepts everything: every sequence number, identical to the stream record
    audit = check_s3_audit(read_audit_objects(s3, bucket, "audit"), every)
    assert audit.ok, audit.problems

    # Redis: every change's keys are gone, the unrelated key is not
    present = [k for k in cache_keys if rds.exists(k)]
    assert not present, present[:10]
    assert rds.exists(SENTINEL)

    # OpenSearch: every item not dead-lettered, content-equal after undoing the escaping
    os_failed = failed.get("search", set())
    problems = []
    for t in tables.all:
        problems += check_index(opensearch_url, INDEX.format(table=t.table_name).lower(), events[t.table_name],
                                os_failed)
    assert not problems, problems[:10]
    # the hostile items themselves were indexed, not dead-lettered: escaping and flattening keep
    # every item indexable; only the mixed-type number set was refused
    mixed = {ev.sequence_number for ev in every if ev.key_id in ("mixed|9", "n38key|" + "1234567890" * 3 + "12345678")}
    assert len(mixed) == 2
    assert os_failed == mixed, [e["error"] for e in dead_letters(dead_dir)][:5]
    assert all("mapper" in e["error"] or "illegal_argument" in e["error"] for e in dead_letters(dead_dir))
    cmp_docs = os_search_all(opensearch_url, INDEX.format(table=tables.cmp.table_name).lower())
    names = cmp_docs["names|2"]
    assert names["_ddb_id"] == "changed id" and names["_ddb_cdc"] == "item's own _cdc" and "_ddba%2Eb" not in names
    assert names["m"]["_id"] == "nested _id"  # nested metadata names are ordinary names
    deep = cmp_docs["deep|3"]
    # 20 map levels in one attribute: the innermost map's fields would be at depth 21 > 20, so that
    # map alone is stored as JSON text under a _ddj name; everything above stays searchable
    node, levels = deep["ok19"], 1
    while not any(k.startswith("_ddj") for k in node):
        node = next(v for k, v in node.items() if isinstance(v, dict))
        levels += 1
    assert levels == 19 and json.loads(node["_ddjl0"]) == {"leaf": "bottom", "n": -1e-130}
    assert len(cmp_docs["big|1"]["blob"]) == 390_000
    keys_docs = os_search_all(opensearch_url, INDEX.format(table=tables.keys.table_name).lower())
    assert {d["_cdc"].get("image") for d in keys_docs.values()} == {"keys_only"} and len(keys_docs) == 2
    bin_docs = os_search_all(opensearch_url, INDEX.format(table=tables.bin.table_name).lower())
    assert len(bin_docs) == 3 and any(k.startswith("sha256:") for k in bin_docs)


# ---------------------------------------------------------------------------------------------
# 2. malformed records through the Streams API test double, real Worker, real sinks


def malformed_records() -> list[tuple[str, Any]]:
    """(why, record) pairs DynamoDB would never send; each gets its sequence number later."""
    good = make_stream_record(keys={"pk": "x"}, new_image={"pk": "x", "v": Decimal(1)})
    body = good["dynamodb"]

    def variant(why: str, change) -> tuple[str, Any]:
        rec = copy.deepcopy(good)
        change(rec)
        return why, rec

    return [
        variant("no eventName", lambda r: r.pop("eventName")),
        variant("eventName not a string", lambda r: r.__setitem__("eventName", 7)),
        variant("unknown eventName", lambda r: r.__setitem__("eventName", "UPSERT")),
        variant("no dynamodb body", lambda r: r.pop("dynamodb")),
        variant("dynamodb body is a list", lambda r: r.__setitem__("dynamodb", [body])),
        variant("no Keys", lambda r: r["dynamodb"].pop("Keys")),
        variant("Keys is a string", lambda r: r["dynamodb"].__setitem__("Keys", "pk=x")),
        variant("N is not a number", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"N": "one"})),
        variant("N beyond 38 digits", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"N": "1" * 39})),
        variant("N exponent out of range", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"N": "1E-200"})),
        variant("N is an int", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"N": 5})),
        variant("two type tags", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"S": "a", "N": "1"})),
        variant("unknown type tag", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"X": "?"})),
        variant("B not base64", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"B": "***"})),
        variant("M is a list", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"M": [1]})),
        variant("SS member not a string", lambda r: r["dynamodb"]["NewImage"].__setitem__("v", {"SS": ["a", 1]})),
        variant("NewImage is a list", lambda r: r["dynamodb"].__setitem__("NewImage", [1, 2])),
        variant("key attribute is a map", lambda r: r["dynamodb"].__setitem__("Keys", {"pk": {"M": {}}})),
        variant("SizeBytes is text", lambda r: r["dynamodb"].__setitem__("SizeBytes", "100")),
        variant("creation time is text", lambda r: r["dynamodb"].__setitem__("ApproximateCreationDateTime", "soon")),
        variant("StreamViewType is a number", lambda r: r["dynamodb"].__setitem__("StreamViewType", 3)),
    ]


def test_malformed_records_are_dead_lettered_as_decode_entries_and_the_rest_is_delivered(
        tmp_path, aws_env, moto_server, opensearch_url, redis_server):
    assert DYNAMODB_CONTEXT.prec == 38
    aws = AwsConfig(region="us-east-1", s3_endpoint_url=moto_server.endpoint)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"hx-malformed-{os.urandom(3).hex()}"
    s3.create_bucket(Bucket=bucket)

    bad = malformed_records()
    records: list[dict] = []
    bad_seqs: dict[str, tuple[str, Any]] = {}
    i = 0
    for n, (why, rec) in enumerate(bad):
        good = make_stream_record(event_name="INSERT" if n % 3 else "MODIFY", keys={"pk": f"ok-{n}"},
                                  new_image={"pk": f"ok-{n}", "v": Decimal(n), "_id": "reserved", "a.b": "dot"},
                                  sequence_number=seq(1, i))
        records.append(good)
        i += 1
        if isinstance(rec.get("dynamodb"), dict):
            rec["dynamodb"]["SequenceNumber"] = seq(1, i)
        rec["eventID"] = f"bad-{n}"
        bad_seqs[seq(1, i)] = (why, copy.deepcopy(rec))
        records.append(rec)
        i += 1
    records.append(make_stream_record(event_name="REMOVE", keys={"pk": "ok-0"}, old_image={"pk": "ok-0"},
                                      sequence_number=seq(1, i)))
    fake = FakeStreams()
    shard = "shardId-00000001700000000000-0000000h"
    fake.add_shard(shard, records, closed=True)

    sinks = [
        OpenSearchSink("search", OpenSearchSink.Options(hosts=[opensearch_url], index="hx-malformed", refresh=True)),
        S3AuditSink("audit", S3AuditSink.Options(bucket=bucket, prefix="audit")),
        RedisCacheSink("cache", RedisCacheSink.Options(url=redis_server.url, key_templates=["c:{pk}", "v:{v}"])),
    ]
    rds = redis.Redis.from_url(redis_server.url)
    ok_keys = [f"c:ok-{n}" for n in range(len(bad))] + [f"v:{n}" for n in range(len(bad))]
    for key in ok_keys + [SENTINEL]:
        rds.set(key, "cached")

    worker = make_worker(fake, tmp_path, sinks, worker_id="hx", logger=structlog.get_logger("test_hostile_input"),
                         max_records=7, failover_time_s=1.0, shutdown_grace_s=10.0,
                         policies=fast_policies(sinks, initial_backoff_s=0.01, max_backoff_s=0.05), aws=aws,
                         exit_when_idle=True)
    assert run_to_idle(worker, timeout=60) == 0, worker.failed

    # every malformed record is a decode entry with its raw content and position
    entries = dead_letters(tmp_path / "dlq")
    decode = {e["position"]["sequence_number"]: e for e in entries if e["kind"] == "decode"}
    assert [e for e in entries if e["kind"] != "decode"] == [], "well-formed records must all be delivered"
    no_seq = [why for s, (why, rec) in bad_seqs.items() if not isinstance(rec.get("dynamodb"), dict)]
    with_seq = {s: v for s, v in bad_seqs.items() if isinstance(v[1].get("dynamodb"), dict)}
    assert set(with_seq) <= set(decode), sorted(set(with_seq) - set(decode))
    for s, (why, rec) in with_seq.items():
        entry = decode[s]
        assert entry["position"]["shard_id"] == shard and entry["position"]["stream_arn"] == STREAM_ARN
        assert entry["raw_record"]["eventID"] == rec["eventID"], why
        assert entry["raw_record"]["dynamodb"] == json.loads(json.dumps(rec["dynamodb"], default=str)) or \
            entry["raw_record"]["dynamodb"].get("Keys") == rec["dynamodb"].get("Keys"), why
        assert entry["error"], why
    unpositioned = [e for e in entries if e["kind"] == "decode" and e["position"]["sequence_number"] is None]
    assert len(unpositioned) == len(no_seq), (len(unpositioned), no_seq)
    assert len(decode) + len(unpositioned) - (1 if None in decode else 0) == len(bad)

    # the rest reached every sink
    good_events = [r for r in records if r["eventID"].startswith("evt-")]
    lines = read_audit_objects(s3, bucket, "audit")
    audited = {line["source"]["sequence_number"] for line in lines}
    assert audited == {r["dynamodb"]["SequenceNumber"] for r in good_events}
    docs = os_search_all(opensearch_url, "hx-malformed")
    assert set(docs) == {f"ok-{n}" for n in range(1, len(bad))}
    assert restore_document(docs["ok-1"]) == {"pk": "ok-1", "v": 1, "_id": "reserved", "a.b": "dot"}
    assert not [k for k in ok_keys if rds.exists(k)] and rds.exists(SENTINEL)


def _first_stream_record(make_table, name: str, item: dict) -> tuple[Any, dict, str]:
    """Put ``item`` into a fresh DynamoDB Local table; return (table, its first stream record, shard id)."""
    t = make_table(name)
    t.client.put_item(TableName=t.table_name, Item=item)
    streams = boto3.client("dynamodbstreams", endpoint_url=t.client.meta.endpoint_url, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
    shard = streams.describe_stream(StreamArn=t.stream_arn)["StreamDescription"]["Shards"][0]["ShardId"]
    it = streams.get_shard_iterator(StreamArn=t.stream_arn, ShardId=shard,
                                    ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    (record,) = streams.get_records(ShardIterator=it)["Records"]
    return t, record, shard


def test_empty_map_in_a_stream_record_decodes(make_table):
    from pipeline.codec import decode_record

    t, record, shard = _first_stream_record(make_table, "hx-emap", {"pk": S("e"), "emap": {"M": {}}})
    assert record["dynamodb"]["NewImage"]["emap"] == {}  # how DynamoDB Local's stream renders it
    ev = decode_record(record, table=t.table_name, stream_arn=t.stream_arn, shard_id=shard)
    assert ev.after["emap"] == {}


def test_numbers_with_more_than_38_integer_digits_decode(make_table):
    from pipeline.codec import decode_record

    t, record, shard = _first_stream_record(make_table, "hx-huge", {
        "pk": S("huge"), "e125": N("1E+125"), "big": N("9.9999999999999999999999999999999999999E+125"),
        "e38": N("1E+38"), "ns": {"NS": ["1E+125", "1"]}})
    assert record["dynamodb"]["NewImage"]["e125"]["N"] == "1" + "0" * 125  # how DynamoDB returns it
    ev = decode_record(record, table=t.table_name, stream_arn=t.stream_arn, shard_id=shard)
    assert ev.after["e125"] == Decimal("1E+125") and ev.after["e38"] == Decimal("1E+38")
    assert ev.after["big"] == Decimal("9.9999999999999999999999999999999999999E+125")
