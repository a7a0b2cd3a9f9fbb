"""DynamoDB AttributeValue JSON → Python values; stream record → :class:`ChangeEvent`.

Decoding is lossless:

- ``N`` → :class:`decimal.Decimal` in DynamoDB's number context (38 significant digits,
  exponent range −130..+125 — DynamoDB developer guide, "Data types"; the same context as
  ``boto3.dynamodb.types.DYNAMODB_CONTEXT``), so integers stay exact;
- ``S`` → str; ``B`` → bytes whether the input is raw bytes (boto3) or base64 text (Lambda /
  DynamoDB JSON); ``SS``/``NS``/``BS`` → frozenset-compatible ``set``; ``L`` → list; ``M`` → dict;
  ``NULL`` → None; ``BOOL`` → bool.

Everything here is pure Python with no AWS dependency, so the same code decodes boto3 output,
Lambda events and our own S3 audit lines.
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import datetime, timezone
from decimal import Clamped, Context, Decimal, Inexact, InvalidOperation, Overflow, Underflow
from typing import Any, Mapping, Sequence

from pipeline.errors import DecodeError
from pipeline.events import ChangeEvent, Operation, Source, _plain

#: DynamoDB's number context: 38 digits of precision, exponents −128..+126 as boto3 uses it
#: (boto3/dynamodb/types.py ``DYNAMODB_CONTEXT``); any *inexact* rounding is an error, never
#: silent. Unlike boto3 we do not trap ``Rounded``: DynamoDB returns e.g. 1E+125 as 126 digits of
#: text ("1000…0"), and dropping trailing zeros beyond 38 digits loses nothing (``Inexact`` still
#: catches real precision loss), so such valid items decode instead of being rejected.
DYNAMODB_CONTEXT = Context(
    Emin=-128,
    Emax=126,
    prec=38,
    traps=[Clamped, Overflow, Inexact, Underflow],
)

#: Maps and lists nest at most 32 levels deep (DynamoDB developer guide, "Service, account, and
#: table quotas": "DynamoDB supports nested attributes up to 32 levels deep"), counted below a
#: top-level attribute's own value: a top-level M or L may hold 32 more levels of M and L.
MAX_NESTING_DEPTH = 32

_OPERATIONS = {"INSERT": Operation.INSERT, "MODIFY": Operation.MODIFY, "REMOVE": Operation.REMOVE}

#: Seconds from the Unix epoch to 2012-01-01T00:00:00Z (DynamoDB's launch year); the base of
#: :func:`record_version`'s time part, which then fits 31 bits until the year 2080.
VERSION_EPOCH_S = 1_325_376_000
_LOW_MASK = (1 << 32) - 1
_TIME_MASK = (1 << 31) - 1


def decode_number(text: str) -> Decimal:
    """Decode an ``N`` value (a decimal string) into a Decimal, exactly.

    Raises DecodeError if the text is not a number DynamoDB could have stored.
    """
    if not isinstance(text, str):
        raise DecodeError(f"N value must be a string, got {type(text).__name__}")
    try:
        value = DYNAMODB_CONTEXT.create_decimal(text)
    except (InvalidOperation, ArithmeticError) as exc:
        raise DecodeError(f"N value {text[:60]!r} is not a DynamoDB number ({type(exc).__name__})") from None
    if not value.is_finite():
        raise DecodeError(f"N value {text[:60]!r} is not a DynamoDB number (not finite)")
    return value


def decode_binary(value: Any) -> bytes:
    """Decode a ``B`` value: raw bytes (boto3) pass through, base64 text (JSON) is decoded.

    Raises DecodeError for text that is not valid base64 or for any other type.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError(f"B value {value[:40]!r} is not valid base64") from None
    raise DecodeError(f"B value must be bytes or base64 text, got {type(value).__name__}")


_create_decimal = DYNAMODB_CONTEXT.create_decimal
_b64decode = base64.b64decode


def decode_value(av: Mapping[str, Any], _depth: int = 0) -> Any:
    """Decode one AttributeValue (``{"S": "x"}``, ``{"M": {...}}``, …) into a Python value.

    Raises DecodeError when the value is not exactly one known type tag with a value of the
    right shape, or when maps and lists nest deeper than :data:`MAX_NESTING_DEPTH` (``_depth``
    is the nesting level of ``av``; callers leave it at 0).

    Speed: the common shapes (a plain one-key dict whose value has the expected Python type) are
    decoded by exact type checks (``type(x) is str``), which cost a fraction of ``isinstance``
    against ``typing.Mapping``; anything else — other Mapping types, wrong shapes, errors — goes
    through the general path with every check and the same results.
    """
    if type(av) is dict and len(av) == 1:
        for tag, value in av.items():
            pass
        kind = type(value)
        if tag == "S":
            if kind is str:
                return value
        elif tag == "N":
            if kind is str:
                try:
                    number = _create_decimal(value)
                except ArithmeticError:
                    return decode_number(value)  # raises the DecodeError
                if number.is_finite():
                    return number
        elif tag == "M":
            if kind is dict:
                if _depth > MAX_NESTING_DEPTH:
                    _too_deep()
                return _decode_attributes(value, _depth + 1)
        elif tag == "L":
            if kind is list:
                if _depth > MAX_NESTING_DEPTH:
                    _too_deep()
                return [decode_value(v, _depth + 1) for v in value]
        elif tag == "BOOL":
            if kind is bool:
                return value
        elif tag == "NULL":
            return None
        elif tag == "SS":
            if kind is list and all(type(v) is str for v in value):
                return set(value)
        elif tag == "NS":
            if kind is list:
                return {decode_number(v) for v in value}
        elif tag == "B":
            if kind is str:
                try:
                    return _b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    pass  # the general path raises the DecodeError
            elif kind is bytes:
                return value
        elif tag == "BS":
            if kind is list:
                return {decode_binary(v) for v in value}
    return _decode_value_checked(av, _depth)


def _too_deep() -> None:
    raise DecodeError(f"maps and lists nest deeper than {MAX_NESTING_DEPTH} levels (DynamoDB's limit)")


def _decode_value_checked(av: Mapping[str, Any], _depth: int = 0) -> Any:
    """The general (slower) decoder: every shape check, any Mapping; see :func:`decode_value`."""
    if isinstance(av, Mapping) and not av:
        # DynamoDB Local's stream renders an empty map attribute as {} (GetItem gives {"M": {}});
        # an empty map is the only value rendered that way, so read it as one
        return {}
    if not isinstance(av, Mapping) or len(av) != 1:
        raise DecodeError(f"AttributeValue must be an object with one type tag, got {_preview(av)}")
    ((tag, value),) = av.items()
    if tag == "S":
        if not isinstance(value, str):
            raise DecodeError(f"S value must be a string, got {type(value).__name__}")
        return value
    if tag == "N":
        return decode_number(value)
    if tag == "B":
        return decode_binary(value)
    if tag == "BOOL":
        if not isinstance(value, bool):
            raise DecodeError(f"BOOL value must be true/false, got {_preview(value)}")
        return value
    if tag == "NULL":
        return None
    if tag == "M":
        if not isinstance(value, Mapping):
            raise DecodeError(f"M value must be an object, got {type(value).__name__}")
        if _depth > MAX_NESTING_DEPTH:
            _too_deep()
        return {_name(k): decode_value(v, _depth + 1) for k, v in value.items()}
    if tag == "L":
        if not isinstance(value, list):
            raise DecodeError(f"L value must be a list, got {type(value).__name__}")
        if _depth > MAX_NESTING_DEPTH:
            _too_deep()
        return [decode_value(v, _depth + 1) for v in value]
    if tag in ("SS", "NS", "BS"):
        if not isinstance(value, list):
            raise DecodeError(f"{tag} value must be a list, got {type(value).__name__}")
        if tag == "SS":
            if not all(isinstance(v, str) for v in value):
                raise DecodeError("SS members must be strings")
            return set(value)
        if tag == "NS":
            return {decode_number(v) for v in value}
        return {decode_binary(v) for v in value}
    raise DecodeError(f"unknown AttributeValue type tag {tag!r}")


def decode_item(image: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Decode an item / image (``{"name": AttributeValue, ...}``); None stays None."""
    if image is None:
        return None
    if type(image) is dict:
        return _decode_attributes(image)
    if not isinstance(image, Mapping):
        raise DecodeError(f"image must be an object of attributes, got {type(image).__name__}")
    return {_name(k): decode_value(v) for k, v in image.items()}


def _decode_attributes(attributes: dict, _depth: int = 0) -> dict[str, Any]:
    """A plain dict of name → AttributeValue, decoded. S and N values (most of a typical item) are
    decoded inline, without a call per attribute; everything else by :func:`decode_value`."""
    out: dict[str, Any] = {}
    for name, av in attributes.items():
        if type(name) is not str:
            _name(name)  # raises
        if type(av) is dict and len(av) == 1:
            value = av.get("S")
            if type(value) is str:
                out[name] = value
                continue
            value = av.get("N")
            if type(value) is str:
                try:
                    number = _create_decimal(value)
                except ArithmeticError:
                    number = None
                if number is not None and number.is_finite():
                    out[name] = number
                    continue
        out[name] = decode_value(av, _depth)
    return out


def encode_value(value: Any) -> dict[str, Any]:
    """Encode a Python value back into AttributeValue JSON, B as base64 text (JSON-safe).

    The inverse of :func:`decode_value` for everything it produces. Raises DecodeError for types
    DynamoDB cannot hold.
    """
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, Decimal):
        return {"N": _number_text(value)}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"B": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {"M": {k: encode_value(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"L": [encode_value(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        members = list(value)
        if all(isinstance(v, str) for v in members):
            return {"SS": sorted(members)}
        if all(isinstance(v, (Decimal, int)) and not isinstance(v, bool) for v in members):
            return {"NS": [_number_text(Decimal(v)) for v in sorted(members)]}
        if all(isinstance(v, (bytes, bytearray)) for v in members):
            return {"BS": [base64.b64encode(bytes(v)).decode("ascii") for v in sorted(members)]}
        raise DecodeError("a set must hold only strings, only numbers or only binary values")
    raise DecodeError(f"cannot encode {type(value).__name__} as a DynamoDB AttributeValue")


def encode_item(item: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Encode a decoded item back into AttributeValue JSON (see :func:`encode_value`)."""
    if item is None:
        return None
    return {k: encode_value(v) for k, v in item.items()}


def key_id(keys: Mapping[str, Any]) -> str:
    """A stable string id for an item, from its decoded key attributes.

    Attributes are taken in name order; each value is rendered as text (S as is, N in canonical
    decimal text, B as base64) and the parts are joined with ``|``, with ``\\`` and ``|``
    inside values escaped by a backslash so that different keys never give the same id.
    ``{"pk": "user#1"}`` → ``"user#1"``; ``{"pk": "a", "sk": Decimal("7")}`` → ``"a|7"``.

    Raises DecodeError for a key value that is not S, N or B.
    """
    if not keys:
        raise DecodeError("record has no key attributes")
    parts = []
    for name in sorted(keys):
        value = keys[name]
        if isinstance(value, str):
            text = value
        elif isinstance(value, Decimal):
            text = _number_text(value)
        elif isinstance(value, (bytes, bytearray)):
            text = base64.b64encode(bytes(value)).decode("ascii")
        else:
            raise DecodeError(f"key attribute {name!r} must be S, N or B, got {type(value).__name__}")
        parts.append(text.replace("\\", "\\\\").replace("|", "\\|"))
    return "|".join(parts)


#: Sequence numbers are at most 40 decimal digits (DynamoDB Streams API reference, StreamRecord
#: "SequenceNumber": length 21–40; Lambda's documented examples use shorter ones, which we accept).
MAX_SEQUENCE_DIGITS = 40
#: The low part of a version is taken from the last 20 digits: DynamoDB Streams sequence numbers
#: are a per-shard prefix followed by a 20-digit counter (DynamoDB Streams API reference, the
#: DescribeStream example: ``205|00000000000000910398``, its child ``8204|00000000000001192334``;
#: the GetRecords example: ``3|00000000000000499659``, ``4|00000000000000499660``, ...).
SEQUENCE_COUNTER_DIGITS = 20


def valid_sequence_number(sequence_number: Any) -> bool:
    """True for a sequence number as DynamoDB Streams gives it: ASCII decimal digits, 1–40 of them."""
    return (isinstance(sequence_number, str) and 0 < len(sequence_number) <= MAX_SEQUENCE_DIGITS
            and sequence_number.isascii() and sequence_number.isdigit())


def version_time_part(approximate_creation_time: datetime | None) -> int:
    """The version's time component of a record before any lineage floor: whole seconds since
    2012-01-01 of ApproximateCreationDateTime, plus one (see :func:`record_version`); 1 when the
    time is absent."""
    seconds = 0
    if approximate_creation_time is not None:
        seconds = max(0, int(approximate_creation_time.timestamp()) - VERSION_EPOCH_S)
    return min(seconds + 1, _TIME_MASK)


def version_high(version: int) -> int:
    """The high (time-and-lineage) part of a version made by :func:`record_version`."""
    return version >> 32


def record_version_high(approximate_creation_time: datetime | None, *, floor: int = 0) -> int:
    """The high part :func:`record_version` gives a record created at ``approximate_creation_time``
    (None: absent) in a shard whose version floor is ``floor``: ``max(version_time_part, floor)``.
    Also what a dead-lettered record's version will have when ``dlq redrive`` decodes it with
    the floor kept in its entry, so the shard counts it in its highest high part too."""
    high = version_time_part(approximate_creation_time)
    return min(floor, _TIME_MASK) if floor > high else high


def record_version(approximate_creation_time: datetime | None, sequence_number: str, *,
                   floor: int = 0) -> int:
    """A 63-bit version that increases for successive changes of one item, across shard splits.

    ``version = high << 32 | low`` with

    - ``high = max(seconds + 1, floor)``: ``seconds`` are whole seconds since 2012-01-01 of
      ApproximateCreationDateTime (rounded down to the second — DynamoDB Streams API reference,
      StreamRecord); ``floor`` is the shard's *version floor*, kept in its lease: 0 for a shard
      whose parents this lease table never read, else ``max(parent floor, highest high part the
      parent delivered) + 1``, fixed when the shard's first reader starts (after every parent
      reached SHARD_END) and never changed (:func:`child_version_floor`);
    - ``low = (last 20 digits of the sequence number) mod 2**32``: the shard's record counter
      (:data:`SEQUENCE_COUNTER_DIGITS`), not the per-shard prefix.

    Why it increases along a lineage. All changes of one item go through one chain of shards,
    parent before child (DynamoDB developer guide, "DynamoDB Streams": a child is read only after
    its parent). (1) Within a shard, ApproximateCreationDateTime does not decrease in record order
    and the counter rises, so (high, low) rises — unless two changes in one second straddle a
    multiple of 2**32 of the counter (one in ~4 billion; accepted and documented). (2) From a
    parent P to a child C: every high part in C is at least ``floor(C) > max high in P``, so every
    change in C outranks every change in P, even in the same second; by induction, every change
    in any descendant outranks every change of its ancestors. The old formula (no floor, low =
    whole sequence number mod 2**32) failed there: real sequence numbers carry per-shard prefixes,
    so mod 2**32 they do not rise from parent to child.

    Migration: the ``+ 1`` makes every new version greater than the version the previous formula
    (``seconds << 32 | seq mod 2**32``) gave the same change, and than every version it gave an
    earlier change, so an index written by an older ddb-cdc accepts the new versions and never
    mistakes a new change for an old one.

    The version depends only on the record and the shard's floor in the lease table, so restarts,
    hand-offs and replays through the same lease table give the same version. Its cost: one lease
    attribute per shard (``versionFloor``, ``versionHigh``) and one conditional write when a child
    shard's first reader starts.

    Raises DecodeError when the sequence number is not 1–40 ASCII decimal digits.
    """
    if not valid_sequence_number(sequence_number):
        raise DecodeError(f"SequenceNumber {_preview(sequence_number)} is not a decimal string of 1-40 digits")
    high = record_version_high(approximate_creation_time, floor=floor)
    return (high << 32) | (int(sequence_number[-SEQUENCE_COUNTER_DIGITS:]) & _LOW_MASK)


def child_version_floor(parents: "list[tuple[int | None, int | None]]") -> int:
    """The version floor of a shard whose parents are ``[(floor, highest high part delivered), ...]``
    (None where unknown): ``max(floor, high) + 1`` over the parents, 0 when nothing is known.
    See :func:`record_version`."""
    best = None
    for floor, high in parents:
        for value in (floor, high):
            if value is not None and (best is None or value > best):
                best = value
    return 0 if best is None else min(best + 1, _TIME_MASK)


#: The latest ApproximateCreationDateTime a version can hold (epoch seconds; the year 2080).
MAX_CREATION_EPOCH_S = VERSION_EPOCH_S + _TIME_MASK - 1


def parse_creation_time(value: Any) -> datetime | None:
    """ApproximateCreationDateTime as boto3 (datetime) or JSON (epoch seconds) gives it → UTC datetime.

    Raises DecodeError for anything else, and for epoch seconds that are not finite or lie
    outside 1970..2080 (``1e20``, ``inf``, ``NaN``, ``-1e12``: no stream record carries them).
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return _from_epoch(value)
    if isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value)
        except ValueError:
            try:
                return parse_creation_time(datetime.fromisoformat(value))
            except ValueError:
                pass
        else:
            return _from_epoch(number)
    raise DecodeError(f"ApproximateCreationDateTime {_preview(value)} is neither a datetime nor epoch seconds")


def record_creation_time(record: Any) -> datetime | None:
    """ApproximateCreationDateTime of a raw stream record (boto3: datetime; Lambda JSON: epoch
    seconds) as a UTC datetime, or None when absent or not a valid time — never raises (the
    decoder then dead-letters such a record; readers that only need the time skip it)."""
    body = record.get("dynamodb") if isinstance(record, dict) else None
    if not isinstance(body, dict):
        return None
    try:
        return parse_creation_time(body.get("ApproximateCreationDateTime"))
    except DecodeError:
        return None


def record_creation_epoch(record: Any) -> float | None:
    """:func:`record_creation_time` as finite epoch seconds (float), None when absent or unreadable."""
    try:
        created = record_creation_time(record)
        value = created.timestamp() if created is not None else None
    except (ValueError, OverflowError, OSError, TypeError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _from_epoch(value: Any) -> datetime:
    try:
        seconds = float(value)
    except (ValueError, OverflowError, ArithmeticError):
        seconds = float("nan")
    if not (0 <= seconds <= MAX_CREATION_EPOCH_S):  # also False for NaN
        raise DecodeError(f"ApproximateCreationDateTime {_preview(value)} is not epoch seconds between "
                          f"1970 and 2080")
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def is_ttl_delete(record: Mapping[str, Any]) -> bool:
    """True when the record is a REMOVE done by DynamoDB's TTL process.

    TTL deletes carry ``userIdentity = {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}``
    (DynamoDB developer guide, "DynamoDB Streams and Time to Live").
    """
    identity = record.get("userIdentity")
    if not isinstance(identity, Mapping):
        return False
    return identity.get("Type") == "Service" and identity.get("PrincipalId") == "dynamodb.amazonaws.com"


def decode_record(record: Mapping[str, Any], *, table: str, stream_arn: str, shard_id: str,
                  version_floor: int = 0, eager: bool = False) -> ChangeEvent:
    """Read one stream record (boto3 shape or Lambda JSON shape) into a :class:`ChangeEvent`.

    ``record`` is one element of GetRecords' ``Records``: ``eventID``, ``eventName``
    (INSERT/MODIFY/REMOVE) and ``dynamodb`` (Keys, NewImage, OldImage, SequenceNumber,
    SizeBytes, StreamViewType, ApproximateCreationDateTime). Works for all four view types:
    images the view type leaves out are None.

    ``version_floor`` is the shard's version floor from its lease (see :func:`record_version`).

    What is checked *here*, at read time (issue 16): eventName, the ``dynamodb`` object, the
    sequence number, ApproximateCreationDateTime, SizeBytes, StreamViewType, the Keys (decoded:
    ``key_id`` needs them) and that NewImage / OldImage are objects or absent. The images are
    kept as the parsed AttributeValue maps and decoded on first access of ``event.before`` /
    ``event.after`` (``eager=True`` decodes them here, raising as the eager decoder always did).
    A malformed image therefore surfaces as a DecodeError when a sink first reads it, and the
    fan-out dead-letters the event's raw record (:mod:`pipeline.runtime.fanout`).

    Raises DecodeError (with what is wrong) for a record that cannot be read — the caller
    dead-letters the raw record and goes on.
    """
    if type(record) is not dict and not isinstance(record, Mapping):
        raise DecodeError(f"stream record must be an object, got {type(record).__name__}")
    name = record.get("eventName")
    operation = _OPERATIONS.get(name) if isinstance(name, str) else None
    if operation is None:
        raise DecodeError(f"eventName {_preview(name)} is not INSERT, MODIFY or REMOVE")
    body = record.get("dynamodb")
    if type(body) is not dict and not isinstance(body, Mapping):
        raise DecodeError("record has no 'dynamodb' object")
    sequence_number = body.get("SequenceNumber")
    created = parse_creation_time(body.get("ApproximateCreationDateTime"))
    version = record_version(created, sequence_number, floor=version_floor)  # validates the sequence number
    raw_keys = _plain(body.get("Keys"))  # a WireImage (read by msgspec) as its dict: keys are decoded now
    keys = decode_item(raw_keys)
    if not keys:
        raise DecodeError("record has no Keys")
    raw_old = body.get("OldImage")
    raw_new = body.get("NewImage")
    for part, image in (("OldImage", raw_old), ("NewImage", raw_new)):
        if image is not None and type(image) is not dict and not isinstance(image, Mapping):
            raise DecodeError(f"{part} must be an object of attributes, got {type(image).__name__}")
    size = body.get("SizeBytes", 0)
    if not isinstance(size, int) or isinstance(size, bool):
        raise DecodeError(f"SizeBytes {_preview(size)} is not an integer")
    view_type = body.get("StreamViewType", "")
    if not isinstance(view_type, str):
        raise DecodeError(f"StreamViewType {_preview(view_type)} is not a string")
    event_id = record.get("eventID", "")
    source = Source(
        table=table,
        stream_arn=stream_arn,
        shard_id=shard_id,
        sequence_number=sequence_number,
        event_id=event_id if isinstance(event_id, str) else str(event_id),
        approximate_creation_time=created,
        stream_view_type=view_type,
        size_bytes=size,
        ttl_delete=operation is Operation.REMOVE and is_ttl_delete(record),
    )
    event = ChangeEvent.from_raw(operation, raw_keys=raw_keys, raw_new_image=raw_new, raw_old_image=raw_old,
                                 source=source, version=version, keys=keys, key_id=key_id(keys))
    if eager:
        error = event.decode_error()
        if error is not None:
            raise error
    return event


def event_from_item(item: Mapping[str, Any], key_names: "Sequence[str]", *, source: Source, version: int,
                    operation: Operation = Operation.SNAPSHOT) -> ChangeEvent:
    """A lazy event for one item read by Scan (a snapshot): ``after`` is the item, ``before`` None.

    ``item`` is one element of Scan's ``Items`` (AttributeValue JSON — DynamoDB API reference,
    Scan); ``key_names`` the table's key attribute names (KeySchema: partition key, then sort
    key). The keys are taken from the item and decoded here; the rest of the item on first access
    of ``event.after``.

    Raises DecodeError when the item is not an object or lacks a key attribute.
    """
    if type(item) is not dict and not isinstance(item, Mapping):
        raise DecodeError(f"item must be an object of attributes, got {type(item).__name__}")
    missing = [name for name in key_names if name not in item]
    if missing or not key_names:
        raise DecodeError(f"item lacks key attribute(s) {missing or list(key_names)}")
    raw_keys = {name: item[name] for name in key_names}
    return ChangeEvent.from_raw(operation, raw_keys=raw_keys, raw_new_image=item, raw_old_image=None,
                                source=source, version=version)


def record_sequence_number(record: Any) -> str | None:
    """The SequenceNumber of a raw record if it is a valid one (:func:`valid_sequence_number`),
    else None (for dead-lettering and checkpoints: a hostile value never becomes a position)."""
    try:
        seq = record["dynamodb"]["SequenceNumber"]
    except (KeyError, TypeError, IndexError):
        return None
    return seq if valid_sequence_number(seq) else None


def _number_text(value: Decimal) -> str:
    return str(value)


def _name(name: Any) -> str:
    if not isinstance(name, str):
        raise DecodeError(f"attribute name must be a string, got {type(name).__name__}")
    return name


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
