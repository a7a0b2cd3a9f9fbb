"""Section ``decode``: records/s of the ways through the same GetRecords response bodies, in one run.

Peers:

- **boto3 path**: botocore's JSON response parser for the ``dynamodbstreams`` GetRecords output
  shape (what a boto3 client runs on every response) + ``boto3.dynamodb.types.TypeDeserializer``
  over Keys / NewImage / OldImage of every record;
- **Powertools**: AWS Lambda Powertools' ``DynamoDBStreamEvent`` data class (what a Lambda user
  already has) over ``orjson.loads`` of the same bytes, reading ``keys``, ``new_image`` and
  ``old_image`` of every record (benchmark-only dependency: the ``bench`` extra; the row is left
  out when it is not installed);
- **orjson**: bare ``orjson.loads`` of the same bytes (the floor).

Ours (issue 16):

- **event construction**: ``parse_get_records_body`` (orjson) + :func:`pipeline.codec.decode_record`
  per record — lazy events: keys, sequence number and the rest checked and decoded, images kept as
  parsed; also with ``typed=True`` (``source.read_path: typed``, msgspec structs, for information);
- **full decode**: the same (orjson: what ``read_path: auto`` picks for sinks that decode) +
  ``event.before`` and ``event.after`` of every event (every part decoded, as the old eager
  decoder did);
- **render**: event construction from the typed read (what ``read_path: auto`` picks for these
  sinks) + what the three built-in sinks compute per change, without network I/O
  (:mod:`benchmarks.render`: S3 audit lines + gzip at the sink's default level, typed OpenSearch
  bulk action lines, Redis cache keys).

Targets: construction within 1.5× of ``orjson.loads``; full decode ≥ 2× Powertools (and ≥ 4× the
boto3 path, the older target); render within 2.5× of ``orjson.loads``.

Plus, for information, event construction *through a real botocore client* (request building,
SigV4 signing, the ``before-parse`` hook; the bytes come from
:class:`benchmarks.inputs.StreamsHTTPDouble`) — what :class:`DynamoDBStreamSource` pays per call on
top of the parse.

The process first loads a worker's imports and sets the garbage collector as a worker does when
it starts (``pipeline.runtime.worker.tune_garbage_collector``: ``gc.freeze()`` + a higher generation-0
threshold). Diagnostic rows: three ways with the cyclic garbage collector disabled.

Every repetition runs each way once over all bodies, interleaved (so drift of the machine hits all
alike); figures are medians over the repetitions, ratios are computed from those medians. Time is
the measuring thread's CPU time (``time.thread_time``: the work is single-threaded and does no
I/O, so on an idle machine it equals wall-clock time, and on a shared one it leaves out the time
other programs had the core); wall-clock rates are reported alongside.
"""

from __future__ import annotations

import cProfile
import gc
import time
from typing import Any, Callable

import orjson

from benchmarks import fmt_rate, inputs, median, profile_lines, pyspy_profile, table, verdict

TABLE = "bench"
STREAM_ARN = inputs.stream_arn(TABLE)
SHARD = inputs.shard_id(0)

FAST_VS_BOTO3_TARGET = 4.0  # full decode / boto3 path
ORJSON_VS_FAST_TARGET = 1.5  # event construction within 1.5x of orjson.loads
FULL_VS_POWERTOOLS_TARGET = 2.0  # full decode / Powertools
RENDER_VS_ORJSON_TARGET = 2.5  # render within 2.5x of orjson.loads

CONSTRUCT = "ours: event construction (orjson body parse + decode_record → lazy ChangeEvent)"
CONSTRUCT_TYPED = "ours: event construction, read_path typed (msgspec structs + decode_record)"
FULL = "ours: full decode (construction + before + after of every event)"
RENDER = "ours: render (typed read + construction + S3 line & gzip, typed OpenSearch actions, Redis keys)"
BOTO3 = "peer: boto3 path (botocore parser + TypeDeserializer)"
POWERTOOLS = "peer: Powertools DynamoDBStreamEvent (orjson.loads + keys, new_image, old_image)"
ORJSON = "peer: bare orjson.loads"


def _parse_fast_body(typed: bool = False) -> tuple[Callable[[bytes], dict[str, Any]], str]:
    """The fast path's body parser (``typed``: the msgspec read of ``source.read_path: typed``):
    the lead's module when present, else its stand-in."""
    try:
        from connectors.dynamodb_streams.fastpath import parse_get_records_body
    except ImportError:
        return orjson.loads, "orjson.loads (fastpath module not found)"
    if typed:
        from functools import partial

        return (partial(parse_get_records_body, typed=True),
                "connectors.dynamodb_streams.fastpath.parse_get_records_body(typed=True)")
    return parse_get_records_body, "connectors.dynamodb_streams.fastpath.parse_get_records_body"


def boto3_path() -> Callable[[list[bytes]], int]:
    import botocore.parsers
    import botocore.session
    from boto3.dynamodb.types import TypeDeserializer

    shape = botocore.session.get_session().get_service_model("dynamodbstreams").operation_model("GetRecords").output_shape
    parser = botocore.parsers.create_parser("json")
    deserializer = TypeDeserializer()

    def run(bodies: list[bytes]) -> int:
        n = 0
        for body in bodies:
            parsed = parser.parse({"body": body, "headers": {}, "status_code": 200}, shape)
            for record in parsed["Records"]:
                data = record["dynamodb"]
                for part in ("Keys", "NewImage", "OldImage"):
                    image = data.get(part)
                    if image is not None:
                        {name: deserializer.deserialize(value) for name, value in image.items()}
                n += 1
        return n

    return run


def fast_path(typed: bool = False) -> Callable[[list[bytes]], int]:
    from pipeline.codec import decode_record

    parse, _ = _parse_fast_body(typed)

    def run(bodies: list[bytes]) -> int:
        n = 0
        for body in bodies:
            events = [decode_record(record, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD)
                      for record in parse(body)["Records"]]
            n += len(events)
        return n

    return run


def orjson_path() -> Callable[[list[bytes]], int]:
    def run(bodies: list[bytes]) -> int:
        return sum(len(orjson.loads(body)["Records"]) for body in bodies)

    return run


def powertools_path() -> Callable[[list[bytes]], int] | None:
    """Powertools' DynamoDBStreamEvent over orjson.loads, every record's keys + new + old image
    (None when aws-lambda-powertools is not installed: ``pip install -e '.[bench]'``)."""
    try:
        from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBStreamEvent
    except ImportError:
        return None

    def run(bodies: list[bytes]) -> int:
        n = 0
        for body in bodies:
            for record in DynamoDBStreamEvent(orjson.loads(body)).records:
                data = record.dynamodb
                data.keys, data.new_image, data.old_image
                n += 1
        return n

    return run


def full_decode_path() -> Callable[[list[bytes]], int]:
    from pipeline.codec import decode_record

    parse, _ = _parse_fast_body()

    def run(bodies: list[bytes]) -> int:
        n = 0
        for body in bodies:
            for record in parse(body)["Records"]:
                event = decode_record(record, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD)
                event.before, event.after
                n += 1
        return n

    return run


def render_path() -> Callable[[list[bytes]], int]:
    """Event construction + the three built-in sinks' rendering of each page's events."""
    from benchmarks.render import Renderers
    from pipeline.codec import decode_record

    parse, _ = _parse_fast_body(typed=True)  # what read_path: auto picks for these three sinks
    renderers = Renderers()

    def run(bodies: list[bytes]) -> int:
        n = 0
        for body in bodies:
            events = [decode_record(record, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD)
                      for record in parse(body)["Records"]]
            renderers.render_batch(events)
            n += len(events)
        return n

    return run


def worker_gc() -> str:
    """Load a worker's imports (the collector's cost grows with the heap) and set the garbage
    collector as a worker does when it starts (``pipeline.runtime.worker.tune_garbage_collector``, when
    there is one), so every way is measured in the conditions of a worker process."""
    import pipeline.runtime.worker as worker_module

    tune = getattr(worker_module, "tune_garbage_collector", None)
    if tune is None:
        return "CPython defaults (no pipeline.runtime.worker.tune_garbage_collector)"
    tune()
    return (f"as a worker sets it: gc.freeze() after imports, thresholds {gc.get_threshold()} "
            "(pipeline.runtime.worker.tune_garbage_collector)")


def gc_off(way: Callable[[list[bytes]], int]) -> Callable[[list[bytes]], int]:
    """``way`` with the cyclic garbage collector disabled while it runs (diagnostic rows)."""
    def run(bodies: list[bytes]) -> int:
        gc.disable()
        try:
            return way(bodies)
        finally:
            gc.enable()

    return run


def fast_client_path(bodies: list[bytes]) -> Callable[[list[bytes]], int] | None:
    """The fast path through DynamoDBStreamSource + a real botocore client (None without the fast path)."""
    from pipeline.codec import decode_record

    shard = inputs.RecordedShard(SHARD, list(bodies), len(bodies) * inputs.RECORDS_PER_PAGE,
                                 inputs.sequence_number(0, 0), inputs.sequence_number(0, 1))
    double = inputs.StreamsHTTPDouble(STREAM_ARN, recorded=inputs.RecordedStream(TABLE, STREAM_ARN, [shard]))
    try:
        source = inputs.make_source(double, read_path="fast")
    except RuntimeError:
        return None
    tokens = [inputs.iterator_token(SHARD, p) for p in range(len(bodies))]

    def run(pages: list[bytes]) -> int:  # serves the same bodies, by position
        n = 0
        for token in tokens[:len(pages)]:
            result = source.get_records(token, 1000)
            events = [decode_record(record, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD)
                      for record in result.records]
            n += len(events)
        return n

    return run


def measure_interleaved(ways: dict[str, Callable[[list[bytes]], int]], bodies: list[bytes],
                        repetitions: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each repetition runs every way once over all ``bodies``, in order (interleaved, so a
    change in the machine's load touches every way alike), after a ``gc.collect()``. Returns
    (CPU seconds of this thread, wall-clock seconds): one list per way name, one entry per
    repetition."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    walls: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repetitions):
        for name, way in ways.items():
            gc.collect()
            start, cpu = time.perf_counter(), time.thread_time()
            way(bodies)
            times[name].append(time.thread_time() - cpu)
            walls[name].append(time.perf_counter() - start)
    return times, walls


def run_decode(*, pages: int = 3, repetitions: int = 7, profile: bool = True) -> dict[str, Any]:
    bodies = inputs.decode_bodies(pages)
    inputs.release_pool()
    gc_setting = worker_gc()
    records = pages * inputs.RECORDS_PER_PAGE
    _, parser_name = _parse_fast_body()
    ways: dict[str, Callable[[list[bytes]], int]] = {BOTO3: boto3_path()}
    powertools = powertools_path()
    if powertools is not None:
        ways[POWERTOOLS] = powertools
    ways.update({ORJSON: orjson_path(), CONSTRUCT: fast_path(), CONSTRUCT_TYPED: fast_path(typed=True),
                 FULL: full_decode_path(), RENDER: render_path()})
    client_way = fast_client_path(bodies)
    if client_way is not None:
        ways["info: event construction via botocore client (sign + hook + decode_record)"] = client_way
    ways["diagnostic: boto3 path with the garbage collector off"] = gc_off(ways[BOTO3])
    ways["diagnostic: event construction with the garbage collector off"] = gc_off(ways[CONSTRUCT])
    ways["diagnostic: bare orjson.loads with the garbage collector off"] = gc_off(orjson_path())
    for way in ways.values():  # warm up (imports, caches) and check every way sees every record
        assert way(bodies[:1]) == inputs.RECORDS_PER_PAGE
    times, walls = measure_interleaved(ways, bodies, repetitions)
    rates = {name: records / median(ts) for name, ts in times.items()}
    wall_rates = {name: records / median(ts) for name, ts in walls.items()}
    boto3_rate, orjson_rate = rates[BOTO3], rates[ORJSON]
    construct_rate, full_rate, render_rate = rates[CONSTRUCT], rates[FULL], rates[RENDER]
    fast_vs_boto3 = full_rate / boto3_rate
    orjson_vs_fast = orjson_rate / construct_rate
    orjson_vs_render = orjson_rate / render_rate
    targets: dict[str, Any] = {
        "orjson_vs_fast": {"target": f"<= {ORJSON_VS_FAST_TARGET}x", "value": orjson_vs_fast,
                           "met": orjson_vs_fast <= ORJSON_VS_FAST_TARGET},
    }
    if POWERTOOLS in rates:
        full_vs_powertools = full_rate / rates[POWERTOOLS]
        targets["full_vs_powertools"] = {"target": f">= {FULL_VS_POWERTOOLS_TARGET}x", "value": full_vs_powertools,
                                         "met": full_vs_powertools >= FULL_VS_POWERTOOLS_TARGET}
    targets["orjson_vs_render"] = {"target": f"<= {RENDER_VS_ORJSON_TARGET}x", "value": orjson_vs_render,
                                   "met": orjson_vs_render <= RENDER_VS_ORJSON_TARGET}
    targets["fast_vs_boto3"] = {"target": f">= {FAST_VS_BOTO3_TARGET}x", "value": fast_vs_boto3,
                                "met": fast_vs_boto3 >= FAST_VS_BOTO3_TARGET}
    result: dict[str, Any] = {
        "inputs": {"pages": pages, "records": records, "body_bytes": sum(len(b) for b in bodies),
                   "mean_record_bytes": sum(len(b) for b in bodies) / records, "repetitions": repetitions,
                   "fast_body_parser": parser_name, "garbage_collector": gc_setting},
        "rates": rates,
        "wall_rates": wall_rates,
        "cpu_share": {name: sum(times[name]) / sum(walls[name]) for name in ways},
        "ms_per_1000_records": {name: 1000 * median(ts) / pages for name, ts in times.items()},
        "wall_ratios": {"fast_vs_boto3": wall_rates[FULL] / wall_rates[BOTO3],
                        "orjson_vs_fast": wall_rates[ORJSON] / wall_rates[CONSTRUCT],
                        "orjson_vs_render": wall_rates[ORJSON] / wall_rates[RENDER]},
        "fast_vs_boto3": fast_vs_boto3,
        "orjson_vs_fast": orjson_vs_fast,
        "orjson_vs_render": orjson_vs_render,
        "targets": targets,
    }
    from benchmarks.render import render_breakdown

    result["render_breakdown_ms"] = render_breakdown(bodies, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD,
                                                     repetitions=min(3, repetitions))
    off = {k: v for k, v in rates.items() if k.startswith("diagnostic:")}
    if len(off) == 3:
        b_off, f_off, o_off = (off[k] for k in off)
        result["gc_off"] = {"fast_vs_boto3": f_off / b_off, "orjson_vs_fast": o_off / f_off,
                            "fast_gc_off_vs_orjson_gc_on": orjson_rate / f_off}
    if profile:
        missed = [name for name, t in targets.items() if not t["met"]]
        if missed:
            result["profile_of"] = missed
            result["profile"] = profile_fast_path(bodies, way="render" if "orjson_vs_render" in missed else
                                                  "full" if "full_vs_powertools" in missed or "fast_vs_boto3" in missed
                                                  else "construct")
    return result


_WORKLOADS = {"construct": fast_path, "full": full_decode_path, "render": render_path}


def profile_fast_path(bodies: list[bytes], way: str = "construct") -> list[str]:
    """py-spy over one of our ways (``construct`` / ``full`` / ``render``) in a separate process
    (8 s of work on the same bodies) if py-spy is installed; else cProfile here (which inflates
    Python-level calls relative to orjson's C)."""
    lines = pyspy_profile(["benchmarks.decode", "--workload-seconds", "8", "--pages", str(len(bodies)),
                           "--way", way], markers=["run_workload ("])
    if lines:
        return [f"py-spy of the {way} way", "", *lines]
    run = _WORKLOADS[way]()
    prof = cProfile.Profile()
    prof.enable()
    run(bodies)
    prof.disable()
    return [f"cProfile of the {way} way (py-spy not installed), one pass over the bodies; own time includes "
            "the garbage collections a function's allocations trigger", "", *profile_lines(prof, limit=25)]


def report(result: dict[str, Any]) -> str:
    inp = result["inputs"]
    lines = [f"## decode — {inp['records']:,} records in {inp['pages']} GetRecords bodies "
             f"({inp['body_bytes'] / 1e6:.1f} MB, {inp['mean_record_bytes']:,.0f} B/record), "
             f"median of {inp['repetitions']} repetitions; fast body parser: {inp['fast_body_parser']}; "
             f"garbage collector {inp.get('garbage_collector', 'CPython defaults')}", ""]
    lines.append(table(["way", "records per CPU-second", "CPU ms per 1,000 records", "records/s (wall clock)"],
                       [[name, fmt_rate(rate), f"{result['ms_per_1000_records'][name]:.1f}",
                         fmt_rate(result["wall_rates"][name])]
                        for name, rate in result["rates"].items()]))
    share = min(result["cpu_share"].values())
    w = result["wall_ratios"]
    lines += ["", f"Rates and ratios are per CPU-second of the measuring thread (``time.thread_time``), so other "
                  f"programs on the machine do not count; on an idle machine they equal wall-clock rates. This run "
                  f"got {share:.0%}–{max(result['cpu_share'].values()):.0%} of a core; from wall-clock medians the "
                  f"ratios would be full decode / boto3 {w['fast_vs_boto3']:.2f}x, orjson / construction "
                  f"{w['orjson_vs_fast']:.2f}x, orjson / render {w['orjson_vs_render']:.2f}x."]
    t = result["targets"]
    rows = [["orjson / event construction (construction within N× of orjson)", f"{result['orjson_vs_fast']:.2f}x",
             t["orjson_vs_fast"]["target"],
             verdict(t["orjson_vs_fast"]["met"], _by(result["orjson_vs_fast"], ORJSON_VS_FAST_TARGET, higher=False))]]
    if "full_vs_powertools" in t:
        v = t["full_vs_powertools"]["value"]
        rows.append(["full decode / Powertools", f"{v:.2f}x", t["full_vs_powertools"]["target"],
                     verdict(t["full_vs_powertools"]["met"], _by(v, FULL_VS_POWERTOOLS_TARGET, higher=True))])
    rows.append(["orjson / render (render within N× of orjson)", f"{result['orjson_vs_render']:.2f}x",
                 t["orjson_vs_render"]["target"],
                 verdict(t["orjson_vs_render"]["met"], _by(result["orjson_vs_render"], RENDER_VS_ORJSON_TARGET,
                                                           higher=False))])
    rows.append(["full decode / boto3", f"{result['fast_vs_boto3']:.2f}x", t["fast_vs_boto3"]["target"],
                 verdict(t["fast_vs_boto3"]["met"], _by(result["fast_vs_boto3"], FAST_VS_BOTO3_TARGET, higher=True))])
    lines += ["", table(["ratio", "value", "target", "verdict"], rows)]
    if result.get("render_breakdown_ms"):
        b = result["render_breakdown_ms"]
        floor = result["ms_per_1000_records"][ORJSON]
        lines += ["", "Render, part by part (CPU ms per 1,000 records, each measured apart on fresh lazy events; "
                      "parse is the typed read the render way uses; orjson.loads of the same run is the floor):", "",
                  table(["part", "CPU ms per 1,000 records", "× orjson.loads"],
                        [[name, f"{ms:.1f}", f"{ms / floor:.2f}"] for name, ms in b.items()])]
    if result.get("gc_off"):
        g = result["gc_off"]
        lines += ["", f"Diagnostic, with the garbage collector off: construction / boto3 {g['fast_vs_boto3']:.2f}x, "
                      f"orjson / construction {g['orjson_vs_fast']:.2f}x (orjson with the collector on / "
                      f"construction with it off: {g['fast_gc_off_vs_orjson_gc_on']:.2f}x)."]
    if result.get("profile"):
        lines += ["", f"Profile (targets missed: {', '.join(result.get('profile_of', []))}; own time includes the "
                  "garbage collections a function's allocations trigger):", "", "```", *result["profile"], "```"]
    return "\n".join(lines)


def _by(value: float, target: float, *, higher: bool) -> str:
    if higher:
        return "target met" if value >= target else f"{value / target:.0%} of the target; short by {target / value:.2f}x"
    return "target met" if value <= target else f"{value / target:.2f}x over the target"


def run_workload(way: Callable[[list[bytes]], int], bodies: list[bytes], seconds: float) -> int:
    """``way`` over ``bodies`` again and again for ``seconds`` (the profiled work)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += way(bodies)
    return n


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="decode workload for the profiler (see benchmarks.decode)")
    parser.add_argument("--workload-seconds", type=float, required=True)
    parser.add_argument("--pages", type=int, default=3)
    parser.add_argument("--way", choices=sorted(_WORKLOADS), default="construct")
    args = parser.parse_args(argv)
    bodies = inputs.decode_bodies(args.pages)
    inputs.release_pool()
    worker_gc()  # a worker's heap and collector settings, as in the measured runs
    way = _WORKLOADS[args.way]()
    way(bodies[:1])  # warm-up: lazy imports
    run_workload(way, bodies, args.workload_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
