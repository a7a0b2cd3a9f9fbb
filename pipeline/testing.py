"""Helpers for sink authors and tests: a recording sink, stream-record builders, contract checks.

    from pipeline.testing import RecordingSink, make_stream_record, make_batch, check_sink_contract
    from pipeline.testing import check_transform

``check_transform(spec)`` builds a transform from its configuration mapping (``{"type": ...,
options}``, validated exactly as ``sinks[].transforms`` entries are) and applies it to events,
checking what every transform must keep: keys, ``key_id``, key attributes and the position
unchanged, and the same output for the same input (a retried batch is transformed again).

``check_sink_contract(factory)`` runs the checks every sink should pass: it opens the sink,
writes a batch covering INSERT/MODIFY/REMOVE, flushes, writes the same batch again (idempotence),
flushes and closes — a plugin's own test then asserts its destination's end state.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from pipeline.codec import decode_record, encode_item
from pipeline.events import Batch, ChangeEvent
from pipeline.sink import Sink, SinkContext, SinkOptions

__all__ = [  # the public plugin API: tests/test_layout.py holds the list
    "RecordingSink",
    "make_stream_record",
    "make_batch",
    "sample_batch",
    "check_sink_contract",
    "check_transform",
]


class RecordingSink(Sink):
    """Keeps every written event in memory (``written``) and what was flushed (``flushed``).

    ``fail_next`` may hold exceptions to raise from the next ``write`` calls, in order, to
    exercise the fan-out's retry and dead-letter paths.
    """

    thread_safe = True

    def __init__(self, name: str = "recording", options: SinkOptions | None = None):
        super().__init__(name, options)
        self.written: list[ChangeEvent] = []
        self.flushed: list[ChangeEvent] = []
        self.fail_next: list[BaseException] = []
        self.opened = self.closed = False
        self._pending: list[ChangeEvent] = []
        self._lock = threading.Lock()

    def open(self, context: SinkContext) -> None:
        super().open(context)
        self.opened = True

    def write(self, batch: Batch) -> None:
        with self._lock:
            if self.fail_next:
                raise self.fail_next.pop(0)
            self.written.extend(batch.events)
            self._pending.extend(batch.events)

    def flush(self) -> None:
        with self._lock:
            self.flushed.extend(self._pending)
            self._pending.clear()

    def close(self) -> None:
        self.closed = True


def make_stream_record(
    *,
    event_name: str = "INSERT",
    keys: Mapping[str, Any],
    new_image: Mapping[str, Any] | None = None,
    old_image: Mapping[str, Any] | None = None,
    sequence_number: str = "000000000000000000001",
    created: datetime | float | None = None,
    view_type: str = "NEW_AND_OLD_IMAGES",
    ttl: bool = False,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A DynamoDB stream record in the JSON shape Lambda delivers (B as base64, time as epoch s).

    ``keys`` / ``new_image`` / ``old_image`` are plain Python values (str, Decimal, bytes, sets,
    lists, dicts) encoded with :func:`pipeline.codec.encode_item`.
    """
    if created is None:
        created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    epoch = created.timestamp() if isinstance(created, datetime) else float(created)
    body: dict[str, Any] = {
        "ApproximateCreationDateTime": epoch,
        "Keys": encode_item(keys),
        "SequenceNumber": sequence_number,
        "SizeBytes": 100,
        "StreamViewType": view_type,
    }
    if new_image is not None:
        body["NewImage"] = encode_item(new_image)
    if old_image is not None:
        body["OldImage"] = encode_item(old_image)
    record: dict[str, Any] = {
        "eventID": event_id or f"evt-{sequence_number}",
        "eventName": event_name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": body,
    }
    if ttl:
        record["userIdentity"] = {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}
    return record


def make_batch(records: Sequence[Mapping[str, Any]], *, table: str = "demo-table",
               stream_arn: str = "arn:aws:dynamodb:us-east-1:000000000000:table/demo-table/stream/2026-01-01T00:00:00.000",
               shard_id: str = "shardId-00000000000000000000-00000000") -> Batch:
    """Decode ``records`` into one :class:`Batch` of one shard."""
    events = tuple(decode_record(r, table=table, stream_arn=stream_arn, shard_id=shard_id) for r in records)
    return Batch(table=table, stream_arn=stream_arn, shard_id=shard_id, events=events,
                 checkpoint_sequence_number=events[-1].sequence_number if events else None)


def sample_batch() -> Batch:
    """Three changes of one item: INSERT, MODIFY, REMOVE."""
    from decimal import Decimal

    k = {"pk": "user#1"}
    v1 = {"pk": "user#1", "name": "Ada", "n": Decimal("1")}
    v2 = {"pk": "user#1", "name": "Ada L.", "n": Decimal("2")}
    return make_batch([
        make_stream_record(event_name="INSERT", keys=k, new_image=v1, sequence_number="100000000000000000001"),
        make_stream_record(event_name="MODIFY", keys=k, old_image=v1, new_image=v2, sequence_number="100000000000000000002"),
        make_stream_record(event_name="REMOVE", keys=k, old_image=v2, sequence_number="100000000000000000003"),
    ])


def check_sink_contract(factory: Callable[[], Sink], *, batch: Batch | None = None,
                        context: SinkContext | None = None) -> Sink:
    """Open, write, flush, re-write the same batch (idempotence), flush, close. Returns the sink.

    Raises whatever the sink raises; the caller then asserts the destination's end state.
    """
    import structlog

    batch = batch or sample_batch()
    sink = factory()
    sink.open(context or SinkContext(sink_name=sink.name, worker_id="contract-test", logger=structlog.get_logger()))
    try:
        sink.write(batch)
        sink.flush()
        sink.write(batch)
        sink.flush()
    finally:
        sink.close()
    return sink


def check_transform(spec: Mapping[str, Any], events: Sequence[ChangeEvent] | None = None) -> list[ChangeEvent | None]:
    """Build the transform ``spec`` (``{"type": "redact", "paths": [...], ...}``; plugins by their
    entry-point name) and apply it to ``events`` (default: :func:`sample_batch`'s INSERT / MODIFY /
    REMOVE plus a TTL delete). Returns one output per event (None: the transform dropped it).

    Raises :class:`pipeline.errors.ConfigError` for a bad spec, AssertionError when the transform
    changed keys, ``key_id``, a key attribute or the position, or gave different output for the
    same input twice.
    """
    from pipeline.shaping.sink import _key_change
    from pipeline.shaping.transforms import build_transform

    transform = build_transform(spec)
    if events is None:
        from decimal import Decimal

        ttl = make_batch([make_stream_record(event_name="REMOVE", keys={"pk": "user#2"}, ttl=True,
                                             old_image={"pk": "user#2", "name": "Bob", "n": Decimal("3")},
                                             sequence_number="100000000000000000004")])
        events = list(sample_batch().events) + list(ttl.events)
    outputs: list[ChangeEvent | None] = []
    for event in events:
        first = transform.apply(event)
        again = transform.apply(event)
        assert first == again, f"{spec.get('type')}: different output for the same input ({first!r} vs {again!r})"
        if first is not None:
            problem = _key_change(event, first)
            assert problem is None, f"{spec.get('type')}: {problem}; keys are never changed by a transform"
        outputs.append(first)
    return outputs
