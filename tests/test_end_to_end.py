"""End to end: the worker in a subprocess against DynamoDB Local, fanning out to osmem-server
(OpenSearch API), moto server (S3) and redis-server; plus SIGTERM mid-stream and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from connectors.s3.audit import read_audit_objects
from connectors.redis_cache import RedisCacheSink
from connectors.embedded.verify import check_opensearch, check_redis, check_s3_audit, read_stream_events
from connectors.embedded.workload import CACHE_KEY_TEMPLATES, Workload, apply_change, scan_items
from pipeline.codec import key_id
from pipeline.events import Operation
from tests.process_stack import SinksStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
INDEX = "orders-e2e"
BUCKET = "audit-e2e"
SECRET = "e2e-secret-must-never-be-logged"


class Stack(SinksStack):
    """The three built-in sinks plus the example plugin ``files`` (jsonl_file), for one test."""

    def __init__(self, tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server, name):
        self.jsonl_dir = tmp_path / "jsonl"
        # the example plugin, installed from examples/custom_sink, selected by its entry point
        files = {"name": "files", "type": "jsonl_file", "options": {"directory": str(self.jsonl_dir)}}
        super().__init__(tmp_path, dynamodb_endpoint=dynamodb_local.endpoint, s3_endpoint=moto_server.endpoint,
                         os_url=opensearch_url, redis_url=redis_server.url, table=f"{name}-{os.urandom(4).hex()}",
                         bucket=f"{BUCKET}-{os.urandom(3).hex()}", index=INDEX, extra_sinks=(files,),
                         worker={"shutdown_grace_s": 30})
        self.redis = redis.Redis.from_url(redis_server.url)
        self.logs: list[Path] = []

    def start_worker(self) -> subprocess.Popen:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAE2ETESTKEY", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(ROOT)}
        log = self.config_path.parent / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        fh = open(log, "wb")
        return subprocess.Popen([sys.executable, "-m", "connectors.app.cli", "run", "--config", str(self.config_path)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

    def stop_worker(self, proc: subprocess.Popen, timeout: float = 45) -> int:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"worker did not exit within {timeout} s of SIGTERM; log: {self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def wait_caught_up(self, proc: subprocess.Popen, timeout: float = 240) -> list:
        events = self.stream()
        last = events[-1].sequence_number
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"worker exited early with {proc.returncode}; log: {self.log_text()[-3000:]}")
            if self.checkpoint() == last:
                return events
            time.sleep(0.5)
        pytest.fail(f"worker did not reach {last} within {timeout} s (checkpoint {self.checkpoint()}); "
                    f"log: {self.log_text()[-3000:]}")

    def preload_cache(self, workload_items: int) -> list[str]:
        """Set every cache key the workload can invalidate, plus a sentinel; return the sentinel."""
        wl = Workload(items=workload_items)
        pipe = self.redis.pipeline(transaction=False)
        for index in range(workload_items):
            key = wl.key(index)
            pipe.set(f"item:{key['pk']}:{key['sk']}", "cached")
            pipe.set(f"user:{key['pk']}", "cached")
            for n in range(10):
                pipe.set(f"email:u{index}.{n}@example.com", "cached")
        pipe.set("unrelated:sentinel", "keep me")
        pipe.execute()
        return ["unrelated:sentinel"]

    def verify(self, events) -> None:
        items = scan_items(self.ddb, self.table)
        results = [
            check_opensearch(self.os_url, INDEX, items, lambda it: key_id({"pk": it["pk"], "sk": it["sk"]})),
            check_s3_audit(read_audit_objects(self.s3, self.bucket, "audit"), events),
        ]
        cache = RedisCacheSink("cache", RedisCacheSink.Options(url=self.redis_url, key_templates=CACHE_KEY_TEMPLATES))
        keys = [k for ev in events for k in cache.keys_for(ev)]
        results.append(check_redis(self.redis, keys, "unrelated:sentinel"))
        failed = [r for r in results if not r.ok]
        assert not failed, "; ".join(f"{r.name}: {r.summary}: {r.problems[:5]}" for r in failed)
        assert not list(self.dead_letter.glob("*.json")), "nothing should be dead-lettered"
        # the plugin sink got every change exactly once, in stream order
        from ddb_cdc_jsonl_sink.sink import read_events

        got = [ev.sequence_number for ev in read_events(self.jsonl_dir, self.table)]
        assert got == [ev.sequence_number for ev in events]


@pytest.fixture(scope="module")
def plugin_installed():
    from tests.test_plugin import ensure_plugin_installed

    return ensure_plugin_installed()


@pytest.fixture
def stack(request, tmp_path, aws_env, dynamodb_local, moto_server, opensearch_url, redis_server, plugin_installed):
    return Stack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server, request.node.name[:20])


def _types_seen(events) -> set[str]:
    """DynamoDB types present in the new images of ``events``."""
    seen: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            seen.add("M")
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            seen.add("L")
            for v in value:
                walk(v)
        elif isinstance(value, (set, frozenset)):
            member = next(iter(value))
            seen.add({str: "SS", bytes: "BS"}.get(type(member), "NS"))
        elif isinstance(value, bool):
            seen.add("BOOL")
        elif value is None:
            seen.add("NULL")
        elif isinstance(value, str):
            seen.add("S")
        elif isinstance(value, bytes):
            seen.add("B")
        elif isinstance(value, Decimal):
            seen.add("N")

    for ev in events:
        for image in (ev.before, ev.after):
            if image:
                for v in image.values():
                    walk(v)
    return seen


def test_two_thousand_mixed_changes_reach_every_sink(stack):
    items = 150
    stack.preload_cache(items)
    worker = stack.start_worker()
    try:
        workload = Workload(seed=11, items=items)
        for change in workload.changes(2000):
            apply_change(stack.ddb, stack.table, change)
        events = stack.wait_caught_up(worker)
    finally:
        code = stack.stop_worker(worker)
    assert code == 0, stack.log_text()[-3000:]
    assert len(events) == 2000
    ops = {ev.operation for ev in events}
    assert ops == {Operation.INSERT, Operation.MODIFY, Operation.REMOVE}
    assert _types_seen(events) >= {"S", "N", "B", "SS", "NS", "BS", "L", "M", "NULL", "BOOL"}
    assert any(len(str(v)) >= 38 for ev in events if ev.after for v in [ev.after.get("big")] if v is not None)
    stack.verify(events)
    # the lease table uses KCL's attribute names and the final checkpoint
    item = stack.ddb.scan(TableName=stack.lease_table)["Items"][0]
    assert {"leaseKey", "leaseCounter", "checkpoint", "checkpointSubSequenceNumber",
            "ownerSwitchesSinceCheckpoint"} <= set(item)
    assert item["checkpoint"]["S"] == events[-1].sequence_number
    assert "leaseOwner" not in item, "a graceful stop releases the lease"
    assert SECRET not in stack.log_text(), "credentials must not be logged"


def test_sigterm_mid_stream_then_restart_loses_nothing(stack):
    items = 120
    stack.preload_cache(items)
    workload = Workload(seed=23, items=items)
    changes = list(workload.changes(1500))
    first = stack.start_worker()
    stopped_at = None
    try:
        for n, change in enumerate(changes[:1000], start=1):
            apply_change(stack.ddb, stack.table, change)
            if n == 700:
                # let the worker make progress, then stop it while it is still reading
                deadline = time.monotonic() + 60
                while stack.checkpoint() in (None, "TRIM_HORIZON") and time.monotonic() < deadline:
                    time.sleep(0.2)
                code = stack.stop_worker(first)
                stopped_at = stack.checkpoint()
    finally:
        if first.poll() is None:
            stack.stop_worker(first)
    assert code == 0, stack.log_text()[-3000:]
    assert stopped_at not in (None, "TRIM_HORIZON"), "the first run checkpointed some progress"
    all_so_far = read_stream_events(stack.streams, stack.stream_arn, stack.table)
    assert int(stopped_at) < int(all_so_far[-1].sequence_number), "stopped mid-stream"

    second = stack.start_worker()
    try:
        for change in changes[1000:]:
            apply_change(stack.ddb, stack.table, change)
        events = stack.wait_caught_up(second)
    finally:
        code2 = stack.stop_worker(second)
    assert code2 == 0, stack.log_text()[-3000:]
    assert len(events) == 1500
    stack.verify(events)  # every sequence number audited, index equal to table, keys gone
    # the second run resumed after the checkpoint: its first batch starts right after it
    log = stack.logs[1].read_text()
    assert f'"checkpoint": "{stopped_at}"' in log or f'"checkpoint":"{stopped_at}"' in log
