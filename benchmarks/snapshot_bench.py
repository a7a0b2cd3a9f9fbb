"""Section ``snapshot``: ``ddb-cdc snapshot``'s parallel Scan against DynamoDB Local at 1, 4 and 8 segments.

A table of ``items`` items (~1 KB each: strings, a number, a string set, a nested map) is filled
with BatchWriteItem, then scanned by the real :class:`pipeline.snapshot.runner.SnapshotRunner` with
the real :class:`connectors.snapshot.scan.ScanReader` (orjson fast path) and a SQLite progress
store, into a sink that renders each event as both built-in sinks would — the OpenSearch
``_source`` (:func:`pipeline.render.plain_json_bytes`) and the S3 audit line
(:func:`pipeline.render.event_to_json_line`) — without sending them (osmem's own rate would be
the figure otherwise; see DESIGN.md). No RCU limit. Where the time goes: Scan calls (wall time
inside ``scan``, summed over segment threads), building the SNAPSHOT events (decode), rendering,
checkpoints (flush + SQLite writes), all measured in the same runs.
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Any

from benchmarks import fmt_rate, median, table


def _fill(client: Any, name: str, items: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def item(i: int) -> dict[str, Any]:
        return {"pk": {"S": f"user#{i:08d}"}, "sk": {"N": str(i % 13)}, "name": {"S": f"name {i}" * 8},
                "body": {"S": "x" * 700}, "n": {"N": str(i * 7)}, "tags": {"SS": ["a", f"t{i % 9}"]},
                "m": {"M": {"city": {"S": "Lyon"}, "zip": {"N": "69001"}}}}

    def write(start: int) -> None:
        reqs = [{"PutRequest": {"Item": item(i)}} for i in range(start, min(start + 25, items))]
        while reqs:
            reqs = client.batch_write_item(RequestItems={name: reqs}).get("UnprocessedItems", {}).get(name, [])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(0, items, 25)))


class _TimedReader:
    def __init__(self, inner: Any):
        self.inner, self.key_names, self.segments = inner, inner.key_names, inner.segments
        self.seconds = 0.0
        self._lock = threading.Lock()

    def read_page(self, segment: int, position: Any, limit: int | None) -> Any:
        t = time.perf_counter()
        page = self.inner.read_page(segment, position, limit)
        with self._lock:
            self.seconds += time.perf_counter() - t
        return page


def run_once(client: Any, name: str, segments: int, workdir: str) -> dict[str, Any]:
    """One snapshot of table ``name`` at ``segments`` → items, seconds, rate and the time split."""
    from datetime import datetime, timezone

    import pipeline.snapshot.runner as runner_module
    import structlog
    from connectors.snapshot.scan import ScanReader
    from connectors.sqlite_store import SQLiteLeaseStore
    from pipeline.deadletter import DirectoryDeadLetterQueue
    from pipeline.render import event_to_json_line, plain_json_bytes
    from pipeline.snapshot.progress import SnapshotMeta, SnapshotProgressStore
    from pipeline.snapshot.ratelimit import RcuLimiter
    from pipeline.snapshot.version import snapshot_version

    store = SQLiteLeaseStore(f"{workdir}/leases-{segments}.sqlite")
    store.ensure_table()
    progress = SnapshotProgressStore(store, "bench")
    now = datetime.now(timezone.utc)
    meta = SnapshotMeta(table=name, snapshot_id=f"bench{segments}-{int(time.time() * 1000)}", started_at=now,
                        version=snapshot_version(now), segments=segments)
    state = progress.create(meta)
    reader = _TimedReader(ScanReader(client, name, key_names=("pk", "sk"), segments=segments))
    timing = {"render": 0.0, "events": 0.0, "checkpoint": 0.0}
    delivered = [0]

    def deliver(batch: Any) -> None:
        t = time.perf_counter()
        for event in batch.events:
            plain_json_bytes(event.after)
            event_to_json_line(event)
        delivered[0] += len(batch.events)
        timing["render"] += time.perf_counter() - t

    original_events = runner_module.SnapshotRunner._events
    original_checkpoint = runner_module.SnapshotRunner._checkpoint

    def timed_events(self: Any, *a: Any) -> Any:
        t = time.perf_counter()
        try:
            return original_events(self, *a)
        finally:
            timing["events"] += time.perf_counter() - t

    def timed_checkpoint(self: Any) -> None:
        t = time.perf_counter()
        try:
            original_checkpoint(self)
        finally:
            timing["checkpoint"] += time.perf_counter() - t

    runner_module.SnapshotRunner._events = timed_events
    runner_module.SnapshotRunner._checkpoint = timed_checkpoint
    try:
        runner = runner_module.SnapshotRunner(
            reader=reader, progress=progress, state=state, deliver=deliver, flush=lambda: None,
            dead_letter=DirectoryDeadLetterQueue(f"{workdir}/dl"), limiter=RcuLimiter(None),
            logger=structlog.get_logger())
        start = time.perf_counter()
        report = runner.run()
        seconds = time.perf_counter() - start
    finally:
        runner_module.SnapshotRunner._events = original_events
        runner_module.SnapshotRunner._checkpoint = original_checkpoint
    if report.ended != "done" or delivered[0] != report.items:
        raise RuntimeError(f"snapshot benchmark run incomplete: {report.ended} {report.error}")
    return {"segments": segments, "items": report.items, "pages": report.pages, "seconds": seconds,
            "rate": report.items / seconds, "scan_s": reader.seconds, **{f"{k}_s": v for k, v in timing.items()}}


def run_snapshot_bench(*, items: int = 20_000, repetitions: int = 3, segments: tuple[int, ...] = (1, 4, 8)) -> dict[str, Any]:
    """Start DynamoDB Local, fill the table, run each segment count ``repetitions`` times (interleaved)."""
    import boto3
    from connectors.embedded.servers import DynamoDBLocal

    server = DynamoDBLocal()
    try:
        client = boto3.client("dynamodb", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id="bench", aws_secret_access_key="bench")
        name = "snapshot-bench"
        client.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                                  {"AttributeName": "sk", "AttributeType": "N"}],
                            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                       {"AttributeName": "sk", "KeyType": "RANGE"}])
        t = time.perf_counter()
        _fill(client, name, items)
        fill_s = time.perf_counter() - t
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in segments}
        with tempfile.TemporaryDirectory(prefix="ddb-cdc-snapbench-") as workdir:
            for _ in range(repetitions):
                for n in segments:
                    client_n = boto3.client("dynamodb", endpoint_url=server.endpoint, region_name="us-east-1",
                                            aws_access_key_id="bench", aws_secret_access_key="bench",
                                            config=__import__("botocore.config").config.Config(
                                                max_pool_connections=max(10, n + 2)))
                    runs[n].append(run_once(client_n, name, n, workdir))
    finally:
        server.close()
    rows = {}
    for n, rs in runs.items():
        rows[n] = {key: median([r[key] for r in rs]) for key in rs[0] if key != "segments"}
    return {"items": items, "fill_s": fill_s, "repetitions": repetitions, "by_segments": rows}


def report(result: dict[str, Any]) -> str:
    """The section's Markdown."""
    lines = ["## snapshot (benchmarks/snapshot_bench.py)", "",
             f"{result['items']} items of ~1 KB in DynamoDB Local (filled with BatchWriteItem in "
             f"{result['fill_s']:.1f} s); medians of {result['repetitions']} runs; rendering for OpenSearch and S3, "
             "nothing sent.", ""]
    rows = []
    for n, r in result["by_segments"].items():
        busy = r["events_s"] + r["render_s"] + r["checkpoint_s"]
        rows.append([str(n), fmt_rate(r["rate"]), f"{r['seconds']:.2f}", str(int(r["pages"])),
                     f"{r['scan_s']:.2f}", f"{r['events_s']:.2f}", f"{r['render_s']:.2f}", f"{r['checkpoint_s']:.2f}",
                     f"{max(0.0, r['seconds'] - busy):.2f}"])
    lines.append(table(["segments", "items/s", "s", "pages", "Scan calls s (sum over threads)", "decode s",
                        "render s", "checkpoint s", "delivery loop waiting s"], rows))
    lines += ["", "Scan calls run in the segment threads (DynamoDB Local's own work plus the orjson parse); decode, "
              "render and checkpoints run in the one delivery loop, which waits for pages the rest of the time."]
    return "\n".join(lines)
