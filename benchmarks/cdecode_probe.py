"""Probe (issue 16, item 3): the C decoder of ``speedups/`` (``ddb_cdc_speedups``) against the
pure-Python ``pipeline.codec`` decoder and AWS Lambda Powertools, in one process.

Not part of ``python -m benchmarks``; an experiment's measurement. The inputs and conditions are
those of :mod:`benchmarks.decode`: the same 3,000 records in three GetRecords bodies
(:func:`benchmarks.inputs.decode_bodies`), a worker's imports and garbage-collector settings
(:func:`benchmarks.decode.worker_gc`), every repetition running each way once over all bodies
(interleaved), CPU time of the measuring thread, medians over the repetitions, ratios from the
medians of this run.

Ways:

- ``orjson.loads`` alone (the floor);
- ``orjson.loads`` + ``pipeline.codec.decode_item`` of Keys, NewImage and OldImage of every record
  (the decode Powertools' row does: images only, no event construction);
- the same with the C ``decode_item``;
- Powertools ``DynamoDBStreamEvent`` (:func:`benchmarks.decode.powertools_path`; left out when
  ``aws-lambda-powertools`` is not installed);
- for information, :mod:`benchmarks.decode`'s own "full decode" way (``decode_record`` + ``before`` +
  ``after``: the row behind the 1.12× figure), and that way again with ``pipeline.codec.decode_item``
  replaced by the C one *inside this process, while that way runs* (a measurement of what wiring
  it in would give; nothing in ``pipeline/`` changes).

Before measuring, the C decode of every image is checked equal to the codec's (values and types).

    python -m benchmarks.cdecode_probe [--repetitions 7] [--pages 3]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, Callable, Iterator

import orjson

from benchmarks import decode, inputs, median, table

PARTS = ("Keys", "NewImage", "OldImage")


def images_way(decode_item: Callable[[Any], Any]) -> Callable[[list[bytes]], int]:
    def run(bodies: list[bytes]) -> int:
        n = 0
        for body in bodies:
            for record in orjson.loads(body)["Records"]:
                data = record["dynamodb"]
                decode_item(data.get("Keys")), decode_item(data.get("NewImage")), decode_item(data.get("OldImage"))
                n += 1
        return n

    return run


@contextmanager
def codec_decode_item(replacement: Callable[[Any], Any]) -> Iterator[None]:
    """``pipeline.codec.decode_item`` is ``replacement`` inside the block (this process only)."""
    from pipeline import codec

    original = codec.decode_item
    codec.decode_item = replacement
    try:
        yield
    finally:
        codec.decode_item = original


def patched(way: Callable[[list[bytes]], int], replacement: Callable[[Any], Any]) -> Callable[[list[bytes]], int]:
    def run(bodies: list[bytes]) -> int:
        with codec_decode_item(replacement):
            return way(bodies)

    return run


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (Decimal: the same text)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return a == b and sorted(map(repr, a)) == sorted(map(repr, b))
    if isinstance(a, Decimal):
        return str(a) == str(b)
    return a == b


def check(bodies: list[bytes], c_decode_item: Callable[[Any], Any]) -> int:
    from pipeline.codec import decode_item

    n = 0
    for body in bodies:
        for record in orjson.loads(body)["Records"]:
            for part in PARTS:
                image = record["dynamodb"].get(part)
                assert same(c_decode_item(image), decode_item(image)), (part, record["eventID"])
                n += image is not None
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--pages", type=int, default=3)
    args = parser.parse_args(argv)

    import ddb_cdc_speedups
    from pipeline import codec

    c_decode_item = ddb_cdc_speedups.bind(codec)
    bodies = inputs.decode_bodies(args.pages)
    inputs.release_pool()
    gc_setting = decode.worker_gc()
    records = args.pages * inputs.RECORDS_PER_PAGE
    checked = check(bodies, c_decode_item)

    ORJSON, PY, C, PT = ("orjson.loads alone", "orjson.loads + codec.decode_item (Keys, New, Old)",
                         "orjson.loads + C decode_item (Keys, New, Old)", "Powertools DynamoDBStreamEvent")
    BENCH, BENCH_C = ("info: benchmarks.decode full decode (decode_record + before + after)",
                      "info: the same, codec.decode_item swapped for the C one in this process")
    ways: dict[str, Callable[[list[bytes]], int]] = {ORJSON: decode.orjson_path(), PY: images_way(codec.decode_item),
                                                     C: images_way(c_decode_item)}
    powertools = decode.powertools_path()
    if powertools is not None:
        ways[PT] = powertools
    ways[BENCH] = decode.full_decode_path()
    ways[BENCH_C] = patched(decode.full_decode_path(), c_decode_item)
    for way in ways.values():
        assert way(bodies[:1]) == inputs.RECORDS_PER_PAGE
    times, walls = decode.measure_interleaved(ways, bodies, args.repetitions)
    med = {name: median(ts) for name, ts in times.items()}
    wall = {name: median(ts) for name, ts in walls.items()}

    print(f"cdecode probe — {records:,} records in {args.pages} bodies ({sum(map(len, bodies)) / 1e6:.1f} MB), "
          f"median of {args.repetitions} repetitions, CPU time of this thread; garbage collector {gc_setting}; "
          f"C decode checked equal (values and types) to codec.decode_item on {checked:,} images")
    print()
    print(table(["way", "CPU ms per 1,000 records (median)", "records per CPU-second", "wall ms per 1,000 records"],
                [[name, f"{1000 * med[name] / args.pages:.2f}", f"{records / med[name]:,.0f}",
                  f"{1000 * wall[name] / args.pages:.2f}"] for name in ways]))
    floor = med[ORJSON]
    rows = [["C full decode vs pure-Python full decode (speed-up)", f"{med[PY] / med[C]:.2f}x"],
            ["C full decode / orjson.loads (time)", f"{med[C] / floor:.2f}x"],
            ["pure-Python full decode / orjson.loads (time)", f"{med[PY] / floor:.2f}x"],
            ["decode part only (minus orjson.loads): Python / C", f"{(med[PY] - floor) / max(med[C] - floor, 1e-9):.2f}x"]]
    if PT in med:
        rows.insert(0, ["C full decode vs Powertools (speed-up; target >= 2x)", f"{med[PT] / med[C]:.2f}x"])
        rows.insert(1, ["pure-Python full decode vs Powertools (speed-up)", f"{med[PT] / med[PY]:.2f}x"])
        rows += [["info: benchmarks.decode full decode vs Powertools", f"{med[PT] / med[BENCH]:.2f}x"],
                 ["info: the same with the C decode_item swapped in vs Powertools", f"{med[PT] / med[BENCH_C]:.2f}x"]]
    print()
    print(table(["ratio (from the medians above)", "value"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
