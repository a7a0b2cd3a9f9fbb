"""Section ``scale``: the pipeline of :mod:`benchmarks.pipeline_bench` in 1 and in 2 OS processes.

The same work both ways: two streams of one closed shard each (``records / 2`` recorded records
per shard). With 1 process, one Worker holds both streams (two shard threads sharing one GIL);
with 2 processes, each process runs its own Worker over one of the streams — what
``ddb-cdc run --processes 2`` does, the two workers sharing one SQLite checkpoint file. Processes
are forked after the inputs are built (the bodies are shared copy-on-write), wait at a barrier and
report when their last checkpoint was written; the total rate is all records / (last checkpoint
of any process − the common start). Each process also reports its CPU time, so a process that did
not get a whole core (another program on the machine) shows. For reference, 1 process reading
only one of the shards is measured too (no second shard thread in the process).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from typing import Any

from benchmarks import fmt_rate, inputs, median, table, verdict

SCALE_TARGET = 1.7


def _child(streams: list[inputs.RecordedStream], db_path: str, worker_id: str, barrier: Any, queue: Any) -> None:
    try:
        from benchmarks.pipeline_bench import build_worker, timed_store

        sources = [inputs.make_source(inputs.StreamsHTTPDouble(s.stream_arn, recorded=s)) for s in streams]
        with tempfile.TemporaryDirectory(prefix=f"ddb-cdc-bench-{worker_id}-") as workdir:
            worker, store, sinks = build_worker(sources, workdir, worker_id=worker_id, store=timed_store(db_path))
            barrier.wait(timeout=120)
            start = time.perf_counter()
            cpu0 = time.process_time()
            code = worker.run()
            cpu = time.process_time() - cpu0
        expected = sum(s.records for s in streams)
        queue.put({"worker_id": worker_id, "code": code, "start": start, "end": store.last_checkpoint_at,
                   "cpu_s": cpu, "records": expected, "delivered_ok": all(s.events == expected for s in sinks)})
    except BaseException as exc:  # report, never hang the parent
        queue.put({"worker_id": worker_id, "error": f"{type(exc).__name__}: {exc}"})


def run_once(streams: list[inputs.RecordedStream], processes: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="ddb-cdc-bench-scale-") as tmp:
        db_path = os.path.join(tmp, "leases.sqlite")
        from benchmarks.pipeline_bench import timed_store

        timed_store(db_path)  # create the file (WAL) before the processes open it at once
        groups = [streams[i::processes] for i in range(processes)]
        barrier = ctx.Barrier(processes)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_child, args=(group, db_path, f"bench-{processes}p-{i}", barrier, queue))
                 for i, group in enumerate(groups)]
        for p in procs:
            p.start()
        reports = [queue.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
    errors = [r for r in reports if "error" in r or r["code"] != 0 or r["end"] is None or not r["delivered_ok"]]
    if errors:
        raise RuntimeError(f"scale run with {processes} process(es) failed: {errors}")
    start = min(r["start"] for r in reports)
    end = max(r["end"] for r in reports)
    total = sum(r["records"] for r in reports)
    return {"processes": processes, "records": total, "seconds": end - start, "rate": total / (end - start),
            "per_process": [{"records": r["records"], "seconds": r["end"] - r["start"],
                             "rate": r["records"] / (r["end"] - r["start"]),
                             "cpu_share": r["cpu_s"] / (r["end"] - r["start"]),
                             "records_per_cpu_s": r["records"] / r["cpu_s"]} for r in reports]}


def run_scale(*, records: int = 30_000, repetitions: int = 5, processes: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    n_streams = max(2, *processes)
    per_stream = records // n_streams
    streams = [inputs.recorded_stream(f"bench{i}", shards=1, records_per_shard=per_stream) for i in range(n_streams)]
    inputs.release_pool()
    load_before = os.getloadavg()
    configs: dict[str, tuple[list[inputs.RecordedStream], int]] = {
        f"{p} process{'es' if p > 1 else ''}, {n_streams} shards": (streams, p) for p in processes}
    single = f"(reference) 1 process, 1 shard, {per_stream:,} records"
    configs[single] = (streams[:1], 1)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in configs}
    for _ in range(repetitions):
        for label, (group, p) in configs.items():
            runs[label].append(run_once(group, p))
    rates = {label: median([r["rate"] for r in rs]) for label, rs in runs.items()}
    result: dict[str, Any] = {
        "inputs": {"records": n_streams * per_stream, "streams": n_streams, "repetitions": repetitions},
        "rates": rates,
        "cpu_share": {k: median([pp["cpu_share"] for r in rs for pp in r["per_process"]]) for k, rs in runs.items()},
        "records_per_cpu_s": {k: median([pp["records_per_cpu_s"] for r in rs for pp in r["per_process"]])
                              for k, rs in runs.items()},
        "loadavg_before": load_before,
        "runs": runs,
        "loadavg_after": os.getloadavg(),
    }
    by_p = {p: rates[label] for label, (_, p) in configs.items() if label != single}
    if 1 in by_p and 2 in by_p:
        ratio = by_p[2] / by_p[1]
        result["ratio"] = ratio
        result["ratio_vs_single_shard"] = by_p[2] / rates[single]
        result["targets"] = {"two_vs_one": {"target": f">= {SCALE_TARGET}", "value": ratio, "met": ratio >= SCALE_TARGET}}
    return result


def report(result: dict[str, Any]) -> str:
    inp = result["inputs"]
    lines = [f"## scale — {inp['records']:,} recorded records ({inp['streams']} streams × 1 shard) through the "
             f"pipeline in 1 and 2 processes; median of {inp['repetitions']} repetitions", ""]
    rows = [[label, fmt_rate(rate), f"{result['cpu_share'][label]:.0%}", fmt_rate(result["records_per_cpu_s"][label])]
            for label, rate in result["rates"].items()]
    lines.append(table(["configuration", "total records/s", "CPU time / wall per process (median)",
                        "records per CPU-second per process"], rows))
    if "ratio" in result:
        t = result["targets"]["two_vs_one"]
        by = "target met" if t["met"] else f"short by {SCALE_TARGET - result['ratio']:.2f}"
        lines += ["", table(["ratio", "value", "target", "verdict"],
                            [["2 processes / 1 process (same shards, same records)", f"{result['ratio']:.2f}",
                              t["target"], verdict(t["met"], by)],
                             ["(information) 2 processes / 1 process reading 1 shard",
                              f"{result['ratio_vs_single_shard']:.2f}", "", ""]])]
    la, lb = result["loadavg_after"], result["loadavg_before"]
    lines += ["", f"Load average before / after the section: {lb[0]:.2f} / {la[0]:.2f} (1 min; 2 cores). A process "
                  f"that gets a whole core shows ~100 % CPU time / wall; equal records per CPU-second in two rows "
                  f"mean the processes do not slow each other down, only the cores they get."]
    return "\n".join(lines)
