"""Snapshot items as change events: operation SNAPSHOT (Debezium ``r``), ``before`` None,
``after`` the item, and the positions that place them apart from stream records.

Positions. A snapshot event's ``source.shard_id`` is ``snapshot-{snapshot_id}-seg{NNNNN}`` (the
segment, five digits) and its ``source.sequence_number`` the item's 1-based ordinal in its
segment as 20 decimal digits, so sinks that keep per-shard order (the S3 audit log, the
dead-letter ids) see each segment as one shard with rising sequence numbers, and a resumed
segment continues the count. ``source.stream_arn`` is ``snapshot:{snapshot_id}``;
``approximate_creation_time`` is when the page holding the item was read (for an export: the
export time); ``stream_view_type`` is ``SNAPSHOT``.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any, Mapping, Sequence

from pipeline.codec import decode_item, key_id
from pipeline.errors import DecodeError
from pipeline.events import ChangeEvent, Operation, Source

#: ``source.stream_view_type`` of snapshot events.
SNAPSHOT_VIEW_TYPE = "SNAPSHOT"
_SHARD_RE = re.compile(r"^snapshot-(?P<id>[A-Za-z0-9._-]+?)-seg(?P<segment>[0-9]{5})$")


def snapshot_shard_id(snapshot_id: str, segment: int) -> str:
    """The pseudo shard id of one segment: ``snapshot-{snapshot_id}-seg{segment:05d}``."""
    return f"snapshot-{snapshot_id}-seg{segment:05d}"


def parse_snapshot_shard_id(shard_id: str) -> tuple[str, int] | None:
    """``(snapshot_id, segment)`` of a :func:`snapshot_shard_id`, or None for a stream shard id."""
    match = _SHARD_RE.match(shard_id)
    return (match["id"], int(match["segment"])) if match else None


def snapshot_stream_arn(snapshot_id: str) -> str:
    """``source.stream_arn`` of a snapshot's events: ``snapshot:{snapshot_id}``."""
    return f"snapshot:{snapshot_id}"


def ordinal_sequence_number(ordinal: int) -> str:
    """The sequence number of the ``ordinal``-th item (1-based) of a segment: 20 decimal digits."""
    return f"{ordinal:020d}"


def snapshot_event(item: Mapping[str, Any], *, key_names: Sequence[str], table: str, snapshot_id: str,
                   segment: int, ordinal: int, read_at: datetime | None, version: int,
                   size_bytes: int = 0) -> ChangeEvent:
    """One scanned item (AttributeValue map, boto3 or JSON shape) as a SNAPSHOT ChangeEvent.

    ``key_names``: the table's key attribute names (from DescribeTable's KeySchema, or the
    export's first item). Raises DecodeError for an item that cannot be decoded or lacks a key.
    """
    after = decode_item(item)
    if not after:
        raise DecodeError("snapshot item is empty")
    missing = [name for name in key_names if name not in after]
    if missing:
        raise DecodeError(f"snapshot item lacks key attribute(s) {', '.join(missing)}")
    keys = {name: after[name] for name in key_names}
    shard_id = snapshot_shard_id(snapshot_id, segment)
    sequence_number = ordinal_sequence_number(ordinal)
    source = Source(table=table, stream_arn=snapshot_stream_arn(snapshot_id), shard_id=shard_id,
                    sequence_number=sequence_number, event_id=f"{shard_id}:{ordinal}",
                    approximate_creation_time=read_at, stream_view_type=SNAPSHOT_VIEW_TYPE,
                    size_bytes=size_bytes)
    return ChangeEvent(operation=Operation.SNAPSHOT, keys=keys, key_id=key_id(keys), before=None, after=after,
                       source=source, version=version)


def key_to_json(key: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A Scan ``LastEvaluatedKey`` (AttributeValue map of S / N / B; B as bytes from boto3) as
    JSON-safe text for a checkpoint: B becomes ``{"B64": base64}``. Raises DecodeError for
    another type (keys are S, N or B — DynamoDB developer guide, "Core components")."""
    if key is None:
        return None
    out: dict[str, Any] = {}
    for name, value in key.items():
        (kind, raw), = value.items()
        if kind == "B":
            out[name] = {"B64": base64.b64encode(raw if isinstance(raw, (bytes, bytearray))
                                                 else base64.b64decode(raw)).decode("ascii")}
        elif kind in ("S", "N"):
            out[name] = {kind: raw}
        else:
            raise DecodeError(f"LastEvaluatedKey attribute {name!r} has type {kind}, not S, N or B")
    return out


def key_from_json(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Inverse of :func:`key_to_json`: an ``ExclusiveStartKey`` for boto3 (B as bytes)."""
    if data is None:
        return None
    out: dict[str, Any] = {}
    for name, value in data.items():
        (kind, raw), = value.items()
        out[name] = {"B": base64.b64decode(raw)} if kind == "B64" else {kind: raw}
    return out
