"""The AWS Lambda handler (issue 18 item 1), invoked in-process with events built from REAL
DynamoDB Local stream records (GetRecords output → Lambda's JSON shape by
:func:`connectors.aws_lambda.event.lambda_event`), delivering into real osmem-server, moto S3 and
redis-server.

- the conversion: every real record decodes to the same change event in both shapes;
- equal end state: the worker (in-process, SQLite lease store) and the handler (batches of 25,
  like an event source mapping with BatchSize 25) leave equal OpenSearch documents (same external
  versions), equal S3 audit lines and the same Redis keys;
- fail-fast: a sink refusing one document mid-batch → exactly that record and every later one are
  reported; sinks after it got only the earlier records; the re-invocation with the reported
  records converges to the same end state;
- poison records (cannot be decoded; permanently refused) go to the S3 dead-letter destination
  with the full record / event and images, and are not reported;
- the entry point: settings from a YAML file + env vars, sinks opened once per execution
  environment and reused; SIGTERM closes them (subprocess).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
import yaml

from connectors.app.wiring import build_worker
from connectors.aws_lambda import handler as handler_module
from connectors.aws_lambda.event import UNKNOWN_SHARD_ID, lambda_event, lambda_record, parse_event
from connectors.aws_lambda.handler import LambdaApp, LambdaOptions
from connectors.embedded.workload import CACHE_KEY_TEMPLATES, Workload, create_table, write_changes
from connectors.opensearch.sink import OpenSearchSink
from connectors.s3.audit import read_audit_objects
from connectors.s3.deadletter import S3DeadLetterQueue
from pipeline.codec import decode_record
from pipeline.config import Settings
from pipeline.errors import LambdaEventError, PartialSinkError
from pipeline.logs import get_logger
from pipeline.registry import build_sinks
from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
CREDS = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
BATCH_SIZE = 25


class Context:
    """The parts of Lambda's context object the handler reads."""

    def __init__(self, remaining_ms: int = 60_000):
        self.deadline = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = uuid.uuid4().hex

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


class Stack:
    """One table with a stream in DynamoDB Local, a bucket in moto, a fresh osmem, redis."""

    def __init__(self, tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server):
        self.tmp = tmp_path
        self.ddb = boto3.client("dynamodb", endpoint_url=dynamodb_local.endpoint, **CREDS)
        self.streams = boto3.client("dynamodbstreams", endpoint_url=dynamodb_local.endpoint, **CREDS)
        self.s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
        self.table = f"lam-{uuid.uuid4().hex[:8]}"
        self.stream_arn = create_table(self.ddb, self.table)
        self.bucket = f"lam-{uuid.uuid4().hex[:8]}"
        self.s3.create_bucket(Bucket=self.bucket)
        self.os_url = opensearch_url
        self.redis_url = redis_server.url.rstrip("/")
        self.aws = {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint,
                    "s3_endpoint_url": moto_server.endpoint}

    def settings(self, flavour: str, *, on_failure: str = "block", retry_budget_s: float = 300.0) -> Settings:
        """Settings for ``flavour`` "worker" or "lambda": same sinks, own index / prefix / redis db."""
        db = 0 if flavour == "worker" else 1
        return Settings(
            source={"table": self.table, "checkpoint_interval_s": 0.5, "idle_interval_ms": 50,
                    "discovery_interval_s": 5},
            aws=self.aws,
            checkpoints={"store": "sqlite", "sqlite_path": str(self.tmp / f"{flavour}.sqlite")},
            dead_letter=({"directory": str(self.tmp / "worker-dlq")} if flavour == "worker"
                         else {"directory": None, "s3_uri": f"s3://{self.bucket}/dlq"}),
            sinks=[
                {"name": "search", "type": "opensearch", "on_failure": on_failure, "retry_budget_s": retry_budget_s,
                 "options": {"hosts": [self.os_url], "index": f"{flavour}-idx"}},
                {"name": "audit", "type": "s3_audit",
                 "options": {"bucket": self.bucket, "prefix": f"{flavour}-audit", "max_buffer_age_s": 3600}},
                {"name": "cache", "type": "redis_cache",
                 "options": {"url": f"{self.redis_url}/{db}", "key_templates": CACHE_KEY_TEMPLATES}},
            ],
        )

    def write(self, count: int, seed: int = 18) -> None:
        write_changes(self.ddb, self.table, Workload(seed=seed, items=40), count)

    def get_records(self) -> tuple[str, list[dict[str, Any]]]:
        """(shard id, every record of the stream's one shard) as GetRecords returns them."""
        shard = self.streams.describe_stream(StreamArn=self.stream_arn)["StreamDescription"]["Shards"][0]["ShardId"]
        it = self.streams.get_shard_iterator(StreamArn=self.stream_arn, ShardId=shard,
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records: list[dict[str, Any]] = []
        while it:
            resp = self.streams.get_records(ShardIterator=it, Limit=1000)
            if not resp["Records"]:
                break
            records.extend(resp["Records"])
            it = resp.get("NextShardIterator")
        return shard, records

    def events(self, records: list[dict[str, Any]], size: int = BATCH_SIZE) -> list[dict[str, Any]]:
        return [lambda_event(records[i:i + size], stream_arn=self.stream_arn)
                for i in range(0, len(records), size)]

    def preload_cache(self) -> None:
        wl = Workload(seed=18, items=40)
        for db in (0, 1):
            client = redis.Redis.from_url(f"{self.redis_url}/{db}")
            for index in range(40):
                key = wl.key(index)
                client.set(f"item:{key['pk']}:{key['sk']}", "cached")
                client.set(f"user:{key['pk']}", "cached")
                for n in range(10):
                    client.set(f"email:u{index}.{n}@example.com", "cached")
            client.set("unrelated:sentinel", "keep me")

    def run_worker(self, last_sequence_number: str) -> None:
        """The worker, in-process, until its checkpoint reaches ``last_sequence_number``."""
        from connectors.sqlite_store import SQLiteLeaseStore

        settings = self.settings("worker")
        worker = build_worker(settings, logger=get_logger(test="lambda-worker"))
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        store = SQLiteLeaseStore(settings.checkpoints.sqlite_path)
        try:
            wait_until(lambda: any(l.checkpoint == last_sequence_number for l in _leases(store)),
                       "the worker checkpointed the last record", timeout=180, interval=0.3)
        finally:
            worker.stop()
            thread.join(60)
        assert not thread.is_alive()

    # -- end state ---------------------------------------------------------------------------

    def documents(self, index: str) -> dict[str, tuple[int, dict]]:
        """_id → (_version, _source without _cdc.shard_id)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.os_url}/{index}/_refresh", method="POST"), timeout=30)
        with urllib.request.urlopen(f"{self.os_url}/{index}/_search?size=10000&version=true", timeout=30) as resp:
            hits = json.loads(resp.read())["hits"]["hits"]
        out = {}
        for hit in hits:
            source = hit["_source"]
            source.get("_cdc", {}).pop("shard_id", None)
            out[hit["_id"]] = (hit["_version"], source)
        return out

    def audit(self, flavour: str) -> dict[str, dict]:
        """sequence number → audit line without source.shard_id (one line per sequence number)."""
        lines: dict[str, dict] = {}
        for line in read_audit_objects(self.s3, self.bucket, f"{flavour}-audit/"):
            line = copy.deepcopy(line)
            line["source"].pop("shard_id", None)
            seq = line["source"]["sequence_number"]
            assert lines.setdefault(seq, line) == line, f"two different audit lines for {seq}"
        return lines

    def cache_keys(self, db: int) -> set[bytes]:
        return set(redis.Redis.from_url(f"{self.redis_url}/{db}").keys("*"))

    def dead_letters(self) -> list:
        return list(S3DeadLetterQueue(Settings.model_fields["aws"].annotation(**self.aws),
                                      f"s3://{self.bucket}/dlq", client=self.s3).list())


def _leases(store) -> list:
    try:
        return store.list_leases()
    except Exception:  # the worker has not created the table yet
        return []


@pytest.fixture
def stack(tmp_path, aws_env, dynamodb_local, moto_server, opensearch_url, redis_server):
    return Stack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server)


def _app(stack: Stack, *, sinks=None, on_failure: str = "block", retry_budget_s: float = 300.0,
         **options) -> LambdaApp:
    settings = stack.settings("lambda", on_failure=on_failure, retry_budget_s=retry_budget_s)
    return LambdaApp(settings, sinks=sinks, options=LambdaOptions(**options), install_sigterm=False,
                     logger=get_logger(test="lambda"))


class RefusingOpenSearch(OpenSearchSink):
    """The real OpenSearch sink, but the document of ``refused_key`` is refused as OpenSearch
    refuses a document under pressure (a per-item 429 in a bulk response: retriable), while
    ``refusing`` is set; every other event of the batch is written for real."""

    refused_key: str | None = None
    refusing = True
    refusals = 0

    def write(self, batch):
        refused = [ev for ev in batch.events if self.refusing and ev.key_id == self.refused_key]
        super().write(replace(batch, events=tuple(ev for ev in batch.events if ev not in refused)))
        if refused:
            type(self).refusals += 1
            raise PartialSinkError("bulk: 1 document refused",
                                   retriable=[(ev, "429 es_rejected_execution_exception (injected)") for ev in refused])


class PermanentlyRefusingOpenSearch(OpenSearchSink):
    """The real OpenSearch sink; the events of ``refused_key`` are refused permanently (a
    mapping conflict: HTTP 400 for that document)."""

    refused_key: str | None = None

    def write(self, batch):
        refused = [ev for ev in batch.events if ev.key_id == self.refused_key]
        super().write(replace(batch, events=tuple(ev for ev in batch.events if ev not in refused)))
        if refused:
            raise PartialSinkError("bulk: document refused",
                                   permanent=[(ev, "400 mapper_parsing_exception (injected)") for ev in refused])


def _sinks_with(stack: Stack, search_cls: type) -> list:
    settings = stack.settings("lambda")
    sinks = build_sinks(settings.sinks, "test")
    search = search_cls("search", sinks[0].options)
    return [search, *sinks[1:]]


# ------------------------------------------------------------------------------------------------


def test_lambda_shape_of_real_records_decodes_to_the_same_events(stack):
    """The documented conversion: every real DynamoDB Local record (binary values, sets, nested
    maps, 38-digit numbers) in Lambda's shape — B as base64 text, ApproximateCreationDateTime as
    epoch seconds, eventSourceARN — decodes to the change event the GetRecords shape gives."""
    stack.write(60)
    shard, records = stack.get_records()
    assert len(records) == 60
    event = lambda_event(records, stream_arn=stack.stream_arn)
    json.dumps(event)  # JSON all the way down, as Lambda delivers it
    first = event["Records"][0]
    assert isinstance(first["dynamodb"]["ApproximateCreationDateTime"], float)
    assert first["eventSourceARN"] == stack.stream_arn and first["eventSource"] == "aws:dynamodb"
    blobs = [v["B"] for r in event["Records"] for v in (r["dynamodb"].get("NewImage") or {}).values() if "B" in v]
    assert blobs and all(isinstance(b, str) for b in blobs)
    parsed, shard_id = parse_event(event)
    assert shard_id is None and [p.table for p in parsed] == [stack.table] * 60
    for raw, rec in zip(records, parsed):
        from_api = decode_record(raw, table=stack.table, stream_arn=stack.stream_arn, shard_id=shard)
        from_lambda = decode_record(rec.record, table=rec.table, stream_arn=rec.stream_arn, shard_id=shard)
        assert from_lambda == from_api
        assert rec.sequence_number == raw["dynamodb"]["SequenceNumber"]


def test_ttl_identity_survives_the_lambda_shape():
    record = {"eventID": "1", "eventName": "REMOVE",
              "dynamodb": {"Keys": {"pk": {"S": "a"}}, "SequenceNumber": "1" * 21, "SizeBytes": 5,
                           "StreamViewType": "KEYS_ONLY", "ApproximateCreationDateTime": 1_700_000_000},
              "userIdentity": {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}}
    arn = "arn:aws:dynamodb:us-east-1:123456789012:table/t1/stream/2024-01-01T00:00:00.000"
    converted = lambda_record(record, stream_arn=arn)
    assert converted["userIdentity"] == {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    (rec,), _ = parse_event({"Records": [converted]})
    assert decode_record(rec.record, table="t1", stream_arn=arn, shard_id="s").source.ttl_delete


def test_equal_end_state_to_the_worker(stack):
    """Worker and handler over the same real stream records: equal documents (with equal
    external versions), equal audit lines, the same cache keys left; nothing dead-lettered."""
    stack.write(150)
    stack.preload_cache()
    _, records = stack.get_records()
    assert len(records) == 150
    stack.run_worker(records[-1]["dynamodb"]["SequenceNumber"])

    app = _app(stack)
    try:
        for event in stack.events(records):
            assert app.handle(event, Context()) == {"batchItemFailures": []}
    finally:
        app.close()

    worker_docs, lambda_docs = stack.documents("worker-idx"), stack.documents("lambda-idx")
    assert worker_docs and lambda_docs == worker_docs
    worker_audit, lambda_audit = stack.audit("worker"), stack.audit("lambda")
    assert len(worker_audit) == 150 and lambda_audit == worker_audit
    assert stack.cache_keys(1) == stack.cache_keys(0)
    assert b"unrelated:sentinel" in stack.cache_keys(1)
    assert stack.dead_letters() == []
    # the audit objects are keyed by the shard id the Lambda event does not carry
    keys = [o["Key"] for o in stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix="lambda-audit/")["Contents"]]
    assert all(f"/{UNKNOWN_SHARD_ID}/" in k for k in keys)


def test_fail_fast_reports_the_refused_record_and_every_later_one_then_converges(stack):
    """One sink refuses one document mid-batch (retriable, every time): exactly that record and
    every later record of the batch are batchItemFailures; the sinks after it got only the earlier
    records; re-invoking with the reported records (what Lambda re-sends) converges to the state
    of an undisturbed run."""
    stack.write(BATCH_SIZE)
    _, records = stack.get_records()
    assert len(records) == BATCH_SIZE
    refused_at = 10
    event = lambda_event(records, stream_arn=stack.stream_arn)
    parsed, _ = parse_event(event)
    refused_key = decode_record(parsed[refused_at].record, table=stack.table, stream_arn=stack.stream_arn,
                                shard_id="x").key_id
    # the first record of that item inside the batch is where delivery must stop
    refused_at = next(i for i, p in enumerate(parsed)
                      if decode_record(p.record, table=stack.table, stream_arn=stack.stream_arn,
                                       shard_id="x").key_id == refused_key)
    RefusingOpenSearch.refused_key, RefusingOpenSearch.refusing, RefusingOpenSearch.refusals = refused_key, True, 0
    app = _app(stack, sinks=_sinks_with(stack, RefusingOpenSearch), deadline_margin_s=0.5, flush_reserve_s=3)
    try:
        result = app.handle(event, Context(remaining_ms=6_000))
        expected = [r["dynamodb"]["SequenceNumber"] for r in records[refused_at:]]
        assert result == {"batchItemFailures": [{"itemIdentifier": seq} for seq in expected]}
        assert RefusingOpenSearch.refusals >= 2  # it was retried within the invocation's budget
        # the audit sink (after the refusing one) holds exactly the records before the failure
        assert sorted(stack.audit("lambda"), key=int) == [r["dynamodb"]["SequenceNumber"] for r in records[:refused_at]]
        assert stack.dead_letters() == []

        # Lambda checkpoints before the lowest reported sequence number and re-sends from it
        RefusingOpenSearch.refusing = False
        retry = lambda_event(records[refused_at:], stream_arn=stack.stream_arn)
        assert app.handle(retry, Context()) == {"batchItemFailures": []}
    finally:
        app.close()

    # an undisturbed run of the same records into the worker's index / prefix / db is the reference
    reference = LambdaApp(stack.settings("worker"), options=LambdaOptions(), install_sigterm=False,
                          dead_letter=S3DeadLetterQueue(Settings.model_fields["aws"].annotation(**stack.aws),
                                                        f"s3://{stack.bucket}/dlq-ref", client=stack.s3))
    try:
        assert reference.handle(event, Context()) == {"batchItemFailures": []}
    finally:
        reference.close()
    assert stack.documents("lambda-idx") == stack.documents("worker-idx")
    assert stack.audit("lambda") == stack.audit("worker")
    assert len(stack.audit("lambda")) == BATCH_SIZE


def test_deadline_reports_everything_when_the_first_record_cannot_be_delivered(stack):
    stack.write(5)
    _, records = stack.get_records()
    event = lambda_event(records, stream_arn=stack.stream_arn)
    parsed, _ = parse_event(event)
    RefusingOpenSearch.refused_key = decode_record(parsed[0].record, table=stack.table,
                                                   stream_arn=stack.stream_arn, shard_id="x").key_id
    RefusingOpenSearch.refusing = True
    app = _app(stack, sinks=_sinks_with(stack, RefusingOpenSearch), deadline_margin_s=0.5, flush_reserve_s=2)
    try:
        result = app.handle(event, Context(remaining_ms=4_000))
    finally:
        app.close()
    assert [f["itemIdentifier"] for f in result["batchItemFailures"]] == [r["dynamodb"]["SequenceNumber"] for r in records]
    assert stack.audit("lambda") == {}


def test_poison_records_are_dead_lettered_with_full_content_and_not_reported(stack):
    """A record that cannot be decoded and a record a sink refuses permanently: both in the S3
    dead-letter destination (the raw record with its images; the full event with before/after),
    both handled (no batchItemFailures), every other record delivered."""
    stack.write(12)
    _, records = stack.get_records()
    event = lambda_event(records, stream_arn=stack.stream_arn)
    bad = event["Records"][4]
    image = bad["dynamodb"].get("NewImage") or bad["dynamodb"]["OldImage"]
    image["count"] = {"N": "not-a-number"}
    parsed, _ = parse_event(event)
    victim = next(i for i in range(6, 12) if parsed[i].record["eventName"] != "REMOVE")
    PermanentlyRefusingOpenSearch.refused_key = decode_record(
        parsed[victim].record, table=stack.table, stream_arn=stack.stream_arn, shard_id="x").key_id
    app = _app(stack, sinks=_sinks_with(stack, PermanentlyRefusingOpenSearch))
    try:
        assert app.handle(event, Context()) == {"batchItemFailures": []}
    finally:
        app.close()
    entries = {e.kind: e for e in stack.dead_letters()}
    decode = entries["decode"]
    assert decode.sequence_number == records[4]["dynamodb"]["SequenceNumber"]
    assert decode.raw_record["dynamodb"]["Keys"] == bad["dynamodb"]["Keys"]
    assert decode.raw_record["dynamodb"].get("NewImage") == bad["dynamodb"].get("NewImage")
    assert decode.raw_record["dynamodb"].get("OldImage") == bad["dynamodb"].get("OldImage")
    delivery = entries["delivery"]
    assert delivery.sink == "search" and delivery.table == stack.table
    assert delivery.event["after"] or delivery.event["before"]
    # every record but the undecodable one reached the audit sink
    assert len(stack.audit("lambda")) == 11


def test_event_errors_fail_the_invocation(stack):
    app = _app(stack)
    try:
        with pytest.raises(LambdaEventError, match="Records"):
            app.handle({"hello": "world"}, Context())
        other = "arn:aws:dynamodb:us-east-1:123456789012:table/someone-else/stream/2024-01-01T00:00:00.000"
        with pytest.raises(LambdaEventError, match="someone-else"):
            app.handle({"Records": [{"eventSourceARN": other, "eventName": "INSERT", "dynamodb": {}}]}, Context())
        assert app.handle({"Records": []}, Context()) == {"batchItemFailures": []}
    finally:
        app.close()


def test_entry_point_reads_yaml_and_env_and_reuses_sinks_across_warm_invocations(stack, monkeypatch, tmp_path):
    stack.write(30)
    _, records = stack.get_records()
    settings = stack.settings("lambda").model_dump(mode="json", exclude={"worker"})
    config = tmp_path / "ddb-cdc.yaml"
    settings["source"] = {"table": "not-this-one"}
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))  # the bundled file, found without DDB_CDC_CONFIG
    monkeypatch.delenv("DDB_CDC_CONFIG", raising=False)
    monkeypatch.setenv("DDB_CDC_SOURCE__TABLE", stack.table)  # an env var wins over the file
    from connectors.redis_cache import RedisCacheSink
    from connectors.s3.audit import S3AuditSink

    opens: list[str] = []
    for cls in (OpenSearchSink, S3AuditSink, RedisCacheSink):
        def counting_open(self, context, _orig=cls.open):
            opens.append(self.name)
            return _orig(self, context)
        monkeypatch.setattr(cls, "open", counting_open)
    handler_module.reset_app()
    try:
        first_app = None
        for event in stack.events(records, size=10):
            assert handler_module.handler(event, Context()) == {"batchItemFailures": []}
            app = handler_module.get_app()
            first_app = first_app or app
            assert app is first_app
        assert first_app.invocations == 3
        assert sorted(opens) == ["audit", "cache", "search"]  # opened once, at the cold start
        assert handler_module.handler(stack.events(records[:1])[0], Context()) == {"batchItemFailures": []}
        assert sorted(opens) == ["audit", "cache", "search"] and not first_app.closed
    finally:
        handler_module.reset_app()
    assert first_app.closed
    assert len(stack.audit("lambda")) == 30


SIGTERM_SCRIPT = r"""
import json, os, signal, sys, time
from pipeline.config import Settings
from pipeline.testing import RecordingSink
from connectors.aws_lambda.handler import LambdaApp

class MarkingSink(RecordingSink):
    def close(self):
        super().close()
        open(sys.argv[1], "w").write("closed")

class NoDeadLetters:
    def put(self, entry): raise AssertionError("no dead letter expected")

settings = Settings(source={"table": "t1"}, sinks=[{"name": "mark", "type": "opensearch",
                    "options": {"hosts": ["http://127.0.0.1:1"], "index": "x"}}])
app = LambdaApp(settings, sinks=[MarkingSink("mark")], dead_letter=NoDeadLetters())
arn = "arn:aws:dynamodb:us-east-1:123456789012:table/t1/stream/2024-01-01T00:00:00.000"
event = {"Records": [{"eventID": "1", "eventName": "INSERT", "eventSourceARN": arn,
         "dynamodb": {"Keys": {"pk": {"S": "a"}}, "NewImage": {"pk": {"S": "a"}, "b": {"B": "AAE="}},
                      "SequenceNumber": "100000000000000000001", "SizeBytes": 9,
                      "StreamViewType": "NEW_AND_OLD_IMAGES", "ApproximateCreationDateTime": 1700000000}}]}
print("RESULT " + json.dumps(app.handle(event, None)), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
print("not terminated", flush=True)
"""


def test_sigterm_closes_the_sinks_then_terminates(tmp_path):
    marker = tmp_path / "closed"
    proc = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, str(marker)], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert json.loads(result[len("RESULT "):]) == {"batchItemFailures": []}
    assert "not terminated" not in proc.stdout
    assert marker.read_text() == "closed"


def test_budgets_leave_time_for_the_flush():
    options = LambdaOptions(deadline_margin_s=3, flush_reserve_s=10)
    assert options.budgets(60) == (47, 10)
    assert options.budgets(9) == (3, 3)
    assert options.budgets(1) == (0, 0)


def test_a_flush_that_fails_reports_every_record_and_the_retry_converges(stack):
    """The audit bucket vanishes after the cold start: the flush fails, so nothing of the
    invocation is known to be durable — every record is reported and the audit buffer is dropped;
    once the bucket is back, the re-sent batch converges."""
    stack.write(8)
    _, records = stack.get_records()
    event = lambda_event(records, stream_arn=stack.stream_arn)
    app = _app(stack, deadline_margin_s=0.5, flush_reserve_s=2)
    try:
        stack.s3.delete_bucket(Bucket=stack.bucket)
        result = app.handle(event, Context(remaining_ms=5_000))
        assert [f["itemIdentifier"] for f in result["batchItemFailures"]] == \
            [r["dynamodb"]["SequenceNumber"] for r in records]
        assert app.sinks[1].pending_events() == 0  # discarded: the retried batch starts clean
        stack.s3.create_bucket(Bucket=stack.bucket)
        assert app.handle(event, Context()) == {"batchItemFailures": []}
    finally:
        app.close()
    assert sorted(stack.audit("lambda"), key=int) == [r["dynamodb"]["SequenceNumber"] for r in records]


def test_retried_and_bisected_batches_are_harmless(stack):
    """Lambda may send a batch again (a retry) or in halves (BisectBatchOnFunctionError): with the
    same external versions, the documents, audit lines and versions do not change."""
    stack.write(BATCH_SIZE)
    _, records = stack.get_records()
    event = lambda_event(records, stream_arn=stack.stream_arn)
    app = _app(stack)
    try:
        assert app.handle(event, Context()) == {"batchItemFailures": []}
        once_docs, once_audit = stack.documents("lambda-idx"), stack.audit("lambda")
        half = len(records) // 2
        for again in (event, lambda_event(records[:half], stream_arn=stack.stream_arn),
                      lambda_event(records[half:], stream_arn=stack.stream_arn), event):
            assert app.handle(again, Context()) == {"batchItemFailures": []}
    finally:
        app.close()
    assert stack.documents("lambda-idx") == once_docs
    assert stack.audit("lambda") == once_audit and len(once_audit) == BATCH_SIZE


@pytest.mark.parametrize("arn", ["", "arn:aws:kinesis:us-east-1:1:stream/x", "arn:aws:dynamodb:us-east-1:1:table/t",
                                 "not an arn", None])
def test_a_non_dynamodb_stream_arn_is_an_event_error(arn):
    from connectors.aws_lambda.event import table_from_stream_arn

    with pytest.raises(LambdaEventError, match="DynamoDB stream ARN"):
        table_from_stream_arn(arn)


def test_on_failure_dead_letter_dead_letters_the_refused_record_within_the_invocation(stack):
    """The sink's own policy applies as in the worker: with ``on_failure: dead_letter`` and a retry
    budget shorter than the invocation's, the record the sink keeps refusing is dead-lettered with
    its images, nothing is reported, and every other record reaches every sink."""
    stack.write(10)
    _, records = stack.get_records()
    event = lambda_event(records, stream_arn=stack.stream_arn)
    parsed, _ = parse_event(event)
    refused = decode_record(parsed[3].record, table=stack.table, stream_arn=stack.stream_arn, shard_id="x")
    RefusingOpenSearch.refused_key, RefusingOpenSearch.refusing = refused.key_id, True
    app = _app(stack, sinks=_sinks_with(stack, RefusingOpenSearch), on_failure="dead_letter", retry_budget_s=1.0)
    try:
        assert app.handle(event, Context(remaining_ms=30_000)) == {"batchItemFailures": []}
    finally:
        app.close()
    entries = stack.dead_letters()
    assert entries and {e.kind for e in entries} == {"delivery"} and {e.sink for e in entries} == {"search"}
    assert all(e.event["keys"] for e in entries)
    assert len(stack.audit("lambda")) == 10  # the sinks after it got every record
