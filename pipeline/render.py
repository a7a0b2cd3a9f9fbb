"""JSON rendering of decoded values and change events, with orjson, never through float.

Two renderings, each a documented choice:

**Plain** (documents, e.g. OpenSearch ``_source``), :func:`plain_json_bytes`:

- numbers: an integer in the signed 64-bit range → JSON integer; a non-integer whose shortest
  float64 text equals it exactly (``1.5``, ``0.1``, ``1E+125``) → JSON number with the exact
  decimal text; anything else (integers beyond 64 bits, 17+ significant digits) → a JSON *string*
  holding the exact decimal text, because OpenSearch would reject or round it as a number;
- bytes → base64 text; string / number / binary sets → JSON arrays sorted by value;
- None → null, maps and lists as themselves.

**Typed** (the audit log, lossless and reversible), :func:`event_to_record_dict`: keys and images
as DynamoDB AttributeValue JSON (``{"S": ...}``, ``{"N": "..."}``, ``{"B": base64}``), which
:func:`pipeline.codec.decode_item` turns back into the same values.
"""

from __future__ import annotations

import base64
from datetime import datetime
from decimal import Decimal
from typing import Any, Mapping

import orjson

from pipeline.codec import decode_item
from pipeline.errors import DecodeError
from pipeline.events import ChangeEvent, Operation, Source

__all__ = [  # the public plugin API: tests/test_layout.py holds the list
    "plain_number",
    "plain_json_bytes",
    "to_plain",
    "event_to_record_dict",
    "event_to_json_line",
    "event_from_record_dict",
]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def plain_number(value: Decimal) -> Any:
    """The plain rendering of one number: ``int``, an exact JSON number fragment, or a string."""
    kind, text = _classify(value)
    if kind == "int":
        return int(text)
    if kind == "number":
        return orjson.Fragment(text.encode("ascii"))
    return text


def _classify(value: Decimal) -> tuple[str, str]:
    """("int" | "number" | "string", exact decimal text) for one number."""
    if value == value.to_integral_value():
        as_int = int(value)
        if _INT64_MIN <= as_int <= _INT64_MAX:
            return "int", str(as_int)
    text = str(value)
    try:
        exact = Decimal(repr(float(value))) == value
    except (OverflowError, ValueError):
        exact = False
    return ("number" if exact else "string"), text


def _plain_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return plain_number(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot render {type(value).__name__} as JSON")


def plain_json_bytes(value: Any) -> bytes:
    """Render a decoded value (item, map, list, scalar) as plain JSON bytes (see module doc)."""
    return orjson.dumps(value, default=_plain_default)


def to_plain(value: Any) -> Any:
    """The plain rendering as Python JSON values (numbers kept exact as int / Decimal / str).

    Used where a library wants Python objects rather than bytes; Decimal values that render as
    JSON numbers come back as Decimal.
    """
    return _to_plain(value)


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [_to_plain(v) for v in sorted(value)]
    if isinstance(value, Decimal):
        kind, text = _classify(value)
        return int(text) if kind == "int" else Decimal(text) if kind == "number" else text
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def event_to_record_dict(event: ChangeEvent) -> dict[str, Any]:
    """The full change event as a JSON-safe dict with typed (AttributeValue) keys and images.

    Shape::

        {"op": "u", "operation": "MODIFY", "key_id": "...", "version": 123,
         "keys": {...AttributeValue...}, "before": {...} | null, "after": {...} | null,
         "source": {"table", "stream_arn", "shard_id", "sequence_number", "event_id",
                    "approximate_creation_time" (ISO 8601 UTC) | null, "stream_view_type",
                    "size_bytes", "ttl_delete"}}

    Keys and images are :meth:`ChangeEvent.typed_parts` — rendered from the wire form, byte for
    byte what ``encode_item(decode_item(...))`` gives, without decoding what is canonical already.
    The maps may share objects with the event's ``raw_*`` parts: treat the result as read-only.
    Raises DecodeError when a part cannot be decoded.
    """
    return _record_dict(event, *event.typed_parts())


def _record_dict(event: ChangeEvent, keys: Any, before: Any, after: Any) -> dict[str, Any]:
    src = event.source
    created = src.approximate_creation_time
    return {
        "op": event.op,
        "operation": event.operation.value,
        "key_id": event.key_id,
        "version": event.version,
        "keys": keys,
        "before": before,
        "after": after,
        "source": {
            "table": src.table,
            "stream_arn": src.stream_arn,
            "shard_id": src.shard_id,
            "sequence_number": src.sequence_number,
            "event_id": src.event_id,
            "approximate_creation_time": created.isoformat() if created else None,
            "stream_view_type": src.stream_view_type,
            "size_bytes": src.size_bytes,
            "ttl_delete": src.ttl_delete,
        },
    }


_Fragment = orjson.Fragment


def event_to_json_line(event: ChangeEvent) -> bytes:
    """:func:`event_to_record_dict` as one JSON line (bytes, ending in ``\\n``).

    Written from :meth:`ChangeEvent.typed_json_parts` (each part's JSON bytes, inserted as they
    are): byte for byte ``orjson.dumps(event_to_record_dict(event))`` + newline."""
    keys, before, after = event.typed_json_parts()
    return orjson.dumps(_record_dict(event, _Fragment(keys), before and _Fragment(before),
                                     after and _Fragment(after)), option=orjson.OPT_APPEND_NEWLINE)


def event_from_record_dict(data: Mapping[str, Any]) -> ChangeEvent:
    """Rebuild a :class:`ChangeEvent` from :func:`event_to_record_dict`'s output (e.g. an audit line).

    Raises DecodeError for a malformed line.
    """
    try:
        s = data["source"]
        created = s.get("approximate_creation_time")
        source = Source(
            table=s["table"],
            stream_arn=s["stream_arn"],
            shard_id=s["shard_id"],
            sequence_number=s["sequence_number"],
            event_id=s.get("event_id", ""),
            approximate_creation_time=datetime.fromisoformat(created) if created else None,
            stream_view_type=s.get("stream_view_type", ""),
            size_bytes=int(s.get("size_bytes", 0)),
            ttl_delete=bool(s.get("ttl_delete", False)),
        )
        return ChangeEvent(
            operation=Operation(data["operation"]),
            keys=decode_item(data["keys"]) or {},
            key_id=data["key_id"],
            before=decode_item(data.get("before")),
            after=decode_item(data.get("after")),
            source=source,
            version=int(data["version"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"not a change event record: {type(exc).__name__}: {exc}") from None
