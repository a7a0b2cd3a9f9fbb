"""Section ``pipeline``: recorded GetRecords responses through a real :class:`pipeline.runtime.worker.Worker`.

The stream is one closed shard of recorded response bodies (:func:`benchmarks.inputs.recorded_stream`)
served at the HTTP boundary (:class:`benchmarks.inputs.StreamsHTTPDouble`) to a real botocore client
inside a real :class:`DynamoDBStreamSource` (fast read path). The worker decodes, fans every batch out
to three no-op sinks (``thread_safe = True``: what remains is our own machinery — fan-out, retry
wrappers, metrics, flush) and checkpoints into a SQLite lease file (WAL, ``synchronous=FULL``, every
``checkpoint_interval_s`` = 1 s and at SHARD_END). A repetition is timed from ``Worker.run()`` until
the SHARD_END checkpoint is written; every sink must have received every record.

In the same repetitions (interleaved), the fast decode of the first pages of the same bodies
(``parse_get_records_body`` + ``decode_record``, no worker) gives the reference rate: the ratio
pipeline / fast decode is the share of the decode rate our machinery keeps (target ≥ 0.70).

Render runs (issue 16): the same worker with the three no-op sinks replaced by three sinks that do
what the built-in sinks compute per change, without network I/O (:mod:`benchmarks.render`: S3
audit lines + gzip, typed OpenSearch bulk action lines, Redis cache keys), against the same
rendering done without a worker on the first pages (interleaved): pipeline with the render sinks /
render is the share our machinery keeps when the sinks do real work (target ≥ 0.70).
"""

from __future__ import annotations

import cProfile
import gc
import os
import tempfile
import threading
import time
from typing import Any

from benchmarks import fmt_rate, inputs, median, profile_lines, pyspy_profile, table, verdict

PIPELINE_VS_DECODE_TARGET = 0.70
PIPELINE_VS_RENDER_TARGET = 0.70


def make_noop_sink(name: str) -> Any:
    """A sink (pipeline.sink.Sink, ``thread_safe = True``) that does nothing with its batches but
    count their events, to check delivery."""
    from pipeline.sink import Sink

    class _Noop(Sink):
        thread_safe = True

        def __init__(self, sink_name: str):
            super().__init__(sink_name)
            self.events = 0
            self._lock = threading.Lock()

        def write(self, batch: Any) -> None:
            with self._lock:
                self.events += len(batch.events)

    return _Noop(name)


def timed_store(path: str) -> Any:
    """A SQLiteLeaseStore that notes when (perf_counter) and how often it wrote a checkpoint."""
    from connectors.sqlite_store import SQLiteLeaseStore

    class TimedStore(SQLiteLeaseStore):
        last_checkpoint_at: float | None = None
        checkpoints = 0

        def checkpoint(self, *args: Any, **kwargs: Any):
            out = super().checkpoint(*args, **kwargs)
            self.last_checkpoint_at = time.perf_counter()
            self.checkpoints += 1
            return out

    store = TimedStore(path)
    store.ensure_table()
    return store


def build_worker(sources: list[Any], workdir: str, *, worker_id: str = "bench", checkpoint_interval_s: float = 1.0,
                 exit_when_idle: bool = True, store: Any = None,
                 max_pages_in_flight: int | None = None, sinks: list[Any] | None = None) -> tuple[Any, Any, list[Any]]:
    import structlog

    from pipeline.deadletter import DirectoryDeadLetterQueue
    from pipeline.runtime.shard_consumer import DEFAULT_MAX_IDLE_INTERVAL_MS, ShardSettings
    from pipeline.runtime.worker import Worker

    store = store or timed_store(os.path.join(workdir, "leases.sqlite"))
    sinks = sinks if sinks is not None else [make_noop_sink(f"noop{i}") for i in (1, 2, 3)]
    extra = {} if max_pages_in_flight is None else {"max_pages_in_flight": max_pages_in_flight}
    worker = Worker(sources=sources, lease_store=store, sinks=sinks,
                    dead_letter=DirectoryDeadLetterQueue(os.path.join(workdir, "dlq")), worker_id=worker_id,
                    logger=structlog.get_logger("benchmark"),
                    shard_settings=ShardSettings(max_records_per_call=1000, checkpoint_interval_s=checkpoint_interval_s,
                                                 max_idle_interval_ms=DEFAULT_MAX_IDLE_INTERVAL_MS),
                    exit_when_idle=exit_when_idle, shutdown_grace_s=30.0,
                    # recorded records are old: no iterator-age warnings about them
                    iterator_age_warning_s=10.0 ** 12, iterator_age_error_s=10.0 ** 12, **extra)
    return worker, store, sinks


class GcTimer:
    """Wall time spent in cyclic garbage collections (all threads) while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1
            self._started = None

    def __enter__(self) -> "GcTimer":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._callback)


def run_pipeline_once(stream: inputs.RecordedStream, *, read_path: str = "fast",
                      profile: bool = False, render: bool = False) -> dict[str, Any]:
    """One worker run over ``stream`` (closed shards) → records, seconds (run() → last checkpoint), …"""
    from pipeline.events import SHARD_END

    double = inputs.StreamsHTTPDouble(stream.stream_arn, recorded=stream)
    if render and read_path == "fast":
        read_path = "typed"  # what source.read_path: auto picks for three sinks that render the wire form
    source = inputs.make_source(double, read_path=read_path)
    with tempfile.TemporaryDirectory(prefix="ddb-cdc-bench-") as workdir:
        if render:
            from benchmarks.render import render_sinks

            worker, store, sinks = build_worker([source], workdir, sinks=render_sinks())
        else:
            worker, store, sinks = build_worker([source], workdir)
        profiles: list[cProfile.Profile] = []
        restore = None
        if profile:
            restore = _profile_consumers(profiles)
        gc.collect()
        try:
            with GcTimer() as gct:
                start = time.perf_counter()
                code = worker.run()
        finally:
            if restore:
                restore()
        end = store.last_checkpoint_at
        leases = store.list_leases()
    if code != 0 or end is None:
        raise RuntimeError(f"the benchmark worker failed (exit code {code}, failed shards {worker.failed})")
    unfinished = [lease.shard_id for lease in leases if lease.checkpoint != SHARD_END]
    short = [(s.name, s.events) for s in sinks if s.events != stream.records]
    if unfinished or short:
        raise RuntimeError(f"incomplete run: shards not at SHARD_END {unfinished}, sinks short {short}")
    seconds = end - start
    out = {"records": stream.records, "seconds": seconds, "rate": stream.records / seconds,
           "checkpoints": store.checkpoints, "get_records_calls": double.calls.get("GetRecords", 0),
           "gc_seconds": gct.seconds, "gc_share": gct.seconds / seconds}
    if profiles:
        out["profile"] = profile_lines(profiles, limit=20)
    return out


def _profile_consumers(profiles: list[cProfile.Profile]):
    """Run every ShardConsumer thread under cProfile (the worker's loop thread is mostly waiting)."""
    import pipeline.runtime.worker as worker_module

    original = worker_module.ShardConsumer

    class ProfiledConsumer(original):  # type: ignore[misc, valid-type]
        def run(self) -> None:
            prof = cProfile.Profile()
            profiles.append(prof)
            prof.enable()
            try:
                super().run()
            finally:
                prof.disable()

    worker_module.ShardConsumer = ProfiledConsumer

    def restore() -> None:
        worker_module.ShardConsumer = original

    return restore


def fast_decode_rate(bodies: list[bytes], stream_arn: str, shard: str) -> float:
    from benchmarks.decode import _parse_fast_body
    from pipeline.codec import decode_record

    parse, _ = _parse_fast_body()
    gc.collect()
    start = time.perf_counter()
    n = 0
    for body in bodies:
        n += len([decode_record(r, table="bench", stream_arn=stream_arn, shard_id=shard)
                  for r in parse(body)["Records"]])
    return n / (time.perf_counter() - start)


def render_rate(bodies: list[bytes], stream_arn: str, shard: str) -> float:
    """records/s of parse + event construction + the three sinks' rendering, no worker."""
    from benchmarks.decode import _parse_fast_body
    from benchmarks.render import Renderers
    from pipeline.codec import decode_record

    parse, _ = _parse_fast_body()
    renderers = Renderers()
    gc.collect()
    start = time.perf_counter()
    n = 0
    for body in bodies:
        events = [decode_record(r, table="bench", stream_arn=stream_arn, shard_id=shard) for r in parse(body)["Records"]]
        renderers.render_batch(events)
        n += len(events)
    return n / (time.perf_counter() - start)


def run_pipeline(*, records: int = 50_000, repetitions: int = 5, decode_pages: int = 10,
                 boto3_records: int = 5_000, profile: bool = True, render_records: int = 10_000,
                 render_repetitions: int = 3) -> dict[str, Any]:
    stream = inputs.recorded_stream("bench", shards=1, records_per_shard=records)
    boto3_stream = (inputs.recorded_stream("bench", shards=1, records_per_shard=boto3_records)
                    if boto3_records else None)
    inputs.release_pool()
    shard = stream.shards[0]
    reference = shard.bodies[:decode_pages]
    runs: list[dict[str, Any]] = []
    decode_rates: list[float] = []
    run_pipeline_once(inputs.recorded_stream("bench", shards=1, records_per_shard=2000))  # warm-up
    inputs.release_pool()
    for _ in range(repetitions):
        runs.append(run_pipeline_once(stream))
        decode_rates.append(fast_decode_rate(reference, stream.stream_arn, shard.shard_id))
    rate = median([r["rate"] for r in runs])
    decode_rate = median(decode_rates)
    ratio = rate / decode_rate
    result: dict[str, Any] = {
        "inputs": {"records": records, "shards": 1, "body_bytes": stream.body_bytes, "repetitions": repetitions,
                   "decode_reference_records": decode_pages * inputs.RECORDS_PER_PAGE},
        "rate": rate, "fast_decode_rate": decode_rate, "pipeline_vs_decode": ratio,
        "seconds": median([r["seconds"] for r in runs]), "checkpoints": runs[0]["checkpoints"],
        "get_records_calls": runs[0]["get_records_calls"], "gc_share": median([r["gc_share"] for r in runs]),
        "runs": runs, "decode_rates": decode_rates,
        "targets": {"pipeline_vs_decode": {"target": f">= {PIPELINE_VS_DECODE_TARGET}", "value": ratio,
                                           "met": ratio >= PIPELINE_VS_DECODE_TARGET}},
    }
    if render_records:
        render_stream = inputs.recorded_stream("bench", shards=1, records_per_shard=render_records)
        inputs.release_pool()
        render_reference = render_stream.shards[0].bodies[:max(1, min(decode_pages, render_records // 1000))]
        render_runs, render_rates = [], []
        for _ in range(render_repetitions):
            render_runs.append(run_pipeline_once(render_stream, render=True))
            render_rates.append(render_rate(render_reference, render_stream.stream_arn,
                                            render_stream.shards[0].shard_id))
        r_rate, r_ref = median([r["rate"] for r in render_runs]), median(render_rates)
        r_ratio = r_rate / r_ref
        result["render"] = {"records": render_records, "repetitions": render_repetitions, "rate": r_rate,
                            "render_rate": r_ref, "pipeline_vs_render": r_ratio,
                            "seconds": median([r["seconds"] for r in render_runs]),
                            "gc_share": median([r["gc_share"] for r in render_runs]), "render_rates": render_rates}
        result["targets"]["pipeline_vs_render"] = {"target": f">= {PIPELINE_VS_RENDER_TARGET}", "value": r_ratio,
                                                   "met": r_ratio >= PIPELINE_VS_RENDER_TARGET}
    if boto3_stream is not None:
        b = run_pipeline_once(boto3_stream, read_path="boto3")
        result["boto3_read_path"] = {"records": boto3_records, "rate": b["rate"], "repetitions": 1,
                                     "fast_vs_boto3": rate / b["rate"]}
    from benchmarks import shaping_bench  # issue 19: the cost of a sink's filter and transforms

    result["shaping"] = shaping_bench.run_shaping(records=min(records, 5_000), repetitions=repetitions)
    if profile and not all(t["met"] for t in result["targets"].values()):
        result["profile"] = profile_pipeline(records if ratio < PIPELINE_VS_DECODE_TARGET else render_records,
                                             render=ratio >= PIPELINE_VS_DECODE_TARGET)
    return result


def report(result: dict[str, Any]) -> str:
    inp = result["inputs"]
    t = result["targets"]["pipeline_vs_decode"]
    lines = [f"## pipeline — 1 shard × {inp['records']:,} recorded records ({inp['body_bytes'] / 1e6:.0f} MB of "
             f"GetRecords bodies) → real Worker (fast read path) → 3 no-op sinks + SQLite checkpoints; "
             f"median of {inp['repetitions']} repetitions", ""]
    rows = [["pipeline (Worker.run() → SHARD_END checkpoint)", fmt_rate(result["rate"]),
             f"{result['seconds']:.2f} s, {result['get_records_calls']} GetRecords, "
             f"{result['checkpoints']} checkpoints, GC {result['gc_share']:.0%} of wall"],
            [f"fast decode of the first {inp['decode_reference_records']:,} of the same records (no worker)",
             fmt_rate(result["fast_decode_rate"]), "interleaved with the pipeline repetitions"]]
    if "render" in result:
        r = result["render"]
        rows.append([f"pipeline with the 3 render sinks (S3 line + gzip, typed OpenSearch actions, Redis keys; "
                     f"{r['records']:,} records, median of {r['repetitions']})", fmt_rate(r["rate"]),
                     f"{r['seconds']:.2f} s, GC {r['gc_share']:.0%} of wall"])
        rows.append(["render without a worker (construction + the same 3 renderings), first pages",
                     fmt_rate(r["render_rate"]), "interleaved with the render pipeline repetitions"])
    if "boto3_read_path" in result:
        b = result["boto3_read_path"]
        rows.append([f"pipeline with read_path=boto3 ({b['records']:,} records, 1 repetition)", fmt_rate(b["rate"]),
                     f"fast-path pipeline is {b['fast_vs_boto3']:.2f}x this"])
    lines.append(table(["measure", "records/s", "notes"], rows))
    by = "target met" if t["met"] else f"short by {PIPELINE_VS_DECODE_TARGET - result['pipeline_vs_decode']:.2f}"
    ratio_rows = [["pipeline / fast decode", f"{result['pipeline_vs_decode']:.2f}", t["target"], verdict(t["met"], by)]]
    if "pipeline_vs_render" in result["targets"]:
        rt = result["targets"]["pipeline_vs_render"]
        r_by = "target met" if rt["met"] else f"short by {PIPELINE_VS_RENDER_TARGET - rt['value']:.2f}"
        ratio_rows.append(["pipeline with render sinks / render", f"{rt['value']:.2f}", rt["target"],
                           verdict(rt["met"], r_by)])
    lines += ["", table(["ratio", "value", "target", "verdict"], ratio_rows)]
    if result.get("shaping"):
        from benchmarks import shaping_bench

        lines += ["", "Shaping cost per change (sinks[].filter / transforms; decoded once, not timed):", "",
                  table(["measure", "per change", "notes"], shaping_bench.rows(result["shaping"]))]
    if result.get("profile"):
        lines += ["", "Profile of the pipeline (own time includes the garbage collections a function's "
                  "allocations trigger):", "", "```", *result["profile"], "```"]
    return "\n".join(lines)


def profile_pipeline(records: int, *, render: bool = False) -> list[str]:
    """py-spy over one pipeline run (with the render sinks when ``render``) in a separate process if
    py-spy is installed (every thread: the shard reader and the worker loop); else cProfile of the
    shard reader thread here."""
    argv = ["benchmarks.pipeline_bench", "--workload-records", str(records)] + (["--render"] if render else [])
    lines = pyspy_profile(argv, markers=["ShardConsumer.run (", "Worker.run ("])
    if lines:
        return lines
    stream = inputs.recorded_stream("bench", shards=1, records_per_shard=records)
    inputs.release_pool()
    return [f"cProfile (py-spy not installed) of the shard reader thread, one run{' with the render sinks' if render else ''}",
            "", *run_pipeline_once(stream, profile=True, render=render)["profile"]]


def run_workload(stream: inputs.RecordedStream, *, render: bool = False) -> dict[str, Any]:
    return run_pipeline_once(stream, render=render)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="pipeline workload for the profiler (see benchmarks.pipeline_bench)")
    parser.add_argument("--workload-records", type=int, required=True)
    parser.add_argument("--render", action="store_true", help="the three render sinks instead of no-op sinks")
    args = parser.parse_args(argv)
    from pipeline.logs import configure_logging

    configure_logging("WARNING", "json")
    stream = inputs.recorded_stream("bench", shards=1, records_per_shard=args.workload_records)
    inputs.release_pool()
    run_workload(stream, render=args.render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
