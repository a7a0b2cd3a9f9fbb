"""Probe (issue 16): the C writer of canonical AttributeValue JSON of ``speedups/``
(``ddb_cdc_speedups.canonical_json``) in the "render" way, in one process.

Not part of ``python -m benchmarks``; an experiment's measurement. The inputs and conditions are
those of :mod:`benchmarks.decode`: the same 3,000 records in three GetRecords bodies
(:func:`benchmarks.inputs.decode_bodies`), a worker's imports and garbage-collector settings
(:func:`benchmarks.decode.worker_gc`), every repetition running each way once over all bodies
(interleaved), CPU time of the measuring thread, medians over the repetitions, ratios from the
medians of this run.

Ways:

- bare ``orjson.loads`` (the floor);
- :mod:`benchmarks.decode`'s render way as it is (:func:`benchmarks.decode.render_path`: the typed
  read — msgspec structs, images written by ``WireImage.canonical_json`` — + event construction +
  S3 audit lines & gzip, typed OpenSearch action lines, Redis keys: :mod:`benchmarks.render`);
- the same render work after the fast read (``read_path: fast``: orjson dicts,
  ``_parse_fast_body(typed=False)``), pure Python (``canonical_item`` + ``orjson.dumps`` per part);
- that fast read with the C writer tried first: ``ChangeEvent._typed_json_part`` replaced *in this
  process, while the way runs* (:func:`c_writer_in_events`) by one that returns
  ``canonical_json(part)`` for a plain-dict part when it is not None and calls the original method
  otherwise; nothing in ``pipeline/`` changes. Once with ``canonical_json`` and once with
  ``canonical_json_basic`` (only the shapes written as they are read: no NS / BS / numbers to
  rewrite / unsorted SS);
- for information, the typed read with the C writer tried first (only the keys are plain dicts
  there; the images stay msgspec's).

Before measuring, for every body the rendered output (gzipped S3 body bytes, OpenSearch action
lines, Redis keys) of each C-patched way is checked equal to the unpatched fast way's, and the
parts (Keys, OldImage, NewImage) the C writer took or handed back are counted.

    python -m benchmarks.ccanonical_probe [--repetitions 7] [--pages 3]
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from benchmarks import decode, inputs, median, table

Way = Callable[[list[bytes]], int]


@contextmanager
def c_writer_in_events(canonical_json: Callable[[Any], bytes | None], *, count: bool = True) -> Iterator[dict[str, int]]:
    """Inside the block, ``ChangeEvent._typed_json_part`` tries ``canonical_json(raw)`` first for a
    part that is a plain dict and falls back to the original method when it gives None (this
    process only). Yields ``{"c": parts written in C, "python": parts handed back}`` (counted when
    ``count``)."""
    from pipeline.events import ChangeEvent

    original = ChangeEvent._typed_json_part
    counts = {"c": 0, "python": 0}

    if count:
        def _typed_json_part(self: Any, index: int, raw: Any) -> bytes | None:
            if type(raw) is dict:
                data = canonical_json(raw)
                if data is not None:
                    counts["c"] += 1
                    return data
                counts["python"] += 1
            return original(self, index, raw)
    else:
        def _typed_json_part(self: Any, index: int, raw: Any) -> bytes | None:
            if type(raw) is dict:
                data = canonical_json(raw)
                if data is not None:
                    return data
            return original(self, index, raw)

    ChangeEvent._typed_json_part = _typed_json_part  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        ChangeEvent._typed_json_part = original  # type: ignore[method-assign]


def render_way(*, typed: bool, writer: Callable[[Any], bytes | None] | None = None) -> Way:
    """:func:`benchmarks.decode.render_path`'s work after the typed or the fast read, with the C
    writer tried first when ``writer`` is given."""
    from benchmarks.render import Renderers
    from pipeline.codec import decode_record

    parse, _ = decode._parse_fast_body(typed=typed)
    renderers = Renderers()

    def run(bodies: list[bytes]) -> int:
        n = 0
        for body in bodies:
            events = [decode_record(record, table=decode.TABLE, stream_arn=decode.STREAM_ARN, shard_id=decode.SHARD)
                      for record in parse(body)["Records"]]
            renderers.render_batch(events)
            n += len(events)
        return n

    if writer is None:
        return run

    def patched(bodies: list[bytes]) -> int:
        with c_writer_in_events(writer, count=False):
            return run(bodies)

    return patched


def rendered(body: bytes, *, typed: bool = False) -> tuple[bytes, list[bytes], list[str]]:
    """(gzipped S3 body, OpenSearch action lines, Redis keys) of one body's fresh events."""
    from benchmarks.render import Renderers
    from pipeline.codec import decode_record

    parse, _ = decode._parse_fast_body(typed=typed)
    events = [decode_record(record, table=decode.TABLE, stream_arn=decode.STREAM_ARN, shard_id=decode.SHARD)
              for record in parse(body)["Records"]]
    renderers = Renderers()
    return renderers.s3_body(events), renderers.opensearch_lines(events), renderers.redis_keys(events)


def check(bodies: list[bytes], writer: Callable[[Any], bytes | None], *, typed: bool = False) -> dict[str, int]:
    """Assert the C-patched rendering of every body equals the unpatched fast read's; the counts."""
    total = {"c": 0, "python": 0}
    for number, body in enumerate(bodies):
        expected = rendered(body)
        with c_writer_in_events(writer) as counts:
            got = rendered(body, typed=typed)
        assert got[0] == expected[0], f"body {number}: the S3 body differs"
        assert got[1] == expected[1], f"body {number}: the OpenSearch lines differ"
        assert got[2] == expected[2], f"body {number}: the Redis keys differ"
        for k in total:
            total[k] += counts[k]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--pages", type=int, default=3)
    args = parser.parse_args(argv)

    try:
        import ddb_cdc_speedups
    except ImportError:
        parser.error("ddb_cdc_speedups is not importable: build and install speedups/ (see speedups/README.md)")
    full, basic = ddb_cdc_speedups.canonical_json, ddb_cdc_speedups.canonical_json_basic

    bodies = inputs.decode_bodies(args.pages)
    inputs.release_pool()
    gc_setting = decode.worker_gc()
    records = args.pages * inputs.RECORDS_PER_PAGE
    counts = {"canonical_json": check(bodies, full), "canonical_json_basic": check(bodies, basic),
              "typed read + canonical_json": check(bodies, full, typed=True)}

    ORJSON = "bare orjson.loads"
    RENDER = "render as benchmarks.decode has it (typed read: msgspec, WireImage.canonical_json)"
    FAST_PY = "render after the fast read (orjson dicts), pure Python canonical_item + orjson.dumps"
    FAST_C = "render after the fast read, C canonical_json tried first"
    FAST_BASIC = "render after the fast read, C canonical_json_basic tried first"
    TYPED_C = "info: render after the typed read, C canonical_json tried first (plain-dict parts: the keys)"
    ways: dict[str, Way] = {ORJSON: decode.orjson_path(), RENDER: decode.render_path(),
                            FAST_PY: render_way(typed=False), FAST_C: render_way(typed=False, writer=full),
                            FAST_BASIC: render_way(typed=False, writer=basic),
                            TYPED_C: render_way(typed=True, writer=full)}
    for way in ways.values():  # warm up (imports, caches) and check every way sees every record
        assert way(bodies[:1]) == inputs.RECORDS_PER_PAGE
    times, walls = decode.measure_interleaved(ways, bodies, args.repetitions)
    med = {name: median(ts) for name, ts in times.items()}
    wall = {name: median(ts) for name, ts in walls.items()}
    floor = med[ORJSON]

    print(f"ccanonical probe — {records:,} records in {args.pages} bodies ({sum(map(len, bodies)) / 1e6:.1f} MB), "
          f"median of {args.repetitions} repetitions, CPU time of this thread; garbage collector {gc_setting}; "
          f"rendered output (S3 body, OpenSearch lines, Redis keys) of every C-patched way checked equal to the "
          f"pure-Python fast way's on every body")
    print()
    print(table(["parts (Keys, OldImage, NewImage) of all events", "written in C", "handed back to Python",
                 "share in C"],
                [[name, f"{c['c']:,}", f"{c['python']:,}", f"{c['c'] / max(c['c'] + c['python'], 1):.1%}"]
                 for name, c in counts.items()]))
    print()
    print(table(["way", "CPU ms per 1,000 records (median)", "x orjson.loads (target render <= 2.5x)",
                 "wall ms per 1,000 records"],
                [[name, f"{1000 * med[name] / args.pages:.2f}", f"{med[name] / floor:.2f}x",
                  f"{1000 * wall[name] / args.pages:.2f}"] for name in ways]))
    rows = [["fast read: pure Python / C canonical_json (speed-up of the whole way)", f"{med[FAST_PY] / med[FAST_C]:.2f}x"],
            ["fast read: C canonical_json vs the render way as it is (speed-up)", f"{med[RENDER] / med[FAST_C]:.2f}x"],
            ["fast read: what the C writer saves, in orjson.loads units", f"{(med[FAST_PY] - med[FAST_C]) / floor:.2f}"],
            ["fast read: canonical_json_basic / canonical_json (time)", f"{med[FAST_BASIC] / med[FAST_C]:.2f}x"]]
    print()
    print(table(["ratio (from the medians above)", "value"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
