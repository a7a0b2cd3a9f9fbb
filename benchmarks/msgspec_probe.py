"""Experiment (issue 16, "the next lever"): can msgspec check the wire form in C?

``python -m benchmarks.msgspec_probe [--pages 3] [--repetitions 3]`` — not a section of
``python -m benchmarks``. The lever it measured is built since: ``source.read_path: typed``
(:mod:`pipeline.avwire`), which also checks what this probe leaves out.

It decodes the same GetRecords bodies as the decode section, with msgspec, into typed structs:
an AttributeValue is a struct with one optional field per type tag (``forbid_unknown_fields``), so
msgspec rejects, in C while parsing, unknown tags and values of the wrong JSON type (an ``N`` that
is not a string, an ``M`` that is not an object, …). It then re-encodes each record's images with
``msgspec.json.encode`` (``omit_defaults``: ``{"S": "x"}`` again), which is what an S3 line needs
when the wire form is already canonical.

It does *not* check everything the canonical walk checks: exactly one tag per value, number text
(digits, 38-digit precision, canonical text), base64, sorted sets, 32 levels of nesting. So its
rates are an upper bound for a msgspec-based render path, not a replacement. Figures are
CPU-seconds of this thread, medians over the repetitions, against ``orjson.loads`` in the same run.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import orjson


try:
    import msgspec
except ImportError:  # the probe says so when run
    msgspec = None

if msgspec is not None:
    class AV(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
        S: str | None = None
        N: str | None = None
        B: str | None = None
        BOOL: bool | None = None
        NULL: bool | None = None
        M: dict[str, AV] | None = None
        L: list[AV] | None = None
        SS: list[str] | None = None
        NS: list[str] | None = None
        BS: list[str] | None = None

    class Body(msgspec.Struct, omit_defaults=True):
        Keys: dict[str, AV]
        SequenceNumber: str
        SizeBytes: int = 0
        StreamViewType: str = ""
        ApproximateCreationDateTime: float | None = None
        NewImage: dict[str, AV] | None = None
        OldImage: dict[str, AV] | None = None

    class Record(msgspec.Struct, omit_defaults=True):
        eventName: str
        dynamodb: Body
        eventID: str = ""
        eventSource: str = ""
        eventVersion: str = ""
        awsRegion: str = ""
        userIdentity: dict[str, str] | None = None

    class Page(msgspec.Struct, omit_defaults=True):
        Records: list[Record]
        NextShardIterator: str | None = None


def run(pages: int = 3, repetitions: int = 3) -> dict[str, float]:
    from benchmarks import inputs, median
    from benchmarks.decode import worker_gc

    if msgspec is None:
        raise SystemExit("msgspec is not installed: pip install msgspec")
    bodies = inputs.decode_bodies(pages)
    inputs.release_pool()
    worker_gc()
    decoder = msgspec.json.Decoder(Page)
    encoder = msgspec.json.Encoder()
    records = sum(len(orjson.loads(b)["Records"]) for b in bodies)

    def orjson_way() -> None:
        for body in bodies:
            orjson.loads(body)

    def msgspec_parse() -> None:
        for body in bodies:
            decoder.decode(body)

    def msgspec_parse_encode() -> None:
        for body in bodies:
            for record in decoder.decode(body).Records:
                data = record.dynamodb
                encoder.encode(data.Keys)
                if data.NewImage is not None:
                    encoder.encode(data.NewImage)
                if data.OldImage is not None:
                    encoder.encode(data.OldImage)

    ways = {"orjson.loads": orjson_way, "msgspec typed parse (checks tags and JSON types)": msgspec_parse,
            "msgspec typed parse + re-encode keys and images": msgspec_parse_encode}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repetitions):
        for name, way in ways.items():
            gc.collect()
            start = time.thread_time()
            way()
            times[name].append(time.thread_time() - start)
    return {name: 1000 * median(ts) * 1000 / records for name, ts in times.items()}


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    result = run(args.pages, args.repetitions)
    floor = result["orjson.loads"]
    print("| way | CPU ms per 1,000 records | × orjson.loads |\n|---|---|---|")
    for name, ms in result.items():
        print(f"| {name} | {ms:.1f} | {ms / floor:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
