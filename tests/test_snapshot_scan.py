"""``ddb-cdc snapshot`` against DynamoDB Local, moto S3 and osmem: every item delivered once per
snapshot as a SNAPSHOT event with the snapshot's version, pages never dropped, a dry run changes
nothing, the report adds up."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import yaml

from connectors.app.cli import main
from pipeline.snapshot.version import snapshot_version
from tests.snapshot_helpers import audit_lines, fill_table, os_docs, scan_all

CREDS = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")


def write_config(tmp_path: Path, *, table: str, ddb: str, s3: str, bucket: str, os_url: str | None,
                 index: str = "snap", **source: Any) -> Path:
    sinks = [{"name": "audit", "type": "s3_audit", "options": {"bucket": bucket, "prefix": "audit"}}]
    if os_url:
        sinks.append({"name": "search", "type": "opensearch", "options": {"hosts": [os_url], "index": index}})
    config = {
        "source": {"table": table, **source},
        "aws": {"region": "us-east-1", "dynamodb_endpoint_url": ddb, "s3_endpoint_url": s3},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite")},
        "dead_letter": {"directory": str(tmp_path / "dead-letter")},
        "sinks": sinks,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, dict]:
    code = main(args)
    out = capsys.readouterr().out
    return code, (orjson.loads(out) if out.strip().startswith("{") else {"raw": out})


@pytest.fixture
def setup(tmp_path, aws_env, make_table, moto_server, opensearch_url):
    made = make_table("snap", range_key=("sk", "N"))
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
    bucket = f"audit-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    index = f"snap-{uuid.uuid4().hex[:6]}"
    cfg = write_config(tmp_path, table=made.table_name, ddb=made.client.meta.endpoint_url, s3=moto_server.endpoint,
                       bucket=bucket, os_url=opensearch_url, index=index)
    return made, s3, bucket, index, cfg, opensearch_url


def test_parallel_scan_delivers_every_item_once_with_the_snapshot_version(setup, capsys):
    made, s3, bucket, index, cfg, os_url = setup
    fill_table(made.client, made.table_name, 3000)
    code, report = run_cli(["snapshot", "--config", str(cfg), "--segments", "4", "--max-rcu", "0", "--json"], capsys)
    assert code == 0, report
    assert report["ended"] == "done" and report["items"] == 3000 and report["segments_done"] == 4
    assert report["dead_lettered"] == 0 and report["consumed_rcu"] > 0 and report["pages"] >= 4
    version = report["version"]
    started = report["started_at"]
    from datetime import datetime
    assert version == snapshot_version(datetime.fromisoformat(started))

    docs = os_docs(os_url, index)
    table = scan_all(made.client, made.table_name)
    assert set(docs) == set(table)
    assert {v for v, _ in docs.values()} == {version}
    assert all(src["operation"] == "SNAPSHOT" for _, src in docs.values()) if "operation" in next(iter(docs.values()))[1] else True

    lines = audit_lines(s3, bucket, "audit/")
    assert all(f"/snapshot={report['snapshot_id']}/seg" in key for key, _ in lines)
    ids = [line["key_id"] for _, line in lines]
    assert len(ids) == 3000 and set(ids) == set(table), "every item once in S3"
    assert {line["op"] for _, line in lines} == {"r"} and all(line["before"] is None for _, line in lines)

    # a second run of the same command: the snapshot is done, so it starts a new one (higher version).
    # Into the audit sink only: osmem re-indexes each existing document at a cost that grows with the
    # index, so 3,000 overwrites there cost half a minute and test nothing more
    code, again = run_cli(["snapshot", "--config", str(cfg), "--segments", "2", "--max-rcu", "0", "--json",
                           "--sink", "audit"], capsys)
    assert code == 0 and again["snapshot_id"] != report["snapshot_id"] and again["version"] >= version


def test_small_pages_are_all_followed(setup, capsys):
    """Limit-sized pages (a tight --max-rcu makes pages small): LastEvaluatedKey followed to the end."""
    made, s3, bucket, index, cfg, os_url = setup
    fill_table(made.client, made.table_name, 1200)
    code, report = run_cli(["snapshot", "--config", str(cfg), "--segments", "3", "--max-rcu", "5", "--json",
                            "--sink", "search"], capsys)
    assert code == 0, report
    assert report["items"] == 1200 and report["pages"] > 10, report
    assert len(os_docs(os_url, index)) == 1200


def test_dry_run_changes_nothing(setup, capsys, tmp_path):
    made, s3, bucket, index, cfg, os_url = setup
    fill_table(made.client, made.table_name, 100)
    code, report = run_cli(["snapshot", "--config", str(cfg), "--dry-run", "--json"], capsys)
    assert code == 0 and report["ended"] == "planned" and report["dry_run"] is True, report
    assert report["items"] == 0 and report["segments"] == 1
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert not (tmp_path / "leases.sqlite").exists(), "no lease store written"
    import urllib.request, urllib.error
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{os_url}/{index}/_count", timeout=10)


def test_unknown_sink_is_a_usage_error(setup, capsys):
    made, s3, bucket, index, cfg, os_url = setup
    assert main(["snapshot", "--config", str(cfg), "--sink", "nope"]) == 2


def test_a_fresh_index_gets_its_gc_deletes_raised_before_the_snapshot_reads(opensearch_url):
    """A snapshot into an index that does not exist yet (a first start) must still hold tombstones:
    otherwise a live delete made while the snapshot runs is undone by the snapshot's older image."""
    import json
    import urllib.request

    import structlog

    from pipeline.config import Settings
    from pipeline.registry import build_sinks
    from pipeline.replay.stream import guard_sinks
    from pipeline.sink import SinkContext

    index = f"fresh-{uuid.uuid4().hex[:6]}"
    settings = Settings(source={"table": "fresh"},
                        sinks=[{"name": "search", "type": "opensearch", "options": {"hosts": [opensearch_url],
                                                                                   "index": index}}])
    (sink,) = build_sinks(settings.sinks, "test")
    guard_sinks([sink], gc_deletes="12h", repair=False, tables=["fresh"])
    sink.open(SinkContext(sink_name="search", worker_id="t", logger=structlog.get_logger(), aws=None, dead_letter=None))
    try:
        found = json.loads(urllib.request.urlopen(f"{opensearch_url}/{index}/_settings", timeout=30).read())
        assert {v["settings"]["index"].get("gc_deletes") for v in found.values()} == {"12h"}, found
    finally:
        sink.close()
    found = json.loads(urllib.request.urlopen(f"{opensearch_url}/{index}/_settings", timeout=30).read())
    assert {v["settings"]["index"].get("gc_deletes") for v in found.values()} == {None}, "put back at close"


def test_archive_replay_understands_snapshot_objects(setup, capsys, aws_env):
    """Snapshot items in S3 (their own key layout) replay from the archive into a fresh index."""
    import structlog

    from connectors.s3.archive import run_archive_replay
    from pipeline.config import Settings
    from pipeline.registry import build_sinks

    made, s3, bucket, index, cfg, os_url = setup
    fill_table(made.client, made.table_name, 300)
    code, report = run_cli(["snapshot", "--config", str(cfg), "--segments", "3", "--max-rcu", "0", "--json",
                            "--sink", "audit"], capsys)
    assert code == 0 and report["items"] == 300, report
    settings = Settings(**yaml.safe_load(cfg.read_text()))
    replay = run_archive_replay(settings, f"s3://{bucket}/audit", sinks=build_sinks([settings.sinks[1]], "test"),
                                logger=structlog.get_logger(), progress=False)
    assert replay.ok and replay.delivered == 300, replay
    assert sorted(s.shard_id for s in replay.shards) == [f"snapshot-{report['snapshot_id']}-seg{n:05d}" for n in range(3)]
    docs = os_docs(os_url, index)
    assert set(docs) == set(scan_all(made.client, made.table_name))
    assert {v for v, _ in docs.values()} == {report["version"]}
