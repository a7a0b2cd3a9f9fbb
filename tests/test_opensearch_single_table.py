"""A single-table workload through the worker (DynamoDB Local → ``ddb-cdc run`` → osmem-server),
fanned out to three OpenSearch sinks, one per mapping mode.

The table mixes entities the way single-table designs do: the attribute ``value`` holds S, N, M and
L across items, lists mix types, numbers run to 38 digits, 1E+125 and 1E-130, and the ``counts``
maps of the stats items are keyed by ids (5,000 distinct keys across items). ``explicit`` and
``typed`` must index every item exactly (zero dead letters); ``dynamic`` may refuse items, and
every refused change must be in the dead-letter directory with its images.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from connectors.sqlite_store import SQLiteLeaseStore
from connectors.embedded.verify import check_opensearch, read_stream_events
from connectors.embedded.workload import scan_items
from pipeline.codec import key_id
from tests.test_hostile_input import check_dead_letters, dead_letters
from tests.test_opensearch_modes import field_count, request

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BIG_INT = "98765432109876543210987654321098765432"
NUMBERS = [BIG_INT, "1E+125", "1E-130", "-7", "3.14159265358979323846264338327950288", "0"]
EXPLICIT_FIELDS = {"entity": "keyword", "value": "keyword", "score": "double", "total": "long",
                   "name": "text", "created": "date", "counts": "flat_object"}


def n(text: str) -> dict[str, str]:
    return {"N": text}


def user_item(i: int, generation: int) -> dict[str, Any]:
    """A USER entity: ``value`` cycles through S, N, M and L; numbers through the extremes."""
    kind = (i + generation) % 4
    value = [{"S": f"user {i} gen {generation}"}, n(NUMBERS[i % len(NUMBERS)]),
             {"M": {"nested": {"M": {"deep": n(NUMBERS[(i + 1) % len(NUMBERS)])}}, "s": {"S": "x"}}},
             {"L": [{"S": "a"}, n("1E-130"), {"BOOL": True}, {"M": {"k": {"S": "v"}}}, {"L": [{"NULL": True}]}]}][kind]
    return {
        "pk": {"S": f"USER#{i}"}, "sk": n(str(generation)), "entity": {"S": "user"},
        "value": value, "name": {"S": f"User Number {i}"},
        "score": n(NUMBERS[(i + generation) % len(NUMBERS)]),
        "total": n(NUMBERS[i % len(NUMBERS)]) if i % 3 else {"S": "n/a"},
        "tags": {"SS": [f"t{i % 5}", "all"]}, "blob": {"B": bytes([i % 256, 0, 255])},
        "created": {"S": f"2024-05-{1 + i % 28:02d}T12:00:00Z"} if i % 4 else {"S": "last tuesday"},
    }


def stats_item(k: int) -> dict[str, Any]:
    """A STATS entity: ``counts`` keyed by 100 ids of its own (5,000 across 50 items)."""
    return {"pk": {"S": f"STATS#{k}"}, "sk": n("0"), "entity": {"S": "stats"},
            "value": {"M": {f"id-{k}-{j}": n(str(j)) for j in range(100)}},
            "counts": {"M": {f"id-{k * 100 + j}": n(str(j)) for j in range(100)}}}


def write_workload(ddb: Any, table: str) -> None:
    for k in range(50):
        ddb.put_item(TableName=table, Item=stats_item(k))
    for i in range(60):
        ddb.put_item(TableName=table, Item=user_item(i, 0))
    for i in range(0, 60, 2):  # modify: the same key with new types in ``value`` and ``total``
        changed = user_item(i + 1, 0)
        changed["pk"], changed["sk"] = {"S": f"USER#{i}"}, n("0")
        ddb.put_item(TableName=table, Item=changed)
    for i in range(0, 60, 10):
        ddb.delete_item(TableName=table, Key={"pk": {"S": f"USER#{i}"}, "sk": n("0")})


def test_single_table_workload_in_every_mapping_mode(tmp_path, dynamodb_local, opensearch_url):
    creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    ddb = boto3.client("dynamodb", endpoint_url=dynamodb_local.endpoint, **creds)
    streams = boto3.client("dynamodbstreams", endpoint_url=dynamodb_local.endpoint, **creds)
    table = f"single-{os.urandom(4).hex()}"
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                           {"AttributeName": "sk", "AttributeType": "N"}],
                     StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"})
    stream_arn = ddb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
    write_workload(ddb, table)

    dead_dir = tmp_path / "dead-letter"
    checkpoints = tmp_path / "checkpoints.sqlite"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"table": table, "checkpoint_interval_s": 0.5, "idle_interval_ms": 100},
        "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(checkpoints)},
        "dead_letter": {"directory": str(dead_dir)},
        "log": {"format": "json"},
        "sinks": [
            {"name": "typed", "type": "opensearch", "options": {"hosts": [opensearch_url], "index": "typed-{table}"}},
            {"name": "explicit", "type": "opensearch",
             "options": {"hosts": [opensearch_url], "index": "explicit-{table}", "fields": EXPLICIT_FIELDS}},
            {"name": "dyn", "type": "opensearch",
             "options": {"hosts": [opensearch_url], "index": "dyn-{table}", "mapping": "dynamic"}},
        ],
    }))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "connectors.app.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    try:
        events = read_stream_events(streams, stream_arn, table)
        assert len(events) == 50 + 60 + 30 + 6
        last = events[-1].sequence_number
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            leases = SQLiteLeaseStore(str(checkpoints)).list_leases() if checkpoints.exists() else []
            if leases and all(lease.checkpoint == last for lease in leases):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"worker did not reach {last}; log: {log_path.read_text()[-3000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text[-3000:]

    items = scan_items(ddb, table)
    assert len(items) == 50 + 60 - 6
    key_of = lambda it: key_id({"pk": it["pk"], "sk": it["sk"]})  # noqa: E731
    failed = check_dead_letters(dead_letters(dead_dir), events)  # every entry holds its full event
    assert set(failed) <= {"dyn"}, f"typed and explicit must dead-letter nothing: {sorted(failed)}"

    for mode in ("typed", "explicit"):
        alias = f"{mode}-{table}"
        result = check_opensearch(opensearch_url, alias, items, key_of)
        assert result.ok, (mode, result.summary, result.problems)
        (body,) = request(opensearch_url, "GET", f"/{alias}/_mapping").values()
        assert field_count(body["mappings"]) < 200, (mode, field_count(body["mappings"]))  # 5,000 map keys
    explicit_docs = request(opensearch_url, "POST", f"/explicit-{table}/_search",
                            {"query": {"exists": {"field": "_cdc.malformed"}}, "size": 1000})
    assert explicit_docs["hits"]["total"]["value"] > 0  # values that did not fit were noted, not refused

    # dynamic: OpenSearch refuses the conflicting items; each refused change is a dead letter with
    # its images, and every item of the table is either in the index as it is, or dead-lettered
    dyn_failed = failed.get("dyn", set())
    assert dyn_failed, "the dynamic mapping should refuse some of this workload"
    by_seq = {ev.sequence_number: ev for ev in events}
    refused_keys = {by_seq[s].key_id for s in dyn_failed}
    assert all(by_seq[s].after is not None for s in dyn_failed)
    dyn = check_opensearch(opensearch_url, f"dyn-{table}", [it for it in items if key_of(it) not in refused_keys],
                           key_of)
    missing_or_extra = [p for p in dyn.problems if "not in the table" not in p]
    assert not missing_or_extra, missing_or_extra
