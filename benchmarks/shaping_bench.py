"""Part of section ``pipeline``: the cost per change of a sink's shaping (issue 19 item 5).

The same recorded records as the pipeline section (``benchmarks.inputs.make_records``: 1–4 KB
NEW_AND_OLD_IMAGES images, 10–40 attributes, 50 % MODIFY / 40 % INSERT / 10 % REMOVE) are decoded
once (not timed), then timed per change, each the median of ``repetitions`` passes:

- ``filter_3``: a typical filter of 3 conditions — ``eventName`` in INSERT / MODIFY, ``Keys.pk``
  with a prefix, ``NewImage.status`` anything-but two values (the view encodes only ``pk`` and
  ``status``);
- ``redact_hmac``: a ``redact`` transform (HMAC-SHA-256) of ``email`` and ``shippingAddress``;
- ``shaped_sink``: both through :class:`pipeline.shaping.sink.ShapedSink` in front of a no-op sink,
  per change of whole batches (what the worker pays);
- ``decode``: :func:`pipeline.codec.decode_record` of the same records, for scale.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks import inputs, median

FILTER_3 = {"eventName": ["INSERT", "MODIFY"],
            "dynamodb": {"Keys": {"pk": {"S": [{"prefix": "tenant-00"}]}},
                         "NewImage": {"status": {"S": [{"anything-but": ["cancelled", "returned"]}]}}}}
REDACT = {"type": "redact", "paths": ["email", "shippingAddress"], "hmac_key": "benchmark-key"}


def _per_change_us(fn, items: list[Any], repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        gc.collect()
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - start) / len(items) * 1e6)
    return median(times)


def run_shaping(*, records: int = 5_000, repetitions: int = 5) -> dict[str, Any]:
    """Microseconds per change of each measure (see the module doc) and the filter's pass rate."""
    from pipeline.codec import decode_record
    from pipeline.events import Batch
    from pipeline.shaping.pattern import compile_filter
    from pipeline.shaping.sink import ShapedSink
    from pipeline.shaping.transforms import build_transform
    from pipeline.sink import Sink

    arn, shard = inputs.stream_arn("bench"), inputs.shard_id(0)
    raw = inputs.make_records(records)
    decode = lambda r: decode_record(r, table="bench", stream_arn=arn, shard_id=shard)  # noqa: E731
    events = [decode(r) for r in raw]
    pattern = compile_filter(FILTER_3)
    redact = build_transform(REDACT)

    class Noop(Sink):
        def write(self, batch):
            pass

    sink = ShapedSink(Noop("bench"), filter=pattern, transforms=[redact])
    batches = [Batch(table="bench", stream_arn=arn, shard_id=shard, events=tuple(events[i:i + 1000]),
                     checkpoint_sequence_number=events[min(i + 999, len(events) - 1)].sequence_number)
               for i in range(0, len(events), 1000)]
    out = {
        "records": records, "repetitions": repetitions,
        "filter_pass_share": sum(pattern.matches(e) for e in events) / len(events),
        "filter_3_us": _per_change_us(pattern.matches, events, repetitions),
        "redact_hmac_us": _per_change_us(redact.apply, events, repetitions),
        "decode_us": _per_change_us(decode, raw, repetitions),
    }
    out["shaped_sink_us"] = _per_change_us(sink.write, batches, repetitions) / 1000 * (len(batches) * 1000 / records)
    return out


def rows(result: dict[str, Any]) -> list[list[str]]:
    """Table rows (measure, µs per change, notes) for the pipeline section's report."""
    r = result
    return [
        ["filter of 3 conditions (eventName, Keys prefix, NewImage anything-but)", f"{r['filter_3_us']:.1f} µs",
         f"{r['filter_pass_share']:.0%} pass; {r['filter_3_us'] / r['decode_us']:.0%} of decode"],
        ["redact (HMAC-SHA-256 of email + shippingAddress)", f"{r['redact_hmac_us']:.1f} µs",
         f"{r['redact_hmac_us'] / r['decode_us']:.0%} of decode"],
        ["ShapedSink: filter + redact over 1,000-change batches", f"{r['shaped_sink_us']:.1f} µs",
         f"{r['shaped_sink_us'] / r['decode_us']:.0%} of decode"],
        ["decode_record of the same records (for scale)", f"{r['decode_us']:.1f} µs",
         f"{r['records']:,} records, median of {r['repetitions']}"],
    ]
