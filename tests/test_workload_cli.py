"""``ddb-cdc workload`` (the compose stack's demo writer) against DynamoDB Local: N changes written
means N records in the table's stream; the unbounded mode stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.app.cli import main
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def stream_records(client_factory: Any, endpoint: str, stream_arn: str) -> list[dict[str, Any]]:
    """Every record of every shard of the stream, read from TRIM_HORIZON until an empty read."""
    streams = client_factory("dynamodbstreams", endpoint)
    records: list[dict[str, Any]] = []
    shards = streams.describe_stream(StreamArn=stream_arn)["StreamDescription"]["Shards"]
    for shard in shards:
        iterator = streams.get_shard_iterator(StreamArn=stream_arn, ShardId=shard["ShardId"],
                                              ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while iterator:
            page = streams.get_records(ShardIterator=iterator, Limit=1000)
            records.extend(page["Records"])
            if not page["Records"]:
                break
            iterator = page.get("NextShardIterator")
    return records


@pytest.fixture
def workload_table(make_table, dynamodb_local, aws_env, monkeypatch):
    """A table with the workload's key schema; DDB_CDC_AWS__ENDPOINT_URL points at DynamoDB Local."""
    for key in [k for k in os.environ if k.startswith("DDB_CDC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DDB_CDC_AWS__ENDPOINT_URL", dynamodb_local.endpoint)
    return make_table("workload", range_key=("sk", "N"))


def test_workload_writes_n_changes_and_the_stream_holds_n_records(workload_table, dynamodb_local, aws_client, capsys):
    _, table, stream_arn = workload_table
    assert main(["workload", "--table", table, "--changes", "60", "--seed", "3"]) == 0
    assert f"wrote 60 changes to {table}" in capsys.readouterr().out
    records = stream_records(aws_client, dynamodb_local.endpoint, stream_arn)
    assert len(records) == 60
    kinds = {r["eventName"] for r in records}
    assert kinds == {"INSERT", "MODIFY", "REMOVE"}  # a mixed workload
    assert all("NewImage" in r["dynamodb"] or r["eventName"] == "REMOVE" for r in records)


def test_workload_rate_paces_the_writes(workload_table, capsys):
    _, table, _ = workload_table
    started = time.monotonic()
    assert main(["workload", "--table", table, "--changes", "10", "--rate", "40"]) == 0
    assert time.monotonic() - started >= 9 / 40
    assert "wrote 10 changes" in capsys.readouterr().out


def test_workload_reads_aws_settings_from_the_config_file(make_table, dynamodb_local, aws_env, monkeypatch, tmp_path, capsys):
    for key in [k for k in os.environ if k.startswith("DDB_CDC_")]:
        monkeypatch.delenv(key)
    _, table, _ = make_table("workload", range_key=("sk", "N"))
    config = tmp_path / "config.yaml"
    config.write_text(f"source: {{table: {table}}}\naws: {{endpoint_url: '{dynamodb_local.endpoint}'}}\n"
                      "sinks: [{name: cache, type: redis_cache, options: {url: 'redis://127.0.0.1:1/0', key_templates: ['k:{pk}']}}]\n")
    assert main(["workload", "--config", str(config), "--table", table, "--changes", "3"]) == 0
    assert "wrote 3 changes" in capsys.readouterr().out


def test_workload_refuses_a_missing_table_or_a_wrong_key_schema(workload_table, make_table, capsys):
    assert main(["workload", "--table", "no-such-table-xyz", "--changes", "1"]) == 1
    err = capsys.readouterr().err
    assert "table 'no-such-table-xyz' not found" in err and "Traceback" not in err
    _, other, _ = make_table("plainkey")  # pk S only
    assert main(["workload", "--table", other, "--changes", "1"]) == 1
    assert "the workload needs pk S HASH, sk N RANGE" in capsys.readouterr().err
    assert main(["workload", "--table", other, "--changes", "-1"]) == 2


def test_unbounded_workload_runs_until_sigterm_and_exits_0(workload_table, dynamodb_local, aws_client):
    _, table, stream_arn = workload_table
    proc = subprocess.Popen([sys.executable, "-m", "connectors.app.cli", "workload", "--table", table, "--rate", "50"],
                            cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(stream_records(aws_client, dynamodb_local.endpoint, stream_arn)) >= 5,
                   "the writer's first changes", timeout=60, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    written = int(out.split("wrote ")[1].split()[0])
    assert written >= 5
    assert len(stream_records(aws_client, dynamodb_local.endpoint, stream_arn)) == written
    assert "workload_stopped" in err and "SIGTERM" in err
