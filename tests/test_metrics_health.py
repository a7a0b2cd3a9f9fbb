"""Metrics, /healthz, /readyz and lag logs of a real worker process against DynamoDB Local,
osmem-server, moto S3 and redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from connectors.embedded.servers import free_port
from connectors.embedded.workload import CACHE_KEY_TEMPLATES, Workload, create_table, write_changes
from tests.process_stack import start_worker, write_config
from tests.helpers import json_log_events, wait_until

pytestmark = pytest.mark.e2e



class MetricsStack:
    def __init__(self, tmp_path: Path, dynamodb_local, moto_server, opensearch_url, redis_server, **worker_opts):
        creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        self.ddb = boto3.client("dynamodb", endpoint_url=dynamodb_local.endpoint, **creds)
        self.table = f"metrics-{os.urandom(4).hex()}"
        create_table(self.ddb, self.table)
        bucket = f"metrics-{os.urandom(3).hex()}"
        boto3.client("s3", endpoint_url=moto_server.endpoint, **creds).create_bucket(Bucket=bucket)
        self.port = free_port()
        self.config_path = write_config(tmp_path / "config.yaml", {
            "source": {"table": self.table, "checkpoint_interval_s": 0.5, "idle_interval_ms": 100,
                       "discovery_interval_s": 5},
            "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint,
                    "s3_endpoint_url": moto_server.endpoint},
            "checkpoints": {"store": "dynamodb", "table_name": f"{self.table}-leases", "failover_time_s": 3},
            "dead_letter": {"directory": str(tmp_path / "dead-letter")},
            "worker": {"shutdown_grace_s": 20, **worker_opts},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": self.port},
            "log": {"format": "json"},
            "sinks": [
                {"name": "search", "type": "opensearch", "options": {"hosts": [opensearch_url], "index": "metrics"}},
                {"name": "audit", "type": "s3_audit", "options": {"bucket": bucket, "max_buffer_age_s": 1}},
                {"name": "cache", "type": "redis_cache",
                 "options": {"url": redis_server.url, "key_templates": CACHE_KEY_TEMPLATES, "socket_timeout_s": 1}},
            ],
        })
        self.log = tmp_path / "worker.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        self.worker = start_worker(self.config_path, self.log, *extra, append=True)
        self.proc = self.worker.proc

    def stop(self) -> int:
        assert self.proc is not None
        return self.worker.stop(45)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def samples(self) -> dict[tuple[str, tuple], float]:
        status, text = self.get("/metrics")
        assert status == 200, text[:500]
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels) -> float | None:
        samples = self.samples()
        return samples.get((name, tuple(sorted(labels.items()))))

    def values(self, name: str) -> dict[tuple, float]:
        return {labels: v for (n, labels), v in self.samples().items() if n == name}


@pytest.fixture
def stack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server, aws_env):
    made = []

    def make(**worker_opts) -> MetricsStack:
        s = MetricsStack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server, **worker_opts)
        made.append(s)
        return s

    yield make
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()


def test_metrics_show_delivery_and_lag_and_a_stalled_sink_ages_alone(stack, redis_server):
    s = stack(iterator_age_warning_s=4, iterator_age_error_s=12, iterator_age_log_interval_s=3)
    write_changes(s.ddb, s.table, Workload(seed=31, items=50), 200)
    s.start()
    wait_until(lambda: s.get("/readyz")[0] == 200, "ready", timeout=60, interval=0.3)
    assert json.loads(s.get("/healthz")[1])["status"] == "ok"

    def delivered(sink: str) -> float:
        return s.value("ddb_cdc_sink_events_delivered_total", sink=sink) or 0.0

    wait_until(lambda: all(delivered(n) >= 200 for n in ("search", "audit", "cache")), "200 delivered per sink",
               timeout=90, interval=0.5)
    # caught up: the shard's iterator age falls back to zero; every sink is current
    wait_until(lambda: list(s.values("ddb_cdc_shard_iterator_age_seconds").values()) == [0.0],
               "iterator age back to 0", timeout=30, interval=0.3)
    assert set(s.values("ddb_cdc_sink_age_seconds").values()) == {0.0}
    # the first checkpoint follows within checkpoint_interval_s of the last delivery
    wait_until(lambda: any(v >= 1 for v in s.values("ddb_cdc_checkpoint_writes_total").values()),
               "a checkpoint written", timeout=30, interval=0.3)
    samples = s.samples()
    names = {name for name, _ in samples}
    for expected in ("ddb_cdc_records_read_total", "ddb_cdc_get_records_calls_total", "ddb_cdc_sink_batches_total",
                     "ddb_cdc_sink_delivery_seconds_bucket", "ddb_cdc_checkpoint_writes_total",
                     "ddb_cdc_shard_trim_horizon_remaining_seconds", "ddb_cdc_leases_held"):
        assert expected in names, expected
    assert s.value("ddb_cdc_leases_held", table=s.table) == 1.0
    remaining = list(s.values("ddb_cdc_shard_trim_horizon_remaining_seconds").values())
    assert remaining == [86400.0]

    # Redis stops: the cache sink stalls (block policy) — its age grows, the others stay current
    redis_server.stop()
    try:
        write_changes(s.ddb, s.table, Workload(seed=32, items=50), 20)
        wait_until(lambda: (s.value("ddb_cdc_sink_age_seconds", sink="cache") or 0) > 5, "cache age > 5 s",
                   timeout=60, interval=0.5)
        first = s.value("ddb_cdc_sink_age_seconds", sink="cache")
        time.sleep(2.5)
        ages = s.values("ddb_cdc_sink_age_seconds")
        assert ages[(("sink", "cache"),)] >= first + 2
        assert ages[(("sink", "search"),)] == 0.0 and ages[(("sink", "audit"),)] == 0.0
        # per-sink lanes (issue 15): the reader is not held up, the cache's lane of the shard ages
        lane_ages = s.values("ddb_cdc_lane_age_seconds")
        assert [v for k, v in lane_ages.items() if ("sink", "cache") in k][0] > 5
        assert [v for k, v in lane_ages.items() if ("sink", "search") in k] == [0.0]
        assert (s.value("ddb_cdc_sink_retries_total", sink="cache") or 0) > 0
        wait_until(lambda: json_log_events(s.log, "iterator_age_critical"), "iterator_age_critical logged",
                   timeout=60, interval=0.5)
    finally:
        redis_server.start()
    wait_until(lambda: s.value("ddb_cdc_sink_age_seconds", sink="cache") == 0.0, "cache current again",
               timeout=60, interval=0.5)
    wait_until(lambda: delivered("cache") >= 220, "the 20 stalled changes delivered", timeout=60, interval=0.5)
    wait_until(lambda: list(s.values("ddb_cdc_shard_iterator_age_seconds").values()) == [0.0],
               "iterator age back to 0 after the outage", timeout=30, interval=0.3)
    assert s.stop() == 0

    # lag logs, rate-limited per shard (one per 3 s at most). DynamoDB Local rounds creation
    # times down to the minute, so the age may jump past the error threshold at once: the
    # warning band is checked when present, and on its own in the unit test below
    warnings = json_log_events(s.log, "iterator_age_high")
    errors = json_log_events(s.log, "iterator_age_critical")
    assert errors
    for line in warnings:
        assert 4 <= line["iterator_age_s"] < 12 and line["level"] == "warning" and line["shard_id"]
    for line in errors:
        assert line["iterator_age_s"] >= 12 and line["level"] == "error"
    times = sorted(line["timestamp"] for line in warnings + errors)
    from datetime import datetime

    stamps = [datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in times]
    assert all(b - a >= 2.9 for a, b in zip(stamps, stamps[1:])), times
    # the stable log schema: every JSON line has event, level, timestamp; worker lines carry worker_id
    lines = json_log_events(s.log)
    assert lines and all({"event", "level", "timestamp"} <= set(line) for line in lines)
    assert all("worker_id" in line for line in lines if line["event"] in ("worker_started", "lease_taken",
                                                                           "iterator_age_high"))


def test_readyz_waits_for_a_sink_that_cannot_open_yet(stack, redis_server):
    redis_server.stop()
    s = stack(sink_open_timeout_s=120)
    try:
        s.start()
        wait_until(lambda: s.get("/readyz")[0] == 503 and "cache" in s.get("/readyz")[1],
                   "not ready while Redis is down", timeout=30, interval=0.3)
        body = json.loads(s.get("/readyz")[1])
        assert body["status"] == "not ready" and any("cache" in r for r in body["reasons"])
        assert s.get("/healthz")[0] == 200  # alive: waiting for a sink is not a hang
        time.sleep(2)
        assert s.get("/readyz")[0] == 503 and s.proc.poll() is None
        # the first open attempt's failure is logged; on a loaded machine that may come after
        # /readyz already reports the sink as not open yet
        wait_until(lambda: json_log_events(s.log, "sink_open_failed"), "sink_open_failed logged", timeout=60)
    finally:
        redis_server.start()
    wait_until(lambda: s.get("/readyz")[0] == 200, "ready once Redis is up", timeout=60, interval=0.3)
    assert json.loads(s.get("/readyz")[1]) == {"status": "ready", "reasons": []}
    write_changes(s.ddb, s.table, Workload(seed=33, items=10), 10)
    wait_until(lambda: (s.value("ddb_cdc_sink_events_delivered_total", sink="cache") or 0) >= 10,
               "changes delivered after the late open", timeout=60, interval=0.5)
    assert s.stop() == 0


def test_a_sink_that_never_opens_fails_after_the_timeout_with_one_line(stack, redis_server):
    redis_server.stop()
    try:
        s = stack(sink_open_timeout_s=3)
        s.start()
        assert s.proc.wait(60) == 1
    finally:
        redis_server.start()
    text = s.log.read_text()
    assert "could not open" in text and "Traceback" not in text


def test_iterator_age_logs_warn_then_error_at_most_once_per_interval_per_shard():
    """The lag-log rule on its own, with a stand-in reader whose age the test sets."""
    import structlog

    from pipeline.runtime.worker import Worker

    class Reader:
        def __init__(self):
            self.age = 0.0
            self.shard_id = "shardId-1"
            self.source = type("S", (), {"table": "orders", "stream_arn": "arn"})()

        def iterator_age_s(self, now=None):
            return self.age

        def trim_horizon_remaining_s(self, now=None):
            return 86400 - self.age

    clock = [1000.0]
    with structlog.testing.capture_logs() as logs:
        worker = Worker(source=Reader().source, lease_store=None, sinks=[], dead_letter=None, worker_id="w",
                        logger=structlog.get_logger(), clock=lambda: clock[0], iterator_age_warning_s=3600,
                        iterator_age_error_s=72000, iterator_age_log_interval_s=300)
        reader = Reader()
        worker.consumers["k"] = reader
        for age, step in [(10, 10), (3600, 10), (3700, 100), (4000, 200), (72000, 10), (72500, 290), (73000, 10)]:
            reader.age = age
            clock[0] += step
            worker._log_iterator_ages()
    events = [(e["event"], e["iterator_age_s"]) for e in logs if e["event"].startswith("iterator_age")]
    # 3600 warns; 3700 (100 s later) is held back; 4000 (300 s later) warns; 72000 (10 s later) is
    # held back; 72500 (300 s later) is an error; 73000 (10 s later) is held back
    assert events == [("iterator_age_high", 3600), ("iterator_age_high", 4000), ("iterator_age_critical", 72500)]


def _two_free_ports() -> int:
    import socket

    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def test_processes_serve_one_endpoint_per_slot(stack):
    """`run --processes 2`: slot k serves /healthz and /metrics on metrics.port + k."""
    s = stack()
    s.port = _two_free_ports()
    config = yaml.safe_load(s.config_path.read_text())
    config["metrics"]["port"] = s.port
    write_config(s.config_path, config)
    s.start("--processes", "2")
    base = s.port
    for port in (base, base + 1):
        s.port = port
        wait_until(lambda: s.get("/readyz")[0] == 200, f"slot on {port} ready", timeout=60, interval=0.3)
        assert s.get("/healthz")[0] == 200 and "ddb_cdc_leases_held" in s.get("/metrics")[1]
    assert s.stop() == 0
