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
from datetime import datetime, timezone
from decimal import Clamped, Context, Decimal, Inexact, InvalidOperation, Overflow, Underflow
from typing import Any, Mapping

from pipeline.errors import DecodeError
from pipeline.events import ChangeEvent, Operation, Source

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


def decode_value(av: Mapping[str, Any]) -> Any:
    """Decode one AttributeValue (``{"S": "x"}``, ``{"M": {...}}``, …) into a Python value.

    Raises DecodeError when the value is not exactly one known type tag with a value of the
    right shape.

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
                return _decode_attributes(value)
        elif tag == "L":
            if kind is list:
                return [decode_value(v) for v in value]
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
    return _decode_value_checked(av)


def _decode_value_checked(av: Mapping[str, Any]) -> Any:
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
        return {_name(k): decode_value(v) for k, v in value.items()}
    if tag == "L":
        if not isinstance(value, list):
            raise DecodeError(f"L value must be a list, got {type(value).__name__}")
        return [decode_value(v) for v in value]
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


def _decode_attributes(attributes: dict) -> dict[str, Any]:
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
        out[name] = decode_value(av)
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


def record_version(approximate_creation_time: datetime | None, sequence_number: str) -> int:
    """A 63-bit version that never decreases for successive changes of one item.

    ``version = (seconds since 2012-01-01 of ApproximateCreationDateTime) << 32
    | (sequence number mod 2**32)``.

    Why it is monotonic per item: all changes of one item go through one shard lineage in order;
    ApproximateCreationDateTime is taken when the change is written and is rounded down to the
    second (DynamoDB Streams API reference, StreamRecord), so it never decreases along that
    order, and the high bits order changes of different seconds. Within one second, sequence
    numbers in one shard strictly increase (DynamoDB Streams API reference, "SequenceNumber"),
    so the low 32 bits order them unless the sequence numbers of two changes of the same item in
    the same second straddle a multiple of 2**32 — a window of one in about four billion
    sequence numbers, which we accept and document. The version is computed from the record
    alone, so it is the same after restarts, lease handoffs and replays.

    Raises DecodeError when the sequence number is not a decimal string.
    """
    if not isinstance(sequence_number, str) or not sequence_number.isdigit():
        raise DecodeError(f"SequenceNumber {_preview(sequence_number)} is not a decimal string")
    seconds = 0
    if approximate_creation_time is not None:
        seconds = max(0, int(approximate_creation_time.timestamp()) - VERSION_EPOCH_S)
    return ((seconds & _TIME_MASK) << 32) | (int(sequence_number) & _LOW_MASK)


def parse_creation_time(value: Any) -> datetime | None:
    """ApproximateCreationDateTime as boto3 (datetime) or JSON (epoch seconds) gives it → UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    if isinstance(value, str):
        try:
            return datetime.fromtimestamp(float(value), tz=timezone.utc)
        except ValueError:
            try:
                return parse_creation_time(datetime.fromisoformat(value))
            except ValueError:
                pass
    raise DecodeError(f"ApproximateCreationDateTime {_preview(value)} is neither a datetime nor epoch seconds")


def is_ttl_delete(record: Mapping[str, Any]) -> bool:
    """True when the record is a REMOVE done by DynamoDB's TTL process.

    TTL deletes carry ``userIdentity = {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}``
    (DynamoDB developer guide, "DynamoDB Streams and Time to Live").
    """
    identity = record.get("userIdentity")
    if not isinstance(identity, Mapping):
        return False
    return identity.get("Type") == "Service" and identity.get("PrincipalId") == "dynamodb.amazonaws.com"


def decode_record(record: Mapping[str, Any], *, table: str, stream_arn: str, shard_id: str) -> ChangeEvent:
    """Decode one stream record (boto3 shape or Lambda JSON shape) into a :class:`ChangeEvent`.

    ``record`` is one element of GetRecords' ``Records``: ``eventID``, ``eventName``
    (INSERT/MODIFY/REMOVE) and ``dynamodb`` (Keys, NewImage, OldImage, SequenceNumber,
    SizeBytes, StreamViewType, ApproximateCreationDateTime). Works for all four view types:
    images the view type leaves out are None.

    Raises DecodeError (with what is wrong) for a record that cannot be decoded; the caller
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
    version = record_version(created, sequence_number)  # validates the sequence number
    keys = decode_item(body.get("Keys"))
    if not keys:
        raise DecodeError("record has no Keys")
    before = decode_item(body.get("OldImage"))
    after = decode_item(body.get("NewImage"))
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
    return ChangeEvent(
        operation=operation,
        keys=keys,
        key_id=key_id(keys),
        before=before,
        after=after,
        source=source,
        version=version,
    )


def record_sequence_number(record: Any) -> str | None:
    """The SequenceNumber of a raw record if it can be found, else None (for dead-lettering)."""
    try:
        seq = record["dynamodb"]["SequenceNumber"]
    except (KeyError, TypeError, IndexError):
        return None
    return seq if isinstance(seq, str) else None


def _number_text(value: Decimal) -> str:
    return str(value)


def _name(name: Any) -> str:
    if not isinstance(name, str):
        raise DecodeError(f"attribute name must be a string, got {type(name).__name__}")
    return name


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
