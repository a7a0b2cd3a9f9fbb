"""Section ``memory``: RSS of a worker holding 100 leases, idle and busy, sampled over time.

Runs in a fresh Python process (``python -m benchmarks.memory``) so nothing of the benchmark
parent (inputs, other sections) counts. The process builds a real Worker — real botocore client,
DynamoDBStreamSource (fast read path), three no-op sinks, SQLite lease file — over one stream of
100 open shards answered at the HTTP boundary by :class:`benchmarks.inputs.StreamsHTTPDouble`
(:class:`~benchmarks.inputs.LiveShard`: pages are made on demand from a 200-record pool kept as
bytes templates; nothing read is retained by the double). Once all 100 shard readers run:

- **idle** for a third of ``--soak`` seconds: every GetRecords returns no records (each shard
  polls every ``idle_interval_ms`` = 250 ms, the default);
- **busy** for the other two thirds: records appear at ``--rate`` per second in total, spread over
  the 100 shards;
- **catch-up** (``--backlog N``, default 1,000; 0 skips it): every shard is given N records at
  once — a worker starting behind on all its shards, each reader holding a full 1,000-record page
  in flight at the same time (the worst case of memory per lease); it ends when every sink has
  every record.

VmRSS is sampled every second (every 0.25 s during catch-up) from ``/proc/self/status``; each
phase's peak is VmHWM, reset at the phase's start (``/proc/self/clear_refs``). "Grew" means the
median of the last quarter of a phase's samples is more than 5 MB above that of its first
quarter, both taken after the phase's warm-up (its first quarter, at least 5 s) — the
least-squares slope over the same samples is reported too. Target: ≤ 250 MB, no growth
(``--soak 600`` for the 10-minute run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from benchmarks import inputs, rss_mb, table, verdict

RSS_TARGET_MB = 250.0
GROWTH_LIMIT_MB = 5.0
SHARDS = 100
_SEQ = b"__SEQUENCE_NUMBER__"
_TIME = b"123456789.25"


class TemplateShard(inputs.LiveShard):
    """A LiveShard whose pages are joined from bytes templates (so the pool costs ~0.6 MB, not the
    tens of MB the same records take as Python objects)."""

    templates: list[tuple[bytes, bytes, bytes]] = []

    def page(self, position: int, limit: int) -> bytes:
        end = min(self.available(), position + limit)
        now = str(float(int(time.time()))).encode()
        parts = []
        for i in range(position, end):
            head, middle, tail = self.templates[(self.shard_no * 7919 + i) % len(self.templates)]
            parts.append(head + now + middle + inputs.sequence_number(self.shard_no, i).encode() + tail)
        self.served += end - position
        token = inputs.iterator_token(self.shard_id, end).encode()
        return b'{"Records":[' + b",".join(parts) + b'],"NextShardIterator":"' + token + b'"}'


def _templates(pool_size: int = 200) -> list[tuple[bytes, bytes, bytes]]:
    import orjson

    out = []
    for record in inputs.make_records(pool_size, seed=inputs.SEED + 1):
        body = dict(record["dynamodb"], SequenceNumber=_SEQ.decode(), ApproximateCreationDateTime=123456789.25)
        data = orjson.dumps(dict(record, dynamodb=body))
        head, rest = data.split(_TIME, 1)
        middle, tail = rest.split(_SEQ, 1)
        out.append((head, middle, tail))
    return out


def _slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return 0.0
    ts = [t for t, _ in samples]
    ys = [y for _, y in samples]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts) or 1e-9
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var


def _phase_summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    """Start/end/max of a phase; growth and slope after its warm-up (the first quarter, at least 5 s:
    in-flight batches, allocator arenas and caches filling up when records start to flow)."""
    import statistics

    t_start = samples[0][0]
    warm = max(5.0, (samples[-1][0] - t_start) / 4)
    steady = [s for s in samples if s[0] - t_start >= warm] or samples[-1:]
    q = max(1, len(steady) // 4)
    first = statistics.median(y for _, y in steady[:q])
    last = statistics.median(y for _, y in steady[-q:])
    return {"samples": len(samples), "start_mb": samples[0][1], "end_mb": samples[-1][1],
            "max_mb": max(y for _, y in samples), "warm_up_s": warm, "steady_samples": len(steady),
            "first_quarter_median_mb": first, "last_quarter_median_mb": last,
            "growth_mb": last - first, "slope_mb_per_min": _slope_mb_per_min(steady),
            "grew": last - first > GROWTH_LIMIT_MB}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_main(soak_s: float, rate: float, backlog: int = 0, trace: bool = False,
               max_pages_in_flight: int | None = None) -> dict[str, Any]:
    """The measured process (see module doc). ``max_pages_in_flight``: the worker's read budget
    (None: the worker's default; 0: no bound)."""
    from pipeline.logs import configure_logging

    configure_logging("WARNING", "json")
    from benchmarks.pipeline_bench import build_worker

    rss_at_import = rss_mb()[0]
    TemplateShard.templates = _templates()
    shards = [TemplateShard(i, [], rate / SHARDS) for i in range(SHARDS)]
    double = inputs.StreamsHTTPDouble(inputs.stream_arn("memtable"), live=shards)
    source = inputs.make_source(double)
    with tempfile.TemporaryDirectory(prefix="ddb-cdc-bench-mem-") as workdir:
        worker, store, sinks = build_worker([source], workdir, worker_id="bench-mem", checkpoint_interval_s=5.0,
                                            exit_when_idle=False, max_pages_in_flight=max_pages_in_flight)
        runner = threading.Thread(target=worker.run, name="worker", daemon=True)
        t0 = time.monotonic()
        runner.start()
        deadline = t0 + 60
        while len(worker.consumers) < SHARDS and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(worker.consumers) < SHARDS:
            raise RuntimeError(f"only {len(worker.consumers)} of {SHARDS} shard readers started")
        leases_held = len(worker.coordinator.held())
        started_s = time.monotonic() - t0
        rss_started = rss_mb()[0]
        idle_s, busy_s = soak_s / 3.0, soak_s * 2.0 / 3.0
        phases: dict[str, list[tuple[float, float]]] = {"idle": [], "busy": [], "catch-up": []}
        peaks: dict[str, float] = {}

        def sample(phase: str, seconds: float, every: float = 1.0, until=None) -> None:
            reset = _reset_peak()
            end = time.monotonic() + seconds
            while True:
                phases[phase].append((time.monotonic() - t0, rss_mb()[0]))
                if time.monotonic() >= end or (until is not None and until()):
                    break
                time.sleep(min(every, max(0.0, end - time.monotonic())))
            phases[phase].append((time.monotonic() - t0, rss_mb()[0]))
            sampled = max(y for _, y in phases[phase])
            peaks[phase] = max(sampled, rss_mb()[1]) if reset else sampled

        calls_before = double.calls.get("GetRecords", 0)
        cpu0 = time.process_time()
        sample("idle", idle_s)
        idle_cpu = time.process_time() - cpu0
        idle_calls = double.calls.get("GetRecords", 0) - calls_before
        cpu0 = time.process_time()
        for s in shards:
            s.set_flowing(True)
        traced: dict[str, Any] | None = None
        if trace:  # Python-level allocations: the steady part of the busy phase, after its warm-up
            import tracemalloc

            warm = max(5.0, busy_s / 4)
            sample("busy", warm)
            tracemalloc.start(1)
            first = tracemalloc.take_snapshot()
            first_mb = tracemalloc.get_traced_memory()[0] / 2 ** 20
            sample("busy", busy_s - warm)
            last = tracemalloc.take_snapshot()
            traced = {"start_mb": first_mb, "end_mb": tracemalloc.get_traced_memory()[0] / 2 ** 20,
                      "top_growth": [f"{stat.size_diff / 1024:+.0f} KB in {stat.count_diff:+d} blocks: "
                                     f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}"
                                     for stat in last.compare_to(first, "lineno")[:10]]}
            tracemalloc.stop()
        else:
            sample("busy", busy_s)
        for s in shards:
            s.set_flowing(False)
        busy_cpu = time.process_time() - cpu0
        time.sleep(2.0)  # let the readers drain what was made available
        made = sum(s.available() for s in shards)
        delivered = min(s.events for s in sinks)
        catch_up: dict[str, Any] | None = None
        if backlog:
            target = made + backlog * SHARDS
            c0 = time.monotonic()
            for s in shards:
                s.add_backlog(backlog)
            sample("catch-up", 600.0, every=0.25, until=lambda: min(x.events for x in sinks) >= target)
            took = time.monotonic() - c0
            catch_up = {"backlog_per_shard": backlog, "records": backlog * SHARDS, "seconds": took,
                        "rate": backlog * SHARDS / took, "peak_mb": peaks["catch-up"],
                        "end_mb": phases["catch-up"][-1][1],
                        "complete": min(x.events for x in sinks) >= target}
        worker.stop()
        runner.join(60)
    peak_idle_busy = max(peaks["idle"], peaks["busy"])
    pages = worker.read_budget.pages
    return {"max_pages_in_flight": pages, "peak_idle_busy_mb": peak_idle_busy, "catch_up": catch_up, "peaks": peaks, "tracemalloc": traced,"shards": SHARDS, "leases_held": leases_held, "readers_started_after_s": started_s,
            "rss_after_imports_mb": rss_at_import, "rss_all_readers_started_mb": rss_started,
            "idle": {**_phase_summary(phases["idle"]), "seconds": idle_s,
                     "get_records_per_s": idle_calls / idle_s if idle_s else 0.0,
                     "cpu_share": idle_cpu / idle_s if idle_s else 0.0},
            "busy": {**_phase_summary(phases["busy"]), "seconds": busy_s, "rate": rate, "records_made": made,
                     "records_delivered": delivered, "cpu_share": busy_cpu / busy_s if busy_s else 0.0},
            "samples": phases}


def run_memory(*, soak_s: float = 45.0, rate: float = 1000.0, backlog: int = 1000,
               max_pages_in_flight: int | None = None) -> dict[str, Any]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pages = [] if max_pages_in_flight is None else ["--max-pages-in-flight", str(max_pages_in_flight)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--soak", str(soak_s), "--rate", str(rate),
                           "--backlog", str(backlog), *pages],
                          cwd=root, env=env, capture_output=True, text=True, timeout=soak_s + 900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = result["idle"]["grew"] or result["busy"]["grew"]
    peak = result["peak_idle_busy_mb"]
    result["targets"] = {
        "peak_rss": {"target": f"<= {RSS_TARGET_MB:.0f} MB (idle and busy)", "value": peak,
                     "met": peak <= RSS_TARGET_MB},
        "no_growth": {"target": f"no growth (> {GROWTH_LIMIT_MB:.0f} MB first → last quarter of a phase)",
                      "value": max(result["idle"]["growth_mb"], result["busy"]["growth_mb"]), "met": not grew},
    }
    result["soak_s"] = soak_s
    result["stderr_tail"] = proc.stderr[-2000:]
    return result


def report(result: dict[str, Any]) -> str:
    idle, busy, peaks = result["idle"], result["busy"], result["peaks"]
    lines = [f"## memory — worker holding {result['leases_held']} leases ({result['shards']} open shards on the "
             f"HTTP-boundary double), fresh process, --soak {result['soak_s']:g} s "
             f"(idle {idle['seconds']:.0f} s, busy {busy['seconds']:.0f} s at {busy['rate']:,.0f} records/s), "
             f"worker.max_pages_in_flight {result.get('max_pages_in_flight', '?')}", ""]
    rows = [[name, f"{p['start_mb']:.1f}", f"{p['end_mb']:.1f}", f"{peaks[name]:.1f}", f"{p['growth_mb']:+.1f}",
             f"{p['slope_mb_per_min']:+.2f}", "yes" if p["grew"] else "no"]
            for name, p in (("idle", idle), ("busy", busy))]
    c = result.get("catch_up")
    if c:
        rows.append([f"catch-up: {c['backlog_per_shard']:,} records backlog on each shard", "", f"{c['end_mb']:.1f}",
                     f"{c['peak_mb']:.1f}", "", "", f"{c['records']:,} records in {c['seconds']:.0f} s "
                     f"({c['rate']:,.0f}/s){'' if c['complete'] else ', INCOMPLETE'}"])
    lines.append(table(["phase", "RSS start MB", "RSS end MB", "peak MB (VmHWM)", "growth MB (quartiles)",
                        "slope MB/min", "grew"], rows))
    lines += ["", f"After imports {result['rss_after_imports_mb']:.1f} MB; all {result['shards']} readers running "
                  f"{result['rss_all_readers_started_mb']:.1f} MB (after {result['readers_started_after_s']:.1f} s). "
                  f"Idle: {idle['get_records_per_s']:.0f} GetRecords/s (empty), worker CPU {idle['cpu_share']:.0%} of "
                  f"a core. Busy: {busy['records_made']:,} records made available, {busy['records_delivered']:,} "
                  f"delivered to every sink, worker CPU {busy['cpu_share']:.0%} of a core. Growth and slope are taken "
                  f"after each phase's warm-up (first quarter, at least 5 s).", ""]
    t = result["targets"]
    peak = result["peak_idle_busy_mb"]
    rows = [[t["peak_rss"]["target"], f"{peak:.1f} MB",
             verdict(t["peak_rss"]["met"], "target met" if t["peak_rss"]["met"] else f"{peak - RSS_TARGET_MB:.0f} MB over")],
            [t["no_growth"]["target"], f"{t['no_growth']['value']:+.1f} MB",
             verdict(t["no_growth"]["met"], "target met" if t["no_growth"]["met"] else "grew")]]
    if c:
        ok = c["peak_mb"] <= RSS_TARGET_MB
        rows.append([f"(information) <= {RSS_TARGET_MB:.0f} MB during catch-up", f"{c['peak_mb']:.1f} MB",
                     "within" if ok else f"{c['peak_mb'] - RSS_TARGET_MB:.0f} MB over"])
    lines.append(table(["target", "value", "verdict"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="memory section child process (see benchmarks.memory)")
    parser.add_argument("--soak", type=float, default=45.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--backlog", type=int, default=0)
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace Python allocations over the steady busy phase (slows the worker: use a low --rate)")
    parser.add_argument("--max-pages-in-flight", type=int, default=None,
                        help="the worker's read budget in pages (default: the worker's default; 0: no bound)")
    args = parser.parse_args(argv)
    result = child_main(args.soak, args.rate, args.backlog, args.tracemalloc, args.max_pages_in_flight)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
