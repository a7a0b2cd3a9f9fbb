"""Change-to-sink latency of a real worker against real servers (issue 7, "latency").

``python -m benchmarks.latency [--rates 200,1000] [--duration 20] [--json FILE]``

What runs, all on 127.0.0.1 (:mod:`connectors.embedded.servers`): DynamoDB Local (table and stream, and the
worker's lease table), moto server (S3, in this process), osmem-server (OpenSearch API) and
redis-server. A table with a NEW_AND_OLD_IMAGES stream is created and a real
:class:`pipeline.runtime.worker.Worker` is built by :func:`connectors.app.wiring.build_worker` from a
:class:`pipeline.config.Settings` as a user would write it (defaults for everything the latency
depends on: ``idle_interval_ms`` 250, ``checkpoint_interval_s`` 5, ``max_records_per_call`` 1000,
DynamoDB lease table), with the three built-in sinks ``opensearch`` → ``s3_audit`` →
``redis_cache``, plus two probe sinks of this module: ``probe_first`` before them and ``probe``
LAST. The fan-out hands a batch to the sinks in order, so ``probe``'s arrival time includes the
delivery of the three real sinks. The worker runs in a thread of this process; its read path is
whatever :class:`~connectors.dynamodb_streams.source.DynamoDBStreamSource` uses by default.

The load comes from a separate writer process (so its CPU does not share the worker's GIL): a
pool of threads sends PutItem requests at a steady rate (change ``i`` is due at ``start + i/rate``;
a late thread sends at once, and the achieved rate is reported). Each request is SigV4-signed by
botocore and sent over a kept-alive ``http.client`` connection — boto3's ``put_item`` costs about
2 ms of client CPU per call, so one process cannot drive 1,000/s on two cores. Items are
:class:`connectors.embedded.workload.Workload` items (every DynamoDB type: nested maps and lists, string /
number / binary sets, binary, 38-digit numbers, unicode; one type per attribute name, so OpenSearch's
dynamic mapping accepts every document) padded with a text attribute to 1–4 KB (mean ≈ 1.6 KB);
about 40 % of the puts overwrite an item written earlier in the same phase (MODIFY with both
images), the rest insert (INSERT). Every item carries ``bench_id`` (``PHASE:i``) and
``bench_t_ns``, the writer's ``time.time_ns()`` taken just before the request is sent — DynamoDB
Local rounds ApproximateCreationDateTime to the minute, so the stream's own timestamp cannot be
used. Deletes are not part of the load: a REMOVE record has no new image to carry the write time.

**change-to-sink latency** = ``probe`` arrival (``time.time_ns()`` when the fan-out called its
``write``) − ``bench_t_ns``; it therefore includes the PutItem round trip. Per change it is split
into ``wait`` (write → start of the GetRecords call that returned it), ``get_records`` (that
call), ``decode`` (end of the call → ``probe_first``) and ``sinks`` (``probe_first`` →
``probe``: OpenSearch bulk, S3 buffer, Redis DEL); the means of the parts add up to the mean.

Phases: a warm-up at the lowest rate (``warmup_s``; JIT of DynamoDB Local, index creation in
OpenSearch; not reported), then each rate for ``duration_s`` in order. After each phase the
benchmark waits until every written change reached ``probe`` and every sink (``drain_timeout_s``).
Targets at 200 changes/s: p50 ≤ 250 ms, p99 ≤ 1 s, for the probe and for Redis and S3 (``cache``,
``audit``) while OpenSearch (or an injected ``--slow-sink-s`` sink) lags.

**Drain and osmem's floor** (issue 15 item 6). Each phase reports per sink whether it drained
(``per_sink_drained``) and which sinks were slower than the load (``slower_than_offered``: took
changes in at under 95 % of the achieved write rate and were still taking them in more than
:data:`SLOWER_AFTER_S` after the last write — a sink held back by the lanes' backpressure is listed
too); the drain target holds when every sink drained except at most one slower sink. Every bulk
body the OpenSearch sink sent is kept (:class:`_BulkRecorder`); after the worker stopped, the same
bodies are posted again in the same order, one at a time, with opensearch-py into a fresh copy of
the index (:func:`_opensearch_floor`), and each phase reports the sink's documents/s (its actions
over its busy span) next to that floor, over the whole phase and over the backlog it sent *alone*
(after the last write and after every other sink had its last change, so that, as for the floor,
nothing else of the run competes for the CPU). Target for an OpenSearch sink slower than the load:
≥ 0.9 × floor, alone.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.events import Batch
from pipeline.sink import Sink

__all__ = ["run_latency", "Endpoints", "ProbeSink", "MarkSink", "TARGET_RATE", "TARGET_P50_MS", "TARGET_P99_MS",
           "main"]

#: The rate the targets apply to (changes/s), and the targets (ms).
TARGET_RATE = 200
TARGET_P50_MS = 250.0
TARGET_P99_MS = 1000.0

ID_ATTR = "bench_id"
TIME_ATTR = "bench_t_ns"
_PLACEHOLDER = "__BENCH_T_NS__"
REGION = "us-east-1"
_ACCESS_KEY = "latency"
_SECRET_KEY = "latency"  # static fake credentials: every server here accepts any
SEED = 20260107
#: The built-in sinks, in the order the fan-out calls them.
SINK_TYPES = ("opensearch", "s3_audit", "redis_cache")
#: The sinks that must hold the latency target while slower ones lag (issue 15 item 6), and the
#: share of osmem's own rate a backlogged OpenSearch sink must reach (same bodies posted directly).
FAST_SINKS = ("cache", "audit")
FLOOR_SHARE = 0.9
#: a sink counts as slower than the offered rate only when its last change arrived more than this
#: long after the phase's last write (s): twice the p99 target, so a sink that keeps up never does
SLOWER_AFTER_S = 2 * TARGET_P99_MS / 1000
#: Share of puts that overwrite an item already written in the phase (MODIFY records).
OVERWRITE_SHARE = 0.4


@dataclass(frozen=True)
class Endpoints:
    """Already-running servers to use instead of starting new ones (the test suite's fixtures):
    DynamoDB Local and moto (``http://127.0.0.1:PORT``), osmem-server base URL, Redis URL."""

    dynamodb: str
    s3: str
    opensearch: str
    redis: str


# --------------------------------------------------------------------------------------------
# probe sinks


class _ReadTimer:
    """Wraps a source's ``get_records`` (on the instance) to time every call; ``last`` holds the
    (start, end) ns of the most recent call of the calling thread."""

    def __init__(self, source: Any):
        self.inner = source.get_records
        self.calls: list[tuple[int, int, int]] = []  # (start ns, end ns, records)
        self._local = threading.local()
        self._lock = threading.Lock()
        source.get_records = self

    def __call__(self, iterator: str, limit: int) -> Any:
        start = time.time_ns()
        result = self.inner(iterator, limit)
        end = time.time_ns()
        self._local.last = (start, end)
        with self._lock:
            self.calls.append((start, end, len(result.records)))
        return result

    @property
    def last(self) -> tuple[int, int] | None:
        return getattr(self._local, "last", None)


class _WriteTimer:
    """Wraps a sink instance's ``write`` to time every call: ``calls`` = [(start ns, end ns, events)];
    ``arrivals[phase][i]`` = (write ns, ns when the sink's ``write`` returned) for the first
    successful delivery of change ``PHASE:i`` to this sink (per-sink latency, issue 15)."""

    def __init__(self, sink: Any):
        self.inner = sink.write
        self.calls: list[tuple[int, int, int]] = []
        self.arrivals: dict[str, dict[int, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        sink.write = self

    def __call__(self, batch: Batch) -> None:
        start = time.time_ns()
        ok = False
        try:
            result = self.inner(batch)
            ok = True
            return result
        finally:
            end = time.time_ns()
            found = _bench_ids(batch) if ok else []
            with self._lock:
                self.calls.append((start, end, len(batch.events)))
                for phase, index, written in found:
                    self.arrivals.setdefault(phase, {}).setdefault(index, (written, end))

    def count(self, phase: str) -> int:
        with self._lock:
            return len(self.arrivals.get(phase, {}))


class _BulkRecorder:
    """Wraps an OpenSearch sink instance's ``_send`` (one bulk request) to keep every request
    body it sent, in send order: ``bodies`` = [(start ns, end ns, body bytes, actions)]. The
    floor (:func:`_opensearch_floor`) posts the same bodies to the same server directly."""

    def __init__(self, sink: Any):
        self.inner = sink._send
        self.bodies: list[tuple[int, int, bytes, int]] = []
        self._lock = threading.Lock()
        sink._send = self

    def __call__(self, client: Any, chunk: list) -> Any:
        start = time.time_ns()
        try:
            return self.inner(client, chunk)
        finally:
            end = time.time_ns()
            with self._lock:
                self.bodies.append((start, end, b"".join(a.lines for a in chunk), len(chunk)))


def _opensearch_floor(url: str, index: str, bodies: Sequence[tuple[int, int, bytes, int]],
                      windows: Sequence[tuple[str, int, int, int, int]]) -> dict[str, dict[str, Any]]:
    """The server's own rate for the sink's work: every bulk body the sink sent (``bodies`` from
    :class:`_BulkRecorder`, in send order), posted again one at a time with opensearch-py
    ``bulk`` into a fresh copy of the sink's index (same mappings, behind an alias, ``_index``
    rewritten), so each request meets the same documents the sink's did. ``windows`` =
    [(phase, first write ns, last write ns, others done ns, end ns)]: the bodies the sink
    *started* in a window are timed as that phase; the rest (warm-up) are posted untimed first. Returns per phase
    ``{"actions", "requests", "seconds", "docs_per_s", "refused"}`` for the floor (``refused``:
    actions the server refused other than a 409 version conflict; non-zero makes the floor
    suspect), ``"sink_docs_per_s"`` (the same actions over the sink's busy span: first send start
    → last send end) and ``"sink_vs_floor"``; and ``"alone"``: the same figures for the bodies the
    sink started after the phase's last write *and* after every other sink had taken in its last
    change of the phase (``others done``; ``None`` when there are none) — the sink's backlog,
    sent while nothing else of the run (writer, DynamoDB Local, the reader, the other sinks)
    competes for the machine's two cores, as nothing does while the floor is measured. Raises what opensearch-py raises when the server refuses the copy."""
    import re

    from opensearchpy import OpenSearch

    client = OpenSearch(hosts=[url], timeout=120)
    source = client.indices.get(index=index)
    concrete, spec = next(iter(source.items()))
    floor = f"{index}-floor"
    client.indices.create(index=f"{floor}-000001", body={"mappings": spec.get("mappings", {}),
                                                         "aliases": {floor: {}}})
    target = f'"_index":"{floor}"'.encode()
    pattern = re.compile(rb'"_index":"[^"]*"')
    out: dict[str, dict[str, Any]] = {}
    try:
        for start, end, body, actions in sorted(bodies, key=lambda b: b[0]):
            window = next((w for w in windows if w[1] <= start < w[4]), None)
            t0 = time.perf_counter()
            response = client.bulk(body=pattern.sub(target, body))
            took = time.perf_counter() - t0
            # a refused action would make the floor look fast; a 409 is a re-sent version, as for the sink
            refused = sum(1 for item in response.get("items", []) for result in item.values()
                          if result.get("status", 200) >= 300 and result.get("status") != 409)
            if window is None:
                continue
            f = out.setdefault(window[0], {"actions": 0, "requests": 0, "seconds": 0.0, "refused": 0,
                                           "sink_first_ns": start, "sink_last_ns": end})
            parts = [f]
            if start >= max(window[2], window[3]):  # the backlog, sent alone
                parts.append(f.setdefault("alone", {"actions": 0, "requests": 0, "seconds": 0.0, "refused": 0,
                                                    "sink_first_ns": start, "sink_last_ns": end}))
            for part in parts:
                part["refused"] += refused
                part["actions"] += actions
                part["requests"] += 1
                part["seconds"] += took
                part["sink_last_ns"] = max(part["sink_last_ns"], end)
    finally:
        with contextlib.suppress(Exception):
            client.indices.delete(index=f"{floor}-000001")
        with contextlib.suppress(Exception):
            client.close()
    for f in out.values():
        f.setdefault("alone", None)
        for part in (f, f["alone"]):
            if part is None:
                continue
            span = (part.pop("sink_last_ns") - part.pop("sink_first_ns")) / 1e9
            part["docs_per_s"] = round(part["actions"] / part["seconds"], 1) if part["seconds"] > 0 else 0.0
            part["seconds"] = round(part["seconds"], 3)
            part["sink_docs_per_s"] = round(part["actions"] / span, 1) if span > 0 else 0.0
            part["sink_vs_floor"] = (round(part["sink_docs_per_s"] / part["docs_per_s"], 2)
                                     if part["docs_per_s"] else None)
    return out


def _bench_ids(batch: Batch) -> list[tuple[str, int, int]]:
    """(phase, index, write ns) of every change of ``batch`` written by the benchmark's writer."""
    found = []
    for event in batch.events:
        image = event.after
        if image is None:
            continue
        bench_id, written = image.get(ID_ATTR), image.get(TIME_ATTR)
        if bench_id is None or written is None:
            continue
        phase, _, index = str(bench_id).partition(":")
        found.append((phase, int(index), int(written)))
    return found


class SleepSink(Sink):
    """A test sink that sleeps ``delay_s`` per ``write`` (an injected slow sink: issue 15 item 6)."""

    thread_safe = True

    def __init__(self, name: str = "slow", delay_s: float = 2.0):
        super().__init__(name)
        self.delay_s = delay_s

    def write(self, batch: Batch) -> None:
        time.sleep(self.delay_s)


class MarkSink(Sink):
    """First sink: records, per batch, when the fan-out started on it and the (start, end) of the
    GetRecords call it came from (``marks[(shard, checkpoint sequence number)]``)."""

    thread_safe = True

    def __init__(self, name: str = "probe_first", timer: _ReadTimer | None = None):
        super().__init__(name)
        self.timer = timer
        self.marks: dict[tuple[str, str | None], tuple[int, int, int]] = {}
        self._lock = threading.Lock()

    def write(self, batch: Batch) -> None:
        now = time.time_ns()
        read = self.timer.last if self.timer is not None else None
        start, end = read if read is not None else (now, now)
        with self._lock:
            self.marks[(batch.shard_id, batch.checkpoint_sequence_number)] = (start, end, now)


class ProbeSink(Sink):
    """Probe sink: records, per change, when its lane handed it over. Since lanes (issue 15) it has
    a lane of its own, so this is read + decode + hand-off, not "after every other sink"; the
    per-sink figures come from ``_WriteTimer``.

    ``arrivals[phase][i] = (write ns, arrival ns, batch key)`` for the first arrival of change
    ``PHASE:i`` (from the new image's ``bench_id`` / ``bench_t_ns``); later arrivals
    (at-least-once re-delivery) are counted in ``duplicates[phase]``.
    """

    thread_safe = True

    def __init__(self, name: str = "probe"):
        super().__init__(name)
        self.arrivals: dict[str, dict[int, tuple[int, int, tuple]]] = {}
        self.duplicates: dict[str, int] = {}
        self.batches = 0
        self._lock = threading.Lock()

    def write(self, batch: Batch) -> None:
        now = time.time_ns()
        key = (batch.shard_id, batch.checkpoint_sequence_number)
        found = _bench_ids(batch)
        with self._lock:
            self.batches += 1
            for phase, index, written in found:
                seen = self.arrivals.setdefault(phase, {})
                if index in seen:
                    self.duplicates[phase] = self.duplicates.get(phase, 0) + 1
                else:
                    seen[index] = (written, now, key)

    def count(self, phase: str) -> int:
        with self._lock:
            return len(self.arrivals.get(phase, {}))


# --------------------------------------------------------------------------------------------
# the writer process


def _writer_threads(rate: float) -> int:
    """Concurrent PutItem connections: enough for ~40 ms round trips at ``rate``."""
    return max(4, min(64, math.ceil(rate / 25)))


def _image_target(rng: random.Random) -> int:
    """Target image size in bytes: 1–4 KB, skewed to the small end (1024 + 3072·u⁴, mean ≈ 1.6 KB)."""
    return 1024 + int(3072 * rng.random() ** 4)


def _plan_bodies(table: str, phase: str, total: int, seed: int) -> list[bytes]:
    """``total`` PutItem request bodies (wire JSON) with the write-time placeholder; deterministic.

    Images are :class:`connectors.embedded.workload.Workload` items (every DynamoDB type, nested maps and
    lists, sets, binary, 38-digit numbers, unicode; one type per attribute name, so OpenSearch's
    dynamic mapping takes every document) padded with a text attribute to 1–4 KB.
    """
    import orjson

    from connectors.embedded.workload import Workload
    from pipeline.codec import encode_item

    rng = random.Random(f"{seed}/{phase}")
    workload = Workload(seed=rng.randrange(2**32), items=max(1, total))
    written: list[int] = []
    bodies = []
    for i in range(total):
        if written and rng.random() < OVERWRITE_SHARE:
            item = rng.choice(written)
        else:
            item = len(written)
            written.append(item)
        values = workload.item(item)
        values["pk"] = f"bench#{phase}#{item:06d}"
        image = encode_item(values)
        image[ID_ATTR] = {"S": f"{phase}:{i}"}
        image[TIME_ATTR] = {"N": _PLACEHOLDER}
        pad = _image_target(rng) - len(orjson.dumps(image)) - len('"notes_text":{"S":""},') + len(_PLACEHOLDER) - 19
        if pad > 0:
            image["notes_text"] = {"S": "".join(rng.choice(_PAD_WORDS) for _ in range(pad // 6 + 1))[:pad]}
        bodies.append(orjson.dumps({"TableName": table, "Item": image}))
    return bodies


_PAD_WORDS = ("alpha ", "bravo ", "delta ", "echo  ", "kilo  ", "lima  ", "order ", "parcel", "north ", "ready ")


def _writer_main(conn: Any, spec: dict[str, Any]) -> None:
    """Writer process: plan, report ``ready``, wait for ``go``, write at the rate, send the results."""
    try:
        result = _write_phase(conn, spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    conn.send(result)


def _write_phase(conn: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from urllib.parse import urlsplit

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    rate, total = float(spec["rate"]), int(spec["total"])
    bodies = _plan_bodies(spec["table"], spec["phase"], total, spec["seed"])
    endpoint = spec["endpoint"].rstrip("/")
    parts = urlsplit(endpoint)
    signer = SigV4Auth(Credentials(_ACCESS_KEY, _SECRET_KEY), "dynamodb", REGION)
    base_headers = {"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "DynamoDB_20120810.PutItem"}

    def headers_for(body: bytes) -> dict[str, str]:
        request = AWSRequest(method="POST", url=endpoint + "/", data=body, headers=dict(base_headers))
        signer.add_auth(request)
        return dict(request.headers.items())

    counter = itertools.count()
    sent: list[tuple[int, int, int, int, int] | None] = [None] * total  # (i, send ns, rtt ns, late ns, attempts)
    failures: list[str] = []
    conn.send({"ready": True, "planned": total})
    if conn.recv() != "go":
        return {"error": "not started"}
    start = time.perf_counter() + 0.05

    def run() -> None:
        client: http.client.HTTPConnection | None = None
        while True:
            i = next(counter)
            if i >= total:
                break
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            late = max(0.0, time.perf_counter() - due)
            error = ""
            for attempt in range(1, 6):
                if client is None:
                    client = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                written = time.time_ns()
                body = bodies[i].replace(_PLACEHOLDER.encode(), str(written).encode(), 1)
                try:
                    client.request("POST", "/", body=body, headers=headers_for(body))
                    response = client.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    client.close()
                    client, error = None, f"{type(exc).__name__}: {exc}"
                    time.sleep(0.05 * attempt)
                    continue
                if response.status == 200:
                    sent[i] = (i, written, time.time_ns() - written, int(late * 1e9), attempt)
                    error = ""
                    break
                error = f"HTTP {response.status}: {data[:200]!r}"
                if response.status < 500 and b"Throttl" not in data:
                    break
                time.sleep(0.05 * attempt)
            if error:
                failures.append(f"{spec['phase']}:{i}: {error}")
        if client is not None:
            client.close()

    threads = [threading.Thread(target=run, name=f"writer-{n}", daemon=True) for n in range(spec["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = [s for s in sent if s is not None]
    sends = sorted(s[1] for s in ok)
    achieved = (len(sends) - 1) / ((sends[-1] - sends[0]) / 1e9) if len(sends) > 1 and sends[-1] > sends[0] else 0.0
    return {
        "planned": total,
        "ok": [s[0] for s in ok],
        "failures": failures,
        "achieved_rate": achieved,
        "first_send_ns": sends[0] if sends else 0,
        "last_send_ns": sends[-1] if sends else 0,
        "put_rtt_ms": _summary([s[2] / 1e6 for s in ok]),
        "late_ms": _summary([s[3] / 1e6 for s in ok]),
        "retried": sum(1 for s in ok if s[4] > 1),
        "bytes_mean": round(sum(len(b) for b in bodies) / max(1, len(bodies))),
    }


# --------------------------------------------------------------------------------------------
# statistics


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0–100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _summary(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {"count": len(ordered), "mean": round(sum(ordered) / len(ordered), 2),
            "p50": round(_percentile(ordered, 50), 2), "p95": round(_percentile(ordered, 95), 2),
            "p99": round(_percentile(ordered, 99), 2), "max": round(ordered[-1], 2)}


# --------------------------------------------------------------------------------------------
# environment


@contextlib.contextmanager
def _clean_environment(workdir: Path) -> Iterator[None]:
    """No DDB_CDC_* overrides (Settings would take them over the values here), no user AWS
    profile or endpoint; restored afterwards."""
    removed = {k: v for k, v in os.environ.items()
               if k.startswith("DDB_CDC_") or k.startswith("AWS_ENDPOINT_URL")
               or k in {"AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}}
    updates = {"AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials")}
    saved = {k: os.environ.get(k) for k in updates}
    for key in removed:
        del os.environ[key]
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ.update(removed)


@contextlib.contextmanager
def _worker_log(path: Path) -> Iterator[None]:
    """structlog JSON lines into ``path`` for the run (the console stays for the report)."""
    import structlog

    from pipeline.logs import configure_logging

    old = structlog.get_config()
    with open(path, "a", encoding="utf-8") as stream:
        configure_logging("INFO", "json", stream=stream)
        try:
            yield
        finally:
            structlog.configure(**old)


@contextlib.contextmanager
def _servers(endpoints: Endpoints | None, say: Any) -> Iterator[Endpoints]:
    if endpoints is not None:
        yield endpoints
        return
    from connectors.embedded.servers import DynamoDBLocal, MotoServer, OpenSearchServer, RedisServer

    with contextlib.ExitStack() as stack:
        say("starting DynamoDB Local, moto server, osmem-server and redis-server on 127.0.0.1 …")
        ddb = stack.enter_context(DynamoDBLocal())
        moto = stack.enter_context(MotoServer())
        search = stack.enter_context(OpenSearchServer(japanese=False, freeze=False))
        redis_server = stack.enter_context(RedisServer())
        say(f"DynamoDB Local {ddb.endpoint}, moto {moto.endpoint}, osmem-server {search.url}, "
            f"{redis_server.kind} {redis_server.url}")
        yield Endpoints(dynamodb=ddb.endpoint, s3=moto.endpoint, opensearch=search.url, redis=redis_server.url)


def _boto_client(service: str, endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        service, endpoint_url=endpoint, region_name=REGION, aws_access_key_id=_ACCESS_KEY,
        aws_secret_access_key=_SECRET_KEY, config=Config(retries={"mode": "standard", "max_attempts": 5}))


# --------------------------------------------------------------------------------------------
# the run


def run_latency(rates: Sequence[int] = (200, 1000), duration_s: float = 20.0, *, console: Any = None,
                warmup_s: float = 5.0, endpoints: Endpoints | None = None, idle_interval_ms: int | None = None,
                checkpoint_interval_s: float | None = None, max_records_per_call: int | None = None,
                drain_timeout_s: float = 120.0, seed: int = SEED,
                sinks: Sequence[str] = SINK_TYPES, slow_sink_s: float = 0.0) -> dict[str, Any]:
    """Run the latency benchmark (module doc) and return its figures.

    - ``rates``: changes/s, one phase each, in order; ``duration_s``: seconds of writing per phase.
    - ``console``: a ``rich.console.Console`` to print progress and the result tables (None: silent).
    - ``warmup_s``: warm-up at the lowest rate before the first phase (0: none).
    - ``endpoints``: servers to use (else DynamoDB Local, moto, osmem-server and Redis are started
      and stopped here). Tables, bucket and index get unique names and are removed at the end.
    - ``idle_interval_ms`` / ``checkpoint_interval_s`` / ``max_records_per_call``: override the
      worker's ``source`` settings (None: the defaults a user gets).
    - ``drain_timeout_s``: after a phase's last write, how long to wait for every change to reach
      the probe (changes still missing then are reported as not arrived).
    - ``sinks``: which built-in sinks to run, in this order, between the probes (default all three:
      ``opensearch``, ``s3_audit``, ``redis_cache``; fewer isolates one sink's share).
    - ``slow_sink_s`` > 0: also run a test sink ``slow`` that sleeps this many seconds per batch
      (per-sink lanes: the others' latency should not change).

    Per-sink figures (issue 15): ``phases[i]["per_sink_latency_ms"][sink]`` = change-to-sink
    latency summary of each sink (write → that sink's ``write`` returned), ``per_sink_arrived``
    and ``per_sink_rate`` (changes/s the sink took in from the phase's first write to its last
    arrival). The phase's drain waits for every sink (up to ``drain_timeout_s``).

    Returns ``{"settings", "machine", "phases": [per rate: target_rate, achieved_rate, written,
    arrived, missing, duplicates, all_arrived, latency_ms {count, mean, p50, p95, p99, max},
    breakdown_ms, get_records, put_rtt_ms, writer_late_ms, failures]``, ``"targets"``,
    ``"worker_exit_code"``, ``"all_arrived"``}``. Raises ``EmbeddedServerError`` when a server
    cannot start, ``RuntimeError`` when the worker or the writer fails.
    """
    rates = [int(r) for r in rates]
    if not rates or min(rates) <= 0 or duration_s <= 0:
        raise ValueError("rates must be positive changes/s and duration_s > 0")

    def say(text: str) -> None:
        if console is not None:
            console.print(text, highlight=False)

    workdir = Path(tempfile.mkdtemp(prefix="ddb-cdc-latency-"))
    ok = False
    try:
        with _clean_environment(workdir), _servers(endpoints, say) as servers, _worker_log(workdir / "worker.log"):
            result = _Run(servers, workdir, say, rates=rates, duration_s=duration_s, warmup_s=warmup_s,
                          source_overrides={k: v for k, v in (("idle_interval_ms", idle_interval_ms),
                                                               ("checkpoint_interval_s", checkpoint_interval_s),
                                                               ("max_records_per_call", max_records_per_call))
                                            if v is not None},
                          drain_timeout_s=drain_timeout_s, seed=seed, sink_types=list(sinks),
                          slow_sink_s=slow_sink_s).run()
        ok = result["all_arrived"] and result["worker_exit_code"] == 0 and not result["dead_lettered"]
        if console is not None:
            print_report(result, console)
        return result
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"worker log kept in {workdir / 'worker.log'}")


class _Run:
    def __init__(self, servers: Endpoints, workdir: Path, say: Any, *, rates: list[int], duration_s: float,
                 warmup_s: float, source_overrides: dict[str, Any], drain_timeout_s: float, seed: int,
                 sink_types: list[str], slow_sink_s: float = 0.0):
        self.servers = servers
        self.slow_sink_s = slow_sink_s
        unknown = [t for t in sink_types if t not in SINK_TYPES]
        if unknown or not sink_types:
            raise ValueError(f"sinks must be a non-empty selection of {', '.join(SINK_TYPES)}, not {sink_types}")
        self.sink_types = sink_types
        self.workdir = workdir
        self.say = say
        self.rates = rates
        self.duration_s = duration_s
        self.warmup_s = warmup_s
        self.source_overrides = source_overrides
        self.drain_timeout_s = drain_timeout_s
        self.seed = seed
        suffix = uuid.uuid4().hex[:8]
        self.table = f"latency-{suffix}"
        self.lease_table = f"latency-leases-{suffix}"
        self.bucket = f"latency-audit-{suffix}"
        self.index = f"latency-{suffix}"
        self.worker: Any = None
        self.thread: threading.Thread | None = None
        self.exit_codes: list[int] = []
        self.worker_error: list[BaseException] = []
        self.bulks: dict[str, _BulkRecorder] = {}
        # (phase, first write ns, last write ns, the other sinks' last arrival ns, end ns)
        self.windows: list[tuple[str, int, int, int, int]] = []

    def run(self) -> dict[str, Any]:
        from connectors.embedded.workload import create_table

        ddb = _boto_client("dynamodb", self.servers.dynamodb)
        s3 = _boto_client("s3", self.servers.s3)
        create_table(ddb, self.table, "NEW_AND_OLD_IMAGES")
        s3.create_bucket(Bucket=self.bucket)
        load_before = os.getloadavg()
        settings = self._settings()
        try:
            timer, probe = self._start_worker(settings)
            self._wait_reading(timer)
            phases: list[dict[str, Any]] = []
            if self.warmup_s > 0:
                warm_rate = min(self.rates)
                self.say(f"warm-up: {warm_rate} changes/s for {self.warmup_s:g} s (not reported)")
                self._phase("warmup", warm_rate, self.warmup_s, probe)
            for n, rate in enumerate(self.rates):
                self.say(f"phase {n + 1}/{len(self.rates)}: {rate} changes/s for {self.duration_s:g} s")
                writer = self._phase(f"p{n}r{rate}", rate, self.duration_s, probe)
                phases.append(self._figures(f"p{n}r{rate}", rate, writer, probe, timer))
                self.windows.append((f"p{n}r{rate}", writer["first_send_ns"], writer["last_send_ns"],
                                     self._others_done_ns(f"p{n}r{rate}"), time.time_ns()))
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self._stop_worker()
            self._cleanup(ddb, s3)
            raise
        try:
            code = self._stop_worker()
            self._floor(phases)
        finally:
            self._cleanup(ddb, s3)
        source = self.worker.sources[0] if self.worker is not None else None
        return {
            "settings": {**{k: getattr(settings.source, k) for k in
                            ("idle_interval_ms", "checkpoint_interval_s", "max_records_per_call",
                             "discovery_interval_s", "start_position")},
                         "checkpoint_store": settings.checkpoints.store,
                         "sinks": [s.name for s in self.worker.sinks],
                         "read_path": str(getattr(source, "read_path", "boto3")),
                         "duration_s": self.duration_s, "warmup_s": self.warmup_s},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "processor": _cpu_model(),
                        "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
            "phases": phases,
            "targets": _targets(phases),
            "worker_exit_code": code,
            "dead_lettered": self._dead_lettered(),
            "all_arrived": all(p["all_arrived"] for p in phases),
            "notes": self._notes(phases, code),
        }

    def _settings(self) -> Any:
        from connectors.embedded.workload import CACHE_KEY_TEMPLATES
        from pipeline.config import Settings

        available = {
            "opensearch": {"name": "search", "type": "opensearch",
                           "options": {"hosts": [self.servers.opensearch], "index": self.index}},
            "s3_audit": {"name": "audit", "type": "s3_audit",
                         "options": {"bucket": self.bucket, "prefix": "audit", "endpoint_url": self.servers.s3,
                                     "region": REGION}},
            "redis_cache": {"name": "cache", "type": "redis_cache",
                            "options": {"url": self.servers.redis, "key_templates": list(CACHE_KEY_TEMPLATES)}},
        }
        return Settings(
            source={"table": self.table, **self.source_overrides},
            aws={"region": REGION, "endpoint_url": self.servers.dynamodb, "s3_endpoint_url": self.servers.s3,
                 "access_key_id": _ACCESS_KEY, "secret_access_key": _SECRET_KEY},
            checkpoints={"store": "dynamodb", "table_name": self.lease_table},
            dead_letter={"directory": str(self.workdir / "dead-letter")},
            sinks=[available[t] for t in self.sink_types],
            worker={"id": f"latency-bench-{os.getpid()}"},
            log={"level": "INFO", "format": "json"},
        )

    def _start_worker(self, settings: Any) -> tuple[_ReadTimer, Any]:
        from connectors.app.wiring import build_worker
        from pipeline.logs import get_logger
        from pipeline.registry import build_sinks

        sinks = build_sinks(settings.sinks, "latency benchmark")
        if self.slow_sink_s > 0:
            sinks.append(SleepSink("slow", self.slow_sink_s))
        mark = MarkSink("probe_first")
        probe = ProbeSink("probe")
        self.worker = build_worker(settings, logger=get_logger(), where="latency benchmark",
                                   sinks=[mark, *sinks, probe])
        timer = _ReadTimer(self.worker.sources[0])
        mark.timer = timer
        self.sink_timers = {sink.name: _WriteTimer(sink) for sink in sinks}
        from connectors.opensearch.sink import OpenSearchSink

        self.bulks = {sink.name: _BulkRecorder(sink) for sink in sinks if isinstance(sink, OpenSearchSink)}
        self.mark = mark

        def target() -> None:
            try:
                self.exit_codes.append(self.worker.run())
            except BaseException as exc:  # noqa: BLE001 - reported by _stop_worker / _alive
                self.worker_error.append(exc)

        self.thread = threading.Thread(target=target, name="latency-worker", daemon=True)
        self.thread.start()
        return timer, probe

    def _alive(self) -> None:
        if self.thread is not None and not self.thread.is_alive():
            why = (f"{type(self.worker_error[0]).__name__}: {self.worker_error[0]}" if self.worker_error
                   else f"exit code {self.exit_codes[0] if self.exit_codes else '?'}")
            raise RuntimeError(f"the worker stopped early ({why}); see {self.workdir / 'worker.log'}")

    def _wait_reading(self, timer: _ReadTimer, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not timer.calls:
            self._alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker made no GetRecords call within {timeout:g} s")
            time.sleep(0.05)

    def _phase(self, phase: str, rate: int, duration_s: float, probe: Any) -> dict[str, Any]:
        """Write one phase from a writer process and wait until every change reached the probe."""
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        spec = {"endpoint": self.servers.dynamodb, "table": self.table, "phase": phase, "rate": rate,
                "total": max(1, round(rate * duration_s)), "threads": _writer_threads(rate), "seed": self.seed}
        process = context.Process(target=_writer_main, args=(child, spec), name=f"latency-writer-{phase}", daemon=True)
        process.start()
        try:
            ready = self._receive(parent, process, timeout=120.0)
            if "error" in ready:
                raise RuntimeError(f"writer failed: {ready['error']}")
            parent.send("go")
            wall0, cpu0 = time.monotonic(), time.process_time()
            result = self._receive(parent, process, timeout=duration_s * 10 + 120.0)
            if "error" in result:
                raise RuntimeError(f"writer failed: {result['error']}")
        finally:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        expected = len(result["ok"])
        deadline = time.monotonic() + self.drain_timeout_s
        # per-sink lanes: every sink drains on its own; wait for the probe and every sink
        while ((probe.count(phase) < expected or any(t.count(phase) < expected for t in self.sink_timers.values()))
               and time.monotonic() < deadline):
            self._alive()
            time.sleep(0.05)
        result["cpu_pct"] = round(100.0 * (time.process_time() - cpu0) / max(1e-9, time.monotonic() - wall0), 1)
        result["drain_s"] = round((time.time_ns() - result["last_send_ns"]) / 1e9, 2) if result["ok"] else 0.0
        return result

    def _receive(self, conn: Any, process: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            self._alive()
            if not process.is_alive() and not conn.poll(0):
                raise RuntimeError(f"the writer process exited with code {process.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the writer process did not answer within {timeout:g} s")
        return conn.recv()

    def _figures(self, phase: str, rate: int, writer: dict[str, Any], probe: Any, timer: _ReadTimer) -> dict[str, Any]:
        arrivals = dict(probe.arrivals.get(phase, {}))
        ok = set(writer["ok"])
        missing = sorted(ok - set(arrivals))
        latencies, parts = [], {"wait": [], "get_records": [], "decode": [], "sinks": []}
        for index in ok & set(arrivals):
            written, arrived, key = arrivals[index]
            latencies.append((arrived - written) / 1e6)
            mark = self.mark.marks.get(key)
            if mark is not None:
                read_start, read_end, handed = mark
                parts["wait"].append((read_start - written) / 1e6)
                parts["get_records"].append((read_end - read_start) / 1e6)
                parts["decode"].append((handed - read_end) / 1e6)
                parts["sinks"].append((arrived - handed) / 1e6)
        first, last = writer["first_send_ns"], max((a for _, a, _ in arrivals.values()), default=0)
        calls = [c for c in list(timer.calls) if first <= c[0] <= last]
        nonempty = [c for c in calls if c[2]]
        return {
            "phase": phase,
            "target_rate": rate,
            "achieved_rate": round(writer["achieved_rate"], 1),
            "planned": writer["planned"],
            "written": len(ok),
            "write_failures": len(writer["failures"]),
            "failures": writer["failures"][:5],
            "arrived": len(ok) - len(missing),
            "missing": len(missing),
            "missing_sample": missing[:10],
            "duplicates": probe.duplicates.get(phase, 0),
            "all_arrived": not missing and not writer["failures"],
            "latency_ms": _summary(latencies),
            "breakdown_ms": {name: {"mean": s.get("mean"), "p50": s.get("p50"), "p99": s.get("p99")}
                             for name, s in ((n, _summary(v)) for n, v in parts.items())},
            "get_records": {"calls": len(calls), "empty": len(calls) - len(nonempty),
                            "records_per_call": round(sum(c[2] for c in nonempty) / max(1, len(nonempty)), 1),
                            "call_ms": _summary([(c[1] - c[0]) / 1e6 for c in calls])},
            "sink_write_ms": {name: _summary([(c[1] - c[0]) / 1e6 for c in list(t.calls) if first <= c[0] <= last])
                              for name, t in self.sink_timers.items()},
            **self._per_sink(phase, ok, writer),
            "put_rtt_ms": writer["put_rtt_ms"],
            "writer_late_ms": writer["late_ms"],
            "writer_retried": writer["retried"],
            "request_bytes_mean": writer["bytes_mean"],
            "drain_s": writer["drain_s"],
            "worker_process_cpu_pct": writer["cpu_pct"],
        }

    def _per_sink(self, phase: str, ok: set, writer: dict[str, Any]) -> dict[str, Any]:
        """Per sink: latency summary (ms), changes arrived, intake rate (changes/s)."""
        latency, arrived, rate, behind = {}, {}, {}, {}
        for name, t in self.sink_timers.items():
            got = {i: v for i, v in dict(t.arrivals.get(phase, {})).items() if i in ok}
            latency[name] = _summary([(a - w) / 1e6 for w, a in got.values()])
            arrived[name] = len(got)
            span = (max((a for _, a in got.values()), default=0) - writer["first_send_ns"]) / 1e9
            rate[name] = round(len(got) / span, 1) if got and span > 0 else 0.0
            last = max((a for _, a in got.values()), default=None)
            behind[name] = math.inf if last is None else (last - writer["last_send_ns"]) / 1e9
        drained = {name: arrived[name] == len(ok) for name in arrived}
        # slower than the load: took changes in at under 95 % of the offered (achieved) rate and was
        # still taking them in more than SLOWER_AFTER_S after the last write (a sink that keeps up
        # is done about its own latency after it; short phases make the rate alone noisy)
        slower = sorted(name for name in arrived
                        if rate[name] < 0.95 * writer["achieved_rate"] and behind[name] > SLOWER_AFTER_S)
        return {"per_sink_latency_ms": latency, "per_sink_arrived": arrived, "per_sink_rate": rate,
                "per_sink_drained": drained, "slower_than_offered": slower}

    def _others_done_ns(self, phase: str) -> int:
        """When the last change of ``phase`` reached the last of the sinks that are not OpenSearch
        sinks (ns; 0 when there are none): from then on an OpenSearch sink works alone."""
        return max((a for name, t in self.sink_timers.items() if name not in self.bulks
                    for _, a in dict(t.arrivals.get(phase, {})).values()), default=0)

    def _floor(self, phases: list[dict[str, Any]]) -> None:
        """Per phase, the OpenSearch sink's throughput next to osmem's own floor for the same bulk
        bodies (:func:`_opensearch_floor`; issue 15 item 6: sink ≥ 0.9 × floor), measured after
        the worker stopped so that nothing else uses the server: ``phases[i]["opensearch_floor"]``."""
        for name, recorder in self.bulks.items():
            if not recorder.bodies:
                continue
            self.say(f"floor: posting the {len(recorder.bodies)} bulk bodies of sink {name!r} to "
                     f"osmem-server directly …")
            figures = _opensearch_floor(self.servers.opensearch, self.index, recorder.bodies, self.windows)
            for p in phases:
                if p["phase"] in figures:
                    p.setdefault("opensearch_floor", {})[name] = figures[p["phase"]]

    def _notes(self, phases: list[dict[str, Any]], code: int | None) -> list[str]:
        notes = []
        for p in phases:
            if p["missing"]:
                notes.append(f"{p['target_rate']}/s: {p['missing']} of {p['written']} changes had not reached the "
                             f"last sink {self.drain_timeout_s:g} s after the phase's last write (a backlog: the "
                             f"pipeline delivered slower than the write rate)")
            if p["achieved_rate"] < 0.95 * p["target_rate"]:
                notes.append(f"{p['target_rate']}/s: the writer achieved {p['achieved_rate']:.0f}/s (DynamoDB Local "
                             f"PutItem p50 {p['put_rtt_ms'].get('p50', float('nan')):.0f} ms with "
                             f"{_writer_threads(p['target_rate'])} connections)")
        if code:
            notes.append(f"worker exit code {code}: stopped while still delivering a backlog (shutdown grace "
                         f"exceeded) or failed; see worker.log")
        return notes

    def _dead_lettered(self) -> int:
        """Entries in the dead-letter directory (a sink refused changes: the figures are then suspect)."""
        directory = self.workdir / "dead-letter"
        return sum(1 for _ in directory.glob("*.json")) if directory.is_dir() else 0

    def _stop_worker(self) -> int | None:
        if self.worker is None or self.thread is None:
            return None
        self.worker.stop()
        self.thread.join(timeout=self.worker.shutdown_grace_s + 15)
        if self.thread.is_alive():
            raise RuntimeError("the worker did not stop within its shutdown grace period")
        if self.worker_error:
            exc = self.worker_error[0]
            raise RuntimeError(f"the worker crashed: {type(exc).__name__}: {exc}")
        return self.exit_codes[0] if self.exit_codes else None

    def _cleanup(self, ddb: Any, s3: Any) -> None:
        """Remove what this run created on the servers (they may be shared with other users)."""
        for table in (self.table, self.lease_table):
            with contextlib.suppress(Exception):
                ddb.delete_table(TableName=table)
        with contextlib.suppress(Exception):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
                for obj in page.get("Contents", []):
                    s3.delete_object(Bucket=self.bucket, Key=obj["Key"])
            s3.delete_bucket(Bucket=self.bucket)
        with contextlib.suppress(Exception):
            import urllib.request

            request = urllib.request.Request(f"{self.servers.opensearch.rstrip('/')}/{self.index}", method="DELETE")
            urllib.request.urlopen(request, timeout=10).read()


def _targets(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency targets at :data:`TARGET_RATE` (probe and :data:`FAST_SINKS`) and, for every
    phase, the drain target: every sink drained within the drain timeout but at most one, that one
    slower than the offered rate; and an OpenSearch sink slower than the offered rate at ≥
    :data:`FLOOR_SHARE` × osmem's floor, compared over the backlog sent after the phase's last
    write and the other sinks' last change (``opensearch_floor[sink]["alone"]``; the whole phase
    when there is no such backlog).
    ``slower_than_offered`` also lists sinks held back by the lanes' backpressure (a full lane
    of a slower sink makes the shard's reader wait): that is the memory bound, not a miss."""
    out: dict[str, Any] = {"rate": TARGET_RATE, "p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "drain": {}}
    for p in phases:
        slower = p.get("slower_than_offered", [])
        undrained = [n for n, ok in p.get("per_sink_drained", {}).items() if not ok]
        floor = {n: (f.get("alone") or f).get("sink_vs_floor")
                 for n, f in p.get("opensearch_floor", {}).items() if n in slower}
        out["drain"][str(p["target_rate"])] = {
            "undrained": undrained, "slower_than_offered": slower, "sink_vs_floor": floor,
            "met": set(undrained) <= set(slower) and len(undrained) <= 1
            and all(v is not None and v >= FLOOR_SHARE for v in floor.values())}
    at = [p for p in phases if p["target_rate"] == TARGET_RATE]
    if not at:
        out["met"] = None
        out["note"] = f"no phase at {TARGET_RATE} changes/s"
        return out
    latency = at[0]["latency_ms"]
    out["p50_met"] = latency.get("p50", math.inf) <= TARGET_P50_MS
    out["p99_met"] = latency.get("p99", math.inf) <= TARGET_P99_MS
    out["met"] = out["p50_met"] and out["p99_met"] and at[0]["all_arrived"]
    # issue 15 item 6: the fast sinks (Redis, S3) hold the target while the others lag
    per = at[0].get("per_sink_latency_ms", {})
    out["fast_sinks"] = {name: {"p50": per[name].get("p50"), "p99": per[name].get("p99"),
                                "met": per[name].get("p50", math.inf) <= TARGET_P50_MS
                                and per[name].get("p99", math.inf) <= TARGET_P99_MS}
                         for name in FAST_SINKS if name in per}
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------
# output


def print_report(result: dict[str, Any], console: Any) -> None:
    """Print ``result`` as rich tables: latency per rate, where the time goes, targets."""
    from rich.table import Table

    s = result["settings"]
    table = Table(title="change-to-sink latency (ms): write → the probe sink (a lane of its own, no I/O) had the change", title_justify="left")
    for column in ("rate /s", "achieved /s", "written", "arrived", "dup", "p50", "p95", "p99", "max", "put p50"):
        table.add_column(column, justify="right")
    for p in result["phases"]:
        lat = p["latency_ms"]
        table.add_row(str(p["target_rate"]), f"{p['achieved_rate']:.0f}", str(p["written"]),
                      f"{p['arrived']}" + ("" if p["all_arrived"] else " ✗"), str(p["duplicates"]),
                      *(f"{lat.get(k, float('nan')):.0f}" for k in ("p50", "p95", "p99", "max")),
                      f"{p['put_rtt_ms'].get('p50', float('nan')):.1f}")
    console.print(table)
    parts = Table(title="where the time goes (mean / p99 ms per change) and GetRecords", title_justify="left")
    for column in ("rate /s", "wait", "get_records", "decode", "sinks", "calls", "empty", "rec/call", "call p50"):
        parts.add_column(column, justify="right")
    for p in result["phases"]:
        b = p["breakdown_ms"]
        parts.add_row(str(p["target_rate"]),
                      *(f"{b[k]['mean'] or 0:.0f} / {b[k]['p99'] or 0:.0f}" for k in ("wait", "get_records", "decode", "sinks")),
                      str(p["get_records"]["calls"]), str(p["get_records"]["empty"]),
                      f"{p['get_records']['records_per_call']:.0f}",
                      f"{p['get_records']['call_ms'].get('p50', float('nan')):.0f}")
    console.print(parts)
    sinks = Table(title="sink write() per batch (ms): mean / p50 / p99; CPU of the worker's process",
                  title_justify="left")
    names = list(result["phases"][0]["sink_write_ms"]) if result["phases"] else []
    for column in ("rate /s", *names, "process CPU %"):
        sinks.add_column(column, justify="right")
    for p in result["phases"]:
        w = p["sink_write_ms"]
        sinks.add_row(str(p["target_rate"]), *(f"{w[n].get('mean', 0):.0f} / {w[n].get('p50', 0):.0f} / "
                                               f"{w[n].get('p99', 0):.0f}" for n in names),
                      f"{p['worker_process_cpu_pct']:.0f}")
    console.print(sinks)
    per = Table(title="per-sink change-to-sink latency (ms): write → that sink's write() returned; p50 / p95 / p99; "
                      "arrived; intake /s", title_justify="left")
    names = list(result["phases"][0].get("per_sink_latency_ms", {})) if result["phases"] else []
    for column in ("rate /s", *names):
        per.add_column(column, justify="right")
    for p in result["phases"]:
        lat = p.get("per_sink_latency_ms", {})
        per.add_row(str(p["target_rate"]), *(
            f"{lat[n].get('p50', float('nan')):.0f} / {lat[n].get('p95', float('nan')):.0f} / "
            f"{lat[n].get('p99', float('nan')):.0f}; {p['per_sink_arrived'][n]}/{p['written']}; "
            f"{p['per_sink_rate'][n]:.0f}" for n in names))
    console.print(per)
    floors = [(p, n, f) for p in result["phases"] for n, f in p.get("opensearch_floor", {}).items()]
    if floors:
        ft = Table(title="OpenSearch sink vs osmem's floor: the sink's bulk bodies posted again, one at a time, "
                         "with opensearch-py (docs/s)", title_justify="left")
        for column in ("rate /s", "sink", "span", "actions", "bulks", "sink docs/s", "floor docs/s",
                       "sink / floor", "drained"):
            ft.add_column(column, justify="right")
        for p, n, whole in floors:
            for span, f in (("phase", whole), ("alone", whole.get("alone"))):
                if f is None:
                    continue
                ft.add_row(str(p["target_rate"]), n, span, str(f["actions"]), str(f["requests"]),
                           f"{f['sink_docs_per_s']:.0f}", f"{f['docs_per_s']:.0f}",
                           f"{f['sink_vs_floor']:.2f}" if f["sink_vs_floor"] else "-",
                           "yes" if p.get("per_sink_drained", {}).get(n) else "no")
        console.print(ft)
    t = result["targets"]
    for rate, d in t.get("drain", {}).items():
        console.print(f"drain at {rate}/s: not drained {d['undrained'] or 'none'}; slower than offered "
                      f"{d['slower_than_offered'] or 'none'}; sink/floor {d['sink_vs_floor'] or '-'} → "
                      f"{'met' if d['met'] else 'MISSED'}", highlight=False)
    for name, f in t.get("fast_sinks", {}).items():
        console.print(f"{name} at {TARGET_RATE}/s: p50 {f['p50'] or float('nan'):.0f} ms, p99 "
                      f"{f['p99'] or float('nan'):.0f} ms → {'met' if f['met'] else 'MISSED'}", highlight=False)
    if t.get("met") is None:
        console.print(f"targets: {t.get('note')}")
    else:
        p = next(x for x in result["phases"] if x["target_rate"] == TARGET_RATE)["latency_ms"]
        console.print(f"targets at {TARGET_RATE}/s: p50 {p['p50']:.0f} ms ≤ {TARGET_P50_MS:.0f} "
                      f"{'met' if t['p50_met'] else 'MISSED'}; p99 {p['p99']:.0f} ms ≤ {TARGET_P99_MS:.0f} "
                      f"{'met' if t['p99_met'] else 'MISSED'}")
    m = result["machine"]
    console.print(f"settings: idle_interval_ms {s['idle_interval_ms']}, checkpoint_interval_s "
                  f"{s['checkpoint_interval_s']}, max_records_per_call {s['max_records_per_call']}, read path "
                  f"{s['read_path']}, checkpoints {s['checkpoint_store']}; machine: {m['cpus']} CPUs "
                  f"({m['processor']}), Python {m['python']}, load {m['loadavg_before'][0]} → "
                  f"{m['loadavg_after'][0]}; worker exit code {result['worker_exit_code']}; dead-lettered "
                  f"{result['dead_lettered']}; "
                  f"all changes arrived: {'yes' if result['all_arrived'] else 'NO'}", highlight=False)
    for note in result.get("notes", []):
        console.print(f"note: {note}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="200,1000", help="changes/s per phase, comma-separated (default 200,1000)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of writing per rate (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds at the lowest rate (default 5)")
    parser.add_argument("--idle-interval-ms", type=int, default=None, help="override source.idle_interval_ms")
    parser.add_argument("--checkpoint-interval-s", type=float, default=None,
                        help="override source.checkpoint_interval_s")
    parser.add_argument("--max-records-per-call", type=int, default=None,
                        help="override source.max_records_per_call")
    parser.add_argument("--sinks", default=",".join(SINK_TYPES),
                        help="built-in sinks to run, comma-separated (default opensearch,s3_audit,redis_cache)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait after a phase's last write for every change to arrive (default 120)")
    parser.add_argument("--slow-sink-s", type=float, default=0.0,
                        help="also run a test sink that sleeps this many seconds per batch (default 0: none)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE ('-' for stdout)")
    args = parser.parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    result = run_latency([int(r) for r in args.rates.split(",") if r.strip()], args.duration, console=console,
                         warmup_s=args.warmup, idle_interval_ms=args.idle_interval_ms,
                         checkpoint_interval_s=args.checkpoint_interval_s,
                         max_records_per_call=args.max_records_per_call, drain_timeout_s=args.drain_timeout,
                         sinks=[t.strip() for t in args.sinks.split(",") if t.strip()], slow_sink_s=args.slow_sink_s)
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if result["all_arrived"] and result["worker_exit_code"] == 0 and not result["dead_lettered"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
