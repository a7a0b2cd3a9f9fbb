"""``source.initial_snapshot: true`` on DynamoDB Local: a table of 20,000 items, writers updating
and deleting items while the snapshot runs, the stream consumed meanwhile → OpenSearch equals the
table at the end, every document at the right version (the item's last stream change when one was
made after the snapshot started, else the snapshot's version), S3 holds every scanned item once."""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
import uuid

import boto3
import pytest
import structlog
import yaml

from connectors.app.wiring import build_worker
from connectors.embedded.verify import read_stream_events
from connectors.snapshot.initial import start_for_worker
from pipeline.config import Settings
from tests.helpers import wait_until
from tests.snapshot_helpers import audit_lines, fill_table, item, os_docs, scan_all
from tests.test_snapshot_scan import CREDS, write_config

LOG = structlog.get_logger()
#: concurrent changes at most (each writer stops there). osmem-server (the test OpenSearch)
#: re-indexes or deletes an existing document at a cost that grows with the index: ~30 ms each in
#: these 20,000 documents (200 updates in one bulk: 6 s; 200 inserts: 0.1 s), and it serves one
#: request at a time, so every concurrent change slows the snapshot's bulks too. 3,000 changes made
#: this test take 4 minutes; 400 still exercise every join rule (updates, deletes, new items, items
#: both scanned and changed) many times.
MAX_CHANGES = 400
#: 20,000 (issue 17); DDB_CDC_SNAPSHOT_TEST_ITEMS lowers it for a quick local run
ITEMS = int(os.environ.get("DDB_CDC_SNAPSHOT_TEST_ITEMS", "20000"))


def _rev(source: dict) -> str:
    """``rev`` of a document as decimal text (the sink may keep numbers typed, ``{"N": "3"}``)."""
    value = source.get("rev")
    return str(value["N"] if isinstance(value, dict) else value)


def _writer(client, table: str, stop: threading.Event, revs: itertools.count, seed: int, ops: list) -> None:
    rng = random.Random(seed)
    while not stop.is_set() and len(ops) < MAX_CHANGES:
        time.sleep(0.1)  # ~10 changes/s per writer
        i = rng.randrange(ITEMS + 500)  # some new items too
        if rng.random() < 0.3:
            key = item(i)
            client.delete_item(TableName=table, Key={"pk": key["pk"], "sk": key["sk"]})
            ops.append(("delete", i))
        else:
            client.put_item(TableName=table, Item=item(i, rev=next(revs)))
            ops.append(("put", i))


@pytest.mark.timeout(2400)  # osmem on a loaded 2-core machine indexes ~40-100 small documents/s
def test_initial_snapshot_joined_with_the_stream(tmp_path, aws_env, make_table, moto_server, opensearch_url):
    made = make_table("join", range_key=("sk", "N"))
    t = time.monotonic()
    fill_table(made.client, made.table_name, ITEMS, threads=6)
    fill_s = time.monotonic() - t
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
    bucket = f"audit-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    index = f"join-{uuid.uuid4().hex[:6]}"
    cfg = write_config(tmp_path, table=made.table_name, ddb=made.client.meta.endpoint_url, s3=moto_server.endpoint,
                       bucket=bucket, os_url=opensearch_url, index=index, start_position="LATEST",
                       initial_snapshot=True, snapshot_max_rcu=0, snapshot_segments=4, checkpoint_interval_s=0.5,
                       idle_interval_ms=50, discovery_interval_s=5)
    settings = Settings(**yaml.safe_load(cfg.read_text()))
    worker = build_worker(settings, logger=LOG)
    initial = start_for_worker(settings, worker, logger=LOG)
    assert initial is not None
    code: dict = {}
    thread = threading.Thread(target=lambda: code.setdefault("rc", worker.run()), daemon=True)
    thread.start()
    stop = threading.Event()
    ops: list = []
    writers = []
    try:
        wait_until(lambda: initial.state == "running", "the snapshot started after the stream position", timeout=120,
                   interval=0.1)
        revs = itertools.count(1)
        writers = [threading.Thread(target=_writer, args=(boto3.client("dynamodb", endpoint_url=made.client.meta.endpoint_url,
                                                                       **CREDS), made.table_name, stop, revs, n, ops),
                                    daemon=True) for n in range(2)]
        for w in writers:
            w.start()
        wait_until(lambda: initial.state in ("done", "failed", "stopped"), "the snapshot ended", timeout=2000,
                   interval=0.5)
        ops_during = len(ops)
        time.sleep(1.0)
        stop.set()
        for w in writers:
            w.join(30)
        assert initial.state == "done", initial.report
        report = initial.report
        assert report.items >= ITEMS * 0.8 and report.dead_lettered == 0 and report.sink_dead_lettered == 0
        assert ops_during > 100, f"writers changed only {ops_during} items during the snapshot"

        table = scan_all(made.client, made.table_name)

        def converged() -> bool:
            docs = os_docs(opensearch_url, index)
            return set(docs) == set(table) and all(_rev(src) == table[k]["rev"]["N"] for k, (_, src) in docs.items())

        wait_until(converged, "OpenSearch equals the table", timeout=600, interval=5.0)
    finally:
        stop.set()
        worker.stop()
        thread.join(120)
        initial.stop()
    assert code.get("rc") == 0

    # versions: the last stream change made after the snapshot started, else the snapshot's version
    writer_events = [e for e in read_stream_events(boto3.client("dynamodbstreams",
                                                                endpoint_url=made.client.meta.endpoint_url, **CREDS),
                                                   made.stream_arn, made.table_name)
                     if e.operation.value == "REMOVE" or int((e.after or {}).get("rev", 0)) > 0]
    assert len(writer_events) <= len(ops)  # deleting an absent item writes no stream record
    last_stream: dict[str, int] = {}
    for e in writer_events:
        last_stream[e.key_id] = max(last_stream.get(e.key_id, 0), e.version)
    # what the stream consumer delivered (its S3 audit objects): a LATEST start on DynamoDB Local is
    # pinned by timestamp, rounded to the minute, so it may also deliver the last fill records
    delivered: dict[str, int] = {}
    for key, line in audit_lines(s3, bucket, f"audit/{made.table_name}/dt="):
        delivered[line["key_id"]] = max(delivered.get(line["key_id"], 0), line["version"])
    assert set(last_stream) <= set(delivered), "the consumer delivered every writer change"
    lines = audit_lines(s3, bucket, f"audit/{made.table_name}/snapshot=")
    scanned = [line["key_id"] for _, line in lines]
    assert len(scanned) == len(set(scanned)) == report.items, "S3 holds every scanned item once"
    assert all(line["version"] == report.version and line["op"] == "r" for _, line in lines)
    docs = os_docs(opensearch_url, index)
    scanned_set = set(scanned)
    wrong = {}
    for key in table:
        expected = max(delivered.get(key, 0), report.version if key in scanned_set else 0)
        if docs[key][0] != expected:
            wrong[key] = (docs[key][0], expected)
    assert not wrong, f"{len(wrong)} documents at a wrong version, e.g. {list(wrong.items())[:3]}"
    assert min(last_stream.values()) > report.version, "every change made after the scan started outranks it"
    changed_and_scanned = set(last_stream) & set(scanned)
    assert changed_and_scanned, "the test must exercise items both scanned and changed"
    print(f"fill {fill_s:.1f} s, snapshot {report.items} items in {report.elapsed_s:.1f} s, "
          f"{len(ops)} concurrent changes, {len(changed_and_scanned)} items both scanned and changed")
