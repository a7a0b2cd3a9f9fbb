"""Failure scenarios end to end: the worker in a subprocess against DynamoDB Local, fanning out to
osmem-server (OpenSearch API), moto server (S3 audit) and redis-server, while things break.

1. Crash loop: a seeded workload runs in a background thread while the worker is SIGKILLed 20
   times at random moments and restarted. The worker runs with a fixed ``worker.id``
   (``DDB_CDC_WORKER__ID``), so each restarted process re-takes its own lease at once (the
   coordinator treats a lease owned by its own id as takeable immediately: ``lease_taken`` with
   ``reason: own``). Each kill comes a random 0.3–2 s (seeded RNG) after the new process logged
   ``shard_consumer_started`` (counting from process start would kill most processes while they
   are still importing, which tests nothing). A thread records the lease table's checkpoint every
   ~100 ms; at the end: checkpoints never moved backwards, and for every checkpoint ever observed
   every sequence number up to it is in the S3 audit log (S3 is flushed before a checkpoint, so a
   checkpoint ahead of S3 would be an event lost by a crash); OpenSearch equals the table; every
   change's Redis keys are gone.
2. Redis down for 30 s with ``on_failure: block``: the worker keeps running, its checkpoint holds,
   ``sink_retry`` lines with growing ``stalled_s``; after Redis is back everything arrives.
3. The OpenSearch endpoint refuses connections for 30 s (a TCP proxy in front of osmem closes its
   listener and drops its connections, then listens again on the same port): same checks.
4. Redis down for 30 s with ``on_failure: dead_letter`` and ``retry_budget_s: 3``: DLQ entries
   (kind delivery, sink cache, full event) while the checkpoint keeps advancing; then
   ``ddb-cdc dlq redrive --sink cache`` delivers them and removes them from the DLQ.
5. A poison document (``count`` a string after earlier items made it a long → OpenSearch's
   ``mapper_parsing_exception``) is dead-lettered for the search sink while later changes flow.

Run with ``-s`` to see the timings.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import redis

from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
from connectors.embedded.servers import free_port
from connectors.redis_cache import RedisCacheSink
from connectors.s3.audit import read_audit_objects
from connectors.embedded.verify import check_opensearch, check_redis, check_s3_audit
from connectors.embedded.workload import CACHE_KEY_TEMPLATES, Workload, apply_change, scan_items
from pipeline.awsconfig import AwsConfig
from pipeline.codec import encode_item, key_id
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.events import LATEST, SHARD_END, TRIM_HORIZON
from pipeline.render import event_to_record_dict
from tests.helpers import wait_until
from tests.process_stack import ROOT, LeasePoller, SinksStack, WorkerProcess, start_worker, worker_env

pytestmark = pytest.mark.e2e

OUTAGE_S = 30.0
SENTINEL = "unrelated:sentinel"
CREDS = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")


def seq_order(checkpoint: str) -> tuple[int, int]:
    """Sort key of a checkpoint: TRIM_HORIZON / LATEST < sequence numbers (as int) < SHARD_END."""
    if checkpoint in (TRIM_HORIZON, LATEST, None):
        return (0, 0)
    if checkpoint == SHARD_END:
        return (2, 0)
    return (1, int(checkpoint))


# -- helpers ---------------------------------------------------------------------------------------


class TcpProxy:
    """A threaded TCP relay on 127.0.0.1:``port`` to ``upstream``.

    :meth:`refuse` closes the listener and drops every relayed connection (clients then get
    ECONNREFUSED, like a dead endpoint); :meth:`listen` listens again on the same port.
    """

    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.listen()

    def listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        stop = threading.Event()
        thread = threading.Thread(target=self._accept_loop, args=(listener, stop), daemon=True, name="proxy")
        self._listener, self._stop, self._thread = listener, stop, thread
        thread.start()

    def refuse(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        self._listener = self._stop = self._thread = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            for action in (lambda c=conn: c.shutdown(socket.SHUT_RDWR), conn.close):
                try:
                    action()
                except OSError:
                    pass

    close = refuse

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


class CheckpointHistory(LeasePoller):
    """Reads the shard's lease every ~100 ms and keeps (monotonic time, checkpoint, owner, counter)."""

    def __init__(self, aws: AwsConfig, lease_table: str, endpoint: str):
        super().__init__(DynamoDBLeaseStore(aws, lease_table, client=boto3.client("dynamodb", endpoint_url=endpoint,
                                                                                    **CREDS)),
                         0.1, name="checkpoint-history")
        self.rows: list[tuple[float, str, str | None, int]] = []

    def record(self, t: float, leases: list) -> None:
        if leases:
            lease = leases[0]
            self.rows.append((t, lease.checkpoint, lease.owner, lease.counter))

    def checkpoints(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, cp) for t, cp, _, _ in self.rows if since <= t <= until]

    def latest(self) -> str | None:
        with self._lock:
            return self.rows[-1][1] if self.rows else None

    def backwards(self) -> list[str]:
        out = []
        with self._lock:
            rows = list(self.rows)
        for (t0, a, o0, c0), (t1, b, o1, c1) in zip(rows, rows[1:]):
            if seq_order(b) < seq_order(a):
                out.append(f"checkpoint moved backwards {a} (counter {c0}) -> {b} (counter {c1})")
            if c1 < c0:
                out.append(f"lease counter went down {c0} -> {c1}")
        return out


class WorkloadThread(threading.Thread):
    """Applies ``changes`` (an iterator from a seeded Workload) at ``rate_per_s`` until :meth:`finish`."""

    def __init__(self, endpoint: str, table: str, changes, rate_per_s: float):
        super().__init__(name="workload", daemon=True)
        self.client = boto3.client("dynamodb", endpoint_url=endpoint, **CREDS)
        self.table = table
        self.changes = changes
        self.rate = rate_per_s
        self.written = 0
        self.error: BaseException | None = None
        self._finish = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self._finish.is_set():
                apply_change(self.client, self.table, next(self.changes))
                self.written += 1
                delay = started + self.written / self.rate - time.monotonic()
                if delay > 0:
                    self._finish.wait(delay)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def finish(self) -> int:
        self._finish.set()
        self.join(60)
        assert not self.is_alive(), "the workload did not finish"
        if self.error is not None:
            raise self.error
        return self.written


Worker = WorkerProcess  # one ``python -m connectors.app.cli run`` process with its own log file


class Stack(SinksStack):
    """A table with a stream, a bucket, an index, a lease table, a dead-letter directory and a
    worker configuration (search → OpenSearch at ``worker_os_url``, audit → S3, cache → Redis)."""

    def __init__(self, tmp_path: Path, dynamodb_endpoint: str, moto_endpoint: str, os_url: str, redis_url: str,
                 name: str, *, worker_os_url: str | None = None, cache_policy: dict[str, Any] | None = None,
                 worker_id: str | None = None, items: int = 60):
        suffix = os.urandom(4).hex()
        # mapping: dynamic — the poison-document test needs OpenSearch to refuse a type change
        super().__init__(tmp_path, dynamodb_endpoint=dynamodb_endpoint, s3_endpoint=moto_endpoint,
                         os_url=worker_os_url or os_url, redis_url=redis_url, table=f"fail-{name}-{suffix}",
                         bucket=f"fail-audit-{suffix}", index=f"fail-{name}-{suffix}",
                         search_options={"timeout_s": 10, "mapping": "dynamic"},
                         cache_options={"socket_timeout_s": 2}, cache_policy=cache_policy,
                         worker={"shutdown_grace_s": 20})
        self.os_url = os_url  # the real one (the worker's may be a proxy)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.items = items
        self.workload = Workload(seed=random.Random(name).randrange(10**6), items=items)
        self.changes = self.workload.changes(10**9)
        self.worker_id = worker_id
        self.workers: list[Worker] = []
        self.history = CheckpointHistory(self.aws, self.lease_table, dynamodb_endpoint)
        self.history.start()
        self.load: WorkloadThread | None = None

    # -- processes ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return worker_env({"DDB_CDC_WORKER__ID": self.worker_id} if self.worker_id else None,
                          drop=lambda name: name.startswith("DDB_CDC_"))

    def start_worker(self) -> Worker:
        worker = start_worker(self.config_path, self.tmp / f"worker-{len(self.workers)}.log", env=self.env())
        self.workers.append(worker)
        return worker

    def stop_worker(self, worker: Worker, timeout: float = 40) -> int:
        return worker.stop(timeout)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "connectors.app.cli", *args], env=self.env(), cwd=str(ROOT),
                              capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        if self.load is not None and self.load.is_alive():
            self.load.finish()
        self.history.stop()

    # -- workload ----------------------------------------------------------------------------

    def start_workload(self, rate_per_s: float) -> WorkloadThread:
        self.load = WorkloadThread(self.endpoint, self.table, self.changes, rate_per_s)
        self.load.start()
        return self.load

    def write(self, count: int) -> None:
        """Apply ``count`` more changes of the same workload synchronously (the thread must be done)."""
        assert self.load is None or not self.load.is_alive()
        for _ in range(count):
            apply_change(self.ddb, self.table, next(self.changes))

    # -- state -------------------------------------------------------------------------------

    def wait_checkpoint_at_least(self, seq: str, worker: Worker, timeout: float, what: str) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            worker.alive()
            cp = self.checkpoint()
            if cp is not None and seq_order(cp) >= seq_order(seq):
                return time.monotonic() - started
            time.sleep(0.2)
        pytest.fail(f"{what}: checkpoint {self.checkpoint()} did not reach {seq} within {timeout} s; "
                    f"log:\n{worker.tail()}")

    def wait_caught_up(self, worker: Worker, timeout: float = 120) -> list:
        events = self.stream()
        self.wait_checkpoint_at_least(events[-1].sequence_number, worker, timeout, "catch-up")
        assert self.checkpoint() == events[-1].sequence_number
        return events

    def wait_progress(self, worker: Worker, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker.alive()
            cp = self.checkpoint()
            if cp not in (None, TRIM_HORIZON, LATEST):
                return cp
            time.sleep(0.2)
        pytest.fail(f"no checkpoint within {timeout} s; log:\n{worker.tail()}")

    def sample_checkpoints(self, seconds: float, worker: Worker, every: float = 0.5) -> list[tuple[float, str]]:
        """Checkpoint samples (seconds since the call, checkpoint) for ``seconds``; the worker must stay up."""
        started = time.monotonic()
        samples = []
        while time.monotonic() - started < seconds:
            worker.alive()
            samples.append((round(time.monotonic() - started, 2), self.checkpoint()))
            time.sleep(every)
        return samples

    # -- redis -------------------------------------------------------------------------------

    def cache_keys(self, events) -> list[str]:
        cache = RedisCacheSink("cache", RedisCacheSink.Options(url=self.redis_url, key_templates=CACHE_KEY_TEMPLATES))
        return sorted({k for ev in events for k in cache.keys_for(ev)})

    def preload_key_space(self, extra: list[str] = ()) -> None:
        """Set every cache key the workload can invalidate (and ``extra`` keys), plus the sentinel."""
        pipe = self.redis.pipeline(transaction=False)
        for index in range(self.items):
            key = self.workload.key(index)
            pipe.set(f"item:{key['pk']}:{key['sk']}", "cached")
            pipe.set(f"user:{key['pk']}", "cached")
            for n in range(10):
                pipe.set(f"email:u{index}.{n}@example.com", "cached")
        for key in extra:
            pipe.set(key, "cached")
        pipe.set(SENTINEL, "keep me")
        pipe.execute()

    def preload(self, keys: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, "cached")
        pipe.set(SENTINEL, "keep me")
        pipe.execute()

    # -- end-state checks --------------------------------------------------------------------

    def audit_lines(self) -> list[dict[str, Any]]:
        return list(read_audit_objects(self.s3, self.bucket, "audit"))

    def verify(self, events, *, redis_keys_of=None, exclude_pk: set[str] = frozenset()) -> None:
        """OpenSearch equals the table (minus ``exclude_pk`` items), S3 holds every event, the
        cache keys of ``redis_keys_of`` (default: every event) are gone and the sentinel is not."""
        items = [it for it in scan_items(self.ddb, self.table) if it["pk"] not in exclude_pk]
        results = [
            check_opensearch(self.os_url, self.index, items, lambda it: key_id({"pk": it["pk"], "sk": it["sk"]})),
            check_s3_audit(self.audit_lines(), events),
            check_redis(self.redis, self.cache_keys(events if redis_keys_of is None else redis_keys_of), SENTINEL),
        ]
        failed = [r for r in results if not r.ok]
        assert not failed, "; ".join(f"{r.name}: {r.summary}: {r.problems[:5]}" for r in failed)

    def dlq_entries(self) -> list:
        return list(DirectoryDeadLetterQueue(self.dead_letter).list()) if self.dead_letter.exists() else []


@pytest.fixture
def make_stack(tmp_path, aws_env, dynamodb_local, moto_server, opensearch_url, redis_server):
    made: list[Stack] = []

    def make(name: str, **kwargs: Any) -> Stack:
        stack = Stack(tmp_path, dynamodb_local.endpoint, moto_server.endpoint, opensearch_url, redis_server.url,
                      name, **kwargs)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.close()


def sink_retries(worker: Worker, sink: str) -> list[dict[str, Any]]:
    return [e for e in worker.events("sink_retry") if e.get("sink") == sink]


def assert_growing_stalls(entries: list[dict[str, Any]], worker: Worker, *, at_least_s: float) -> None:
    """One blocked batch: attempts and ``stalled_s`` strictly increase and reach ``at_least_s``."""
    assert len(entries) >= 4, f"expected several sink_retry lines, got {len(entries)}; log:\n{worker.tail()}"
    stalls = [e["stalled_s"] for e in entries]
    attempts = [e["attempt"] for e in entries]
    assert stalls == sorted(stalls) and len(set(stalls)) == len(stalls), stalls
    assert attempts == sorted(attempts), attempts
    assert stalls[-1] >= at_least_s, stalls
    assert all(e.get("on_failure") == "block" for e in entries)


# -- 1. crash loop ---------------------------------------------------------------------------------


def test_crash_loop_sigkill_20_times_loses_nothing_and_never_checkpoints_ahead_of_s3(make_stack):
    rng = random.Random(20240521)
    stack = make_stack("crash", worker_id="crash-loop-worker", items=80)
    stack.preload_key_space()
    t0 = time.monotonic()
    stack.start_workload(rate_per_s=40)
    kills = []
    for cycle in range(20):
        previous = stack.history.latest()
        worker = stack.start_worker()
        worker.wait_event("shard_consumer_started", timeout=30)
        delay = rng.uniform(0.3, 2.0)
        time.sleep(delay)
        if cycle % 2 == 0:
            # every other cycle is killed only once this process moved the checkpoint, so the loop
            # kills right after checkpoints too (and makes progress) however slow the machine is;
            # the other cycles are killed at a random moment, mid-batch or before the first flush
            wait_until(lambda: stack.history.latest() not in (previous, None, TRIM_HORIZON, LATEST),
                       f"cycle {cycle}: a new checkpoint", timeout=60, interval=0.05)
        assert worker.proc.poll() is None, f"cycle {cycle}: the worker exited by itself; log:\n{worker.tail()}"
        before = stack.history.latest()
        worker.proc.send_signal(signal.SIGKILL)
        assert worker.proc.wait(10) == -signal.SIGKILL
        kills.append((cycle, round(delay, 2), round(time.monotonic() - worker.started, 2), before))
    loop_s = time.monotonic() - t0
    written = stack.load.finish()

    final = stack.start_worker()
    try:
        events = stack.wait_caught_up(final, timeout=180)
    finally:
        code = stack.stop_worker(final)
    time.sleep(0.3)
    stack.history.stop()
    total_s = time.monotonic() - t0
    assert code == 0, final.tail()
    assert len(events) == written

    # every restarted process took over its predecessor's lease at once (same worker id)
    for n, worker in enumerate(stack.workers):
        reasons = [e.get("reason") for e in worker.events("lease_taken")]
        assert reasons, f"worker {n} took no lease; log:\n{worker.tail()}"
        assert reasons[0] == ("free" if n == 0 else "own"), (n, reasons)

    # checkpoints: never backwards; for every value observed, everything up to it is in S3
    assert not stack.history.backwards(), stack.history.backwards()[:10]
    observed = {cp for _, cp in stack.history.checkpoints()} - {TRIM_HORIZON, LATEST, None}
    assert SHARD_END not in observed
    audited = {int(line["source"]["sequence_number"]) for line in stack.audit_lines()}
    stream_seqs = sorted(int(ev.sequence_number) for ev in events)
    for cp in sorted(observed, key=int):
        missing = [s for s in stream_seqs if s <= int(cp) and s not in audited]
        assert not missing, f"checkpoint {cp} was ahead of S3: {len(missing)} sequence numbers <= it " \
                            f"never reached the audit log, e.g. {missing[:5]}"
    cps_during_loop = {cp for t, cp in stack.history.checkpoints(until=t0 + loop_s)} - {TRIM_HORIZON, None}
    assert len(cps_during_loop) >= 10, f"the crash loop made too little progress: {len(cps_during_loop)} checkpoints"

    stack.verify(events)
    assert not stack.dlq_entries(), [e.id for e in stack.dlq_entries()]
    print(f"\ncrash loop: 20 SIGKILLs in {loop_s:.1f} s, {written} changes, {len(cps_during_loop)} distinct "
          f"checkpoints during the loop, {len(observed)} observed in all, total {total_s:.1f} s; "
          f"(cycle, delay after consumer start, process age at kill): {[k[:3] for k in kills]}")


# -- 2. Redis outage, on_failure: block -------------------------------------------------------------


def test_redis_outage_blocks_and_holds_the_checkpoint_then_everything_arrives(make_stack, redis_server):
    stack = make_stack("redis-block", items=60)
    stack.preload_key_space()
    t0 = time.monotonic()
    worker = stack.start_worker()
    stack.start_workload(rate_per_s=20)
    stack.wait_progress(worker)
    time.sleep(2.0)

    redis_server.stop()
    outage_started = time.monotonic()
    s0 = stack.last_seq()  # every change written after the stop has a higher sequence number
    samples = stack.sample_checkpoints(OUTAGE_S, worker)
    s_end = stack.last_seq()
    held = samples[-1][1]

    # restart Redis with the worker paused, so the keys set now can only be deleted by deliveries
    # after the restart: the keys of every change written during the outage
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        redis_server.start()
        outage_s = time.monotonic() - outage_started
        during = [ev for ev in stack.stream() if int(ev.sequence_number) > int(s0)]
        stack.preload(stack.cache_keys(during))
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    recovered_in = stack.wait_checkpoint_at_least(during[-1].sequence_number, worker, 90, "recovery")

    assert worker.proc.poll() is None
    assert held not in (None, TRIM_HORIZON)
    late = [cp for t, cp in samples if t >= 3.0]
    assert len(set(late)) == 1, f"the checkpoint moved during the outage: {samples}"
    assert all(seq_order(cp) <= seq_order(s0) for _, cp in samples), (s0, samples)
    assert int(held) < int(s_end), "changes kept coming during the outage"
    assert len(during) >= 0.5 * 20 * OUTAGE_S
    retries = sink_retries(worker, "cache")
    assert_growing_stalls(retries, worker, at_least_s=OUTAGE_S * 0.6)
    assert all(e.get("operation") == "write" for e in retries)
    check = check_redis(stack.redis, stack.cache_keys(during), SENTINEL)
    assert check.ok, f"{check.summary}: {check.problems[:5]}"

    # a fresh batch after recovery: every key of it is invalidated
    stack.load.finish()
    stack.wait_caught_up(worker)
    stack.preload_key_space()
    before_final = stack.last_seq()
    stack.write(150)
    events = stack.wait_caught_up(worker)
    final_batch = [ev for ev in events if int(ev.sequence_number) > int(before_final)]
    assert len(final_batch) == 150
    code = stack.stop_worker(worker)
    assert code == 0, worker.tail()
    stack.verify(events, redis_keys_of=final_batch)
    assert not stack.dlq_entries()
    assert stack.checkpoint() == events[-1].sequence_number
    print(f"\nredis outage (block): {outage_s:.1f} s, checkpoint held at {held} while {len(during)} changes "
          f"came in, {len(retries)} sink_retry lines (stalled_s up to {retries[-1]['stalled_s']}), caught up "
          f"{recovered_in:.1f} s after the restart; test {time.monotonic() - t0:.1f} s")


# -- 3. OpenSearch refusing connections, on_failure: block ------------------------------------------


def test_opensearch_refusing_connections_blocks_and_holds_the_checkpoint_then_everything_arrives(make_stack,
                                                                                                 opensearch_url):
    proxy = TcpProxy(opensearch_url)
    try:
        stack = make_stack("os-block", items=60, worker_os_url=proxy.url)
        stack.preload_key_space()
        t0 = time.monotonic()
        worker = stack.start_worker()
        stack.start_workload(rate_per_s=20)
        stack.wait_progress(worker)
        time.sleep(2.0)

        proxy.refuse()
        outage_started = time.monotonic()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        s0 = stack.last_seq()
        samples = stack.sample_checkpoints(OUTAGE_S, worker)
        s_end = stack.last_seq()
        held = samples[-1][1]
        proxy.listen()
        outage_s = time.monotonic() - outage_started
        recovered_in = stack.wait_checkpoint_at_least(s_end, worker, 90, "recovery")

        assert held not in (None, TRIM_HORIZON)
        late = [cp for t, cp in samples if t >= 3.0]
        assert len(set(late)) == 1, f"the checkpoint moved during the outage: {samples}"
        assert all(seq_order(cp) <= seq_order(s0) for _, cp in samples), (s0, samples)
        assert int(held) < int(s_end), "changes kept coming during the outage"
        retries = sink_retries(worker, "search")
        assert_growing_stalls(retries, worker, at_least_s=OUTAGE_S * 0.6)

        stack.load.finish()
        before_final = stack.last_seq()
        stack.write(100)
        events = stack.wait_caught_up(worker)
        assert sum(int(ev.sequence_number) > int(before_final) for ev in events) == 100
        code = stack.stop_worker(worker)
        assert code == 0, worker.tail()
        stack.verify(events)  # OpenSearch read directly (not through the proxy)
        assert not stack.dlq_entries()
        print(f"\nopensearch refusing connections: {outage_s:.1f} s, checkpoint held at {held}, "
              f"{len(retries)} sink_retry lines (stalled_s up to {retries[-1]['stalled_s']}), caught up "
              f"{recovered_in:.1f} s after the listener came back; test {time.monotonic() - t0:.1f} s")
    finally:
        proxy.close()


# -- 4. Redis outage, on_failure: dead_letter ------------------------------------------------------


class DlqRun:
    """What the dead-letter outage scenario recorded (shared by the two tests below)."""

    stack: Stack
    worker: Worker
    code: int
    cp_at_stop: str
    s0: str
    samples: list
    events: list
    entries: list
    seconds: float


@pytest.fixture(scope="module")
def dlq_run(tmp_path_factory, dynamodb_local, moto_server, opensearch_server, _redis_session):
    redis_srv = _redis_session
    redis_srv.start()
    redis.Redis.from_url(redis_srv.url).flushall()
    run = DlqRun()
    stack = Stack(tmp_path_factory.mktemp("dlq"), dynamodb_local.endpoint, moto_server.endpoint,
                  opensearch_server.url, redis_srv.url, "redis-dlq", items=60,
                  cache_policy={"on_failure": "dead_letter", "retry_budget_s": 3})
    run.stack = stack
    try:
        t0 = time.monotonic()
        worker = run.worker = stack.start_worker()
        stack.start_workload(rate_per_s=20)
        stack.wait_progress(worker)
        time.sleep(2.0)
        redis_srv.stop()
        run.cp_at_stop = stack.checkpoint()
        run.s0 = stack.last_seq()
        run.samples = stack.sample_checkpoints(OUTAGE_S, worker)
        run.entries_during = stack.dlq_entries()
        redis_srv.start()
        time.sleep(3.0)
        stack.load.finish()
        run.events = stack.wait_caught_up(worker)
        run.code = stack.stop_worker(worker)
        run.entries = stack.dlq_entries()
        run.seconds = time.monotonic() - t0
        yield run
    finally:
        if not redis_srv.running:
            redis_srv.start()
        stack.close()


def test_redis_outage_with_dead_letter_goes_on_and_dead_letters_full_events(dlq_run):
    run, stack = dlq_run, dlq_run.stack
    assert run.code == 0, run.worker.tail()
    samples = run.samples
    # the checkpoint kept advancing during the outage, past what was written when Redis went down
    moved = [cp for t, cp in samples if t >= 5.0]
    assert len(set(moved)) >= 3, f"the checkpoint did not keep advancing: {samples}"
    assert seq_order(samples[-1][1]) > seq_order(run.s0), (run.s0, samples[-1])
    assert [seq_order(cp) for _, cp in samples] == sorted(seq_order(cp) for _, cp in samples)
    assert run.entries_during, "nothing was dead-lettered during the outage"

    by_seq = {ev.sequence_number: ev for ev in run.events}
    entries = run.entries
    assert entries and all(e.kind == "delivery" and e.sink == "cache" for e in entries), \
        [(e.kind, e.sink, e.error[:80]) for e in entries]
    for e in entries:
        ev = by_seq.get(e.sequence_number)
        assert ev is not None, e.sequence_number
        assert int(e.sequence_number) > int(run.cp_at_stop), "an event delivered before the outage was dead-lettered"
        assert e.event == event_to_record_dict(ev), f"entry {e.id} does not hold the full event"
        assert e.shard_id == ev.source.shard_id and e.stream_arn == stack.stream_arn
        assert "retry budget spent" in e.error, e.error
        assert e.attempts >= 2
    ops = {by_seq[e.sequence_number].operation.name for e in entries}
    assert "MODIFY" in ops, ops  # a MODIFY entry carries both images
    assert any(by_seq[e.sequence_number].before and by_seq[e.sequence_number].after for e in entries)
    # the changes written during the outage that the worker read before Redis came back are all there
    dead = {int(e.sequence_number) for e in entries}
    assert len(dead) >= 0.5 * 20 * (OUTAGE_S - 5), len(dead)
    # the other sinks got everything
    items = scan_items(stack.ddb, stack.table)
    r1 = check_opensearch(stack.os_url, stack.index, items, lambda it: key_id({"pk": it["pk"], "sk": it["sk"]}))
    r2 = check_s3_audit(stack.audit_lines(), run.events)
    assert r1.ok and r2.ok, (r1.summary, r1.problems[:5], r2.summary, r2.problems[:5])
    assert stack.checkpoint() == run.events[-1].sequence_number
    print(f"\nredis outage (dead_letter, budget 3 s): {len(entries)} events dead-lettered, checkpoint went "
          f"{run.cp_at_stop} -> {samples[-1][1]} during the outage; scenario {run.seconds:.1f} s")


def test_dlq_redrive_delivers_the_dead_lettered_cache_invalidations(dlq_run):
    run, stack = dlq_run, dlq_run.stack
    by_seq = {ev.sequence_number: ev for ev in run.events}
    redrive = [by_seq[e.sequence_number] for e in run.entries if e.sink == "cache"]
    assert redrive
    keys = stack.cache_keys(redrive)
    stack.preload(keys)
    proc = stack.cli("dlq", "redrive", "--config", str(stack.config_path), "--sink", "cache")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    left = [e for e in stack.dlq_entries() if e.sink == "cache"]
    assert not left, f"{len(left)} cache entries still in the DLQ after the redrive"
    check = check_redis(stack.redis, keys, SENTINEL)
    assert check.ok, f"{check.summary}: {check.problems[:5]}"


# -- 5. poison document -----------------------------------------------------------------------------


def test_a_document_opensearch_rejects_is_dead_lettered_and_later_changes_flow(make_stack):
    stack = make_stack("poison", items=60)
    poison_key = {"pk": "poison#00001", "sk": Decimal(3)}
    poison = {**poison_key, "count": "twelve", "email": "poison@example.com", "name": "poison"}
    stack.preload_key_space(extra=["item:poison#00001:3", "user:poison#00001", "email:poison@example.com"])
    t0 = time.monotonic()
    worker = stack.start_worker()
    stack.write(150)  # `count` is a number in every workload item: the index maps it as long
    stack.wait_caught_up(worker)
    stack.ddb.put_item(TableName=stack.table, Item=encode_item(poison))
    poison_seq = stack.last_seq()
    stack.write(150)
    events = stack.wait_caught_up(worker)
    code = stack.stop_worker(worker)
    assert code == 0, worker.tail()

    entries = stack.dlq_entries()
    assert len(entries) == 1, [(e.sink, e.sequence_number, e.error[:100]) for e in entries]
    entry = entries[0]
    ev = next(e for e in events if e.sequence_number == poison_seq)
    assert entry.kind == "delivery" and entry.sink == "search"
    assert entry.sequence_number == poison_seq and entry.shard_id == ev.source.shard_id
    assert "mapper_parsing_exception" in entry.error, entry.error
    assert entry.event == event_to_record_dict(ev), "the entry holds the full event"
    assert ev.after == poison and ev.before is None
    logged = [e for e in worker.events("event_dead_lettered") if e.get("sequence_number") == poison_seq]
    assert logged and logged[0].get("sink") == "search"
    assert not sink_retries(worker, "search"), "a permanent error is not retried"
    # later changes flowed: the index equals the table without the poison item, S3 and Redis complete
    later = [e for e in events if int(e.sequence_number) > int(poison_seq)]
    assert len(later) == 150
    stack.verify(events, exclude_pk={"poison#00001"})
    assert stack.checkpoint() == events[-1].sequence_number
    print(f"\npoison document: dead-lettered ({entry.error[:100]}...), 150 later changes delivered; "
          f"test {time.monotonic() - t0:.1f} s")
