"""Chaos, end to end: shard splits every few seconds (often within the second of a change) while hot
items change several times a second, the worker killed with SIGKILL ten times, one sink outage
(redis-server frozen with SIGSTOP), one burst of AWS 5xx errors — and at the end OpenSearch, the
S3 audit log and Redis agree with the table: OpenSearch by content and by external version,
S3 with every change exactly as written, Redis with no stale key left; no gap, no dead letter,
and the worker exits 0 on SIGTERM.

The worker is the real CLI in a subprocess, against osmem-server (OpenSearch API), moto server
(S3), redis-server, and — for what DynamoDB Local cannot do (splits) — the DynamoDB Streams API
double served over HTTP on 127.0.0.1 (tests/streams_server.py).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import boto3
import orjson
import pytest
import redis
import yaml

from connectors.opensearch.sink import document_id, restore_document
from connectors.s3.audit import read_audit_objects
from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.codec import record_version
from pipeline.events import SHARD_END
from pipeline.testing import make_stream_record
from tests.helpers import wait_until
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams
from tests.streams_server import StreamsServer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ITEMS = [f"hot-{i}" for i in range(16)]
KILLS = 10


class ChaosTable:
    """The table as the writer changed it, and the stream the double holds for it."""

    def __init__(self, fake: FakeStreams, cache: redis.Redis, rng: random.Random):
        self.fake, self.cache, self.rng = fake, cache, rng
        roots = [fake.open_shard(), fake.open_shard()]
        self.route = {pk: roots[zlib.crc32(pk.encode()) % 2] for pk in ITEMS}
        self.state: dict[str, int | None] = {pk: None for pk in ITEMS}
        self.last: dict[str, tuple[str, str, int]] = {}  # pk → (shard id, sequence number, created s)
        self.written: list[tuple[str, str]] = []  # (shard id, sequence number)
        self.splits = 0

    def change(self) -> None:
        pk = self.rng.choice(ITEMS)
        self.cache.set(f"item:{pk}", "stale")  # the application cached the item just before the change
        prev = self.state[pk]
        created = int(time.time())
        if prev is None:
            name, new, old, nxt = "INSERT", {"pk": pk, "n": 1}, None, 1
        elif self.rng.random() < 0.15:
            name, new, old, nxt = "REMOVE", None, {"pk": pk, "n": prev}, None
        else:
            name, new, old, nxt = "MODIFY", {"pk": pk, "n": prev + 1}, {"pk": pk, "n": prev}, prev + 1
        record = make_stream_record(event_name=name, keys={"pk": pk}, new_image=new, old_image=old, created=created)
        shard = self.route[pk]
        sequence = self.fake.put(shard, record)
        self.state[pk] = nxt
        self.last[pk] = (shard, sequence, created)
        self.written.append((shard, sequence))

    def split(self) -> None:
        open_shards = sorted({s for s in self.route.values()})
        shard = self.rng.choice(open_shards)
        children = self.fake.split(shard, children=self.rng.choice([1, 2]))
        for pk, where in self.route.items():
            if where == shard:
                self.route[pk] = children[zlib.crc32(f"{pk}{shard}".encode()) % len(children)]
        self.splits += 1


def writer(table: ChaosTable, stop: threading.Event, errors: list) -> None:
    try:
        next_split = time.monotonic() + 1.5
        while not stop.is_set():
            table.change()
            if time.monotonic() >= next_split:
                table.split()
                next_split = time.monotonic() + table.rng.uniform(1.5, 3.0)
            stop.wait(0.025)
    except Exception as exc:  # noqa: BLE001 — reported by the test
        errors.append(exc)


def get_doc(url: str, index: str, pk: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/{index}/_doc/{quote(document_id(pk), safe='')}", timeout=10) as resp:
            body = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return body if body.get("found") else None


def test_chaos_splits_kills_outage_and_aws_errors_end_with_sinks_equal_to_the_table(
        tmp_path, opensearch_url, moto_server, redis_server):
    rng = random.Random(20261203)
    fake = FakeStreams(seed=20261203, page_size=100)
    cache = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    table = ChaosTable(fake, cache, rng)
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"chaos-{os.urandom(3).hex()}"
    s3.create_bucket(Bucket=bucket)
    leases_path = tmp_path / "leases.sqlite"
    dead_letter = tmp_path / "dead-letter"

    with StreamsServer(fake) as server:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "source": {"stream_arn": STREAM_ARN, "checkpoint_interval_s": 0.3, "idle_interval_ms": 50,
                       "discovery_interval_s": 0.5, "max_records_per_call": 50},
            "aws": {"region": "us-east-1", "streams_endpoint_url": server.endpoint,
                    "s3_endpoint_url": moto_server.endpoint, "access_key_id": "testing",
                    "secret_access_key": "testing", "max_attempts": 3, "connect_timeout_s": 2,
                    "read_timeout_s": 5},
            "checkpoints": {"store": "sqlite", "sqlite_path": str(leases_path), "failover_time_s": 1.5},
            "dead_letter": {"directory": str(dead_letter)},
            "worker": {"shutdown_grace_s": 20},
            "log": {"format": "json"},
            "sinks": [
                {"name": "search", "type": "opensearch",
                 "options": {"hosts": [opensearch_url], "index": "chaos-{table}", "timeout_s": 10}},
                {"name": "audit", "type": "s3_audit",
                 "options": {"bucket": bucket, "prefix": "audit", "max_buffer_age_s": 1}},
                {"name": "cache", "type": "redis_cache",
                 "options": {"url": redis_server.url, "key_templates": ["item:{pk}"], "socket_timeout_s": 1}},
            ],
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DDB_CDC_", "AWS_"))}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        logs = tmp_path / "logs"
        logs.mkdir()

        def start(n: int) -> subprocess.Popen:
            out = open(logs / f"worker-{n}.log", "wb")
            return subprocess.Popen([sys.executable, "-m", "connectors.app.cli", "run", "--config", str(config)],
                                    cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

        stop = threading.Event()
        errors: list = []
        thread = threading.Thread(target=writer, args=(table, stop, errors), daemon=True)
        thread.start()
        try:
            for n in range(KILLS):
                proc = start(n)
                try:
                    time.sleep(rng.uniform(1.5, 3.0))
                    if n == 3:  # a sink outage while the worker runs: Redis frozen for 4 s
                        pid = redis_server._proc.pid
                        os.kill(pid, signal.SIGSTOP)
                        try:
                            time.sleep(4)
                        finally:
                            os.kill(pid, signal.SIGCONT)
                    if n == 6:  # a burst of AWS 5xx: every DynamoDB Streams call fails for 4 s
                        # once this worker is reading (a loaded machine can take seconds to start it)
                        base = server.calls
                        wait_until(lambda: server.calls > base + 3, "the worker reads the stream", timeout=60)
                        server.fail_all(4)
                        time.sleep(4.5)
                        assert server.failed_calls > 0, "the worker made no call during the outage"
                    if n in (3, 6):  # the worker rode it out: still running, shards still reading
                        time.sleep(1.0)
                        assert proc.poll() is None, (logs / f"worker-{n}.log").read_text()[-3000:]
                finally:
                    proc.kill()  # kill -9
                    proc.wait(10)
        finally:
            stop.set()
            thread.join(10)
        assert not errors, errors
        assert server.failed_calls > 0 and table.splits >= 6

        # the last worker catches up, then SIGTERM ends it with exit 0
        proc = start(KILLS)
        store = SQLiteLeaseStore(leases_path)
        last_seq = {sid: (shard.seq_at(len(shard.records) - 1) if shard.records else None)
                    for sid, shard in fake.shards.items()}

        def caught_up() -> bool:
            leases = {lease.shard_id: lease for lease in store.list_leases()}
            if set(leases) != set(fake.shards):
                return False
            for sid, shard in fake.shards.items():
                cp = leases[sid].checkpoint
                if shard.closed and cp != SHARD_END:
                    return False
                if not shard.closed and last_seq[sid] is not None and cp != last_seq[sid]:
                    return False
            return True

        try:
            wait_until(caught_up, "the last worker caught up with every shard", timeout=90, interval=0.2)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert code == 0, (logs / f"worker-{KILLS}.log").read_text()[-3000:]

    # no shard ever failed: transient errors and outages were waited out, not turned into failures
    for log in sorted(logs.glob("worker-*.log")):
        failed = [line for line in log.read_text(errors="replace").splitlines() if '"shard_failed"' in line]
        assert not failed, f"{log.name}: {failed[:2]}"

    leases = {lease.shard_id: lease for lease in store.list_leases()}
    assert store.list_gaps() == []
    assert not dead_letter.exists() or not list(dead_letter.glob("*.json"))

    # OpenSearch: every item at its last state, with its last change's version
    urllib.request.urlopen(urllib.request.Request(f"{opensearch_url}/chaos-orders/_refresh", method="POST"),
                           timeout=10).read()
    for pk in ITEMS:
        doc = get_doc(opensearch_url, "chaos-orders", pk)
        if table.state[pk] is None:
            assert doc is None, f"{pk} was removed last but is still indexed: {doc}"
            continue
        assert doc is not None, f"{pk} is missing"
        assert int(restore_document(doc["_source"])["n"]) == table.state[pk], f"{pk} holds an older state"
        shard, sequence, created = table.last[pk]
        expected = record_version(datetime.fromtimestamp(created, tz=timezone.utc), sequence,
                                  floor=leases[shard].version_floor or 0)
        assert doc["_version"] == expected, f"{pk}: version {doc['_version']} != last change's {expected}"

    # S3: every change in the audit log, nothing else (repeats after a kill are allowed)
    audited = {(line["source"]["shard_id"], line["source"]["sequence_number"])
               for line in read_audit_objects(s3, bucket, "audit/")}
    assert audited == set(table.written)

    # Redis: every key cached before a change was invalidated after it
    assert cache.keys("item:*") == []
