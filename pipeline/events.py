"""The change event: one per DynamoDB stream record, frozen and typed.

Shapes follow Debezium's envelope (``op`` c/u/d/r, ``before``/``after``, ``source``) with
DynamoDB's own names for the parts. See DESIGN.md, "The change event".
"""

from __future__ import annotations

import enum
import threading
from dataclasses import FrozenInstanceError, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

__all__ = [  # the public plugin API: tests/test_layout.py holds the list
    "Operation",
    "Position",
    "Source",
    "ChangeEvent",
    "Batch",
    "sequence_key",
    "TRIM_HORIZON",
    "LATEST",
    "SHARD_END",
    "SENTINELS",
]

# Sentinels a checkpoint may hold instead of a sequence number (KCL's names).
TRIM_HORIZON = "TRIM_HORIZON"
LATEST = "LATEST"
SHARD_END = "SHARD_END"
SENTINELS = frozenset({TRIM_HORIZON, LATEST, SHARD_END})


class Operation(str, enum.Enum):
    """What happened to the item. Stream events are INSERT/MODIFY/REMOVE; SNAPSHOT is a backfill read."""

    INSERT = "INSERT"
    MODIFY = "MODIFY"
    REMOVE = "REMOVE"
    SNAPSHOT = "SNAPSHOT"

    @property
    def op(self) -> str:
        """Debezium's one-letter code: c (create), u (update), d (delete), r (read)."""
        return _DEBEZIUM_OP[self]


_DEBEZIUM_OP = {
    Operation.INSERT: "c",
    Operation.MODIFY: "u",
    Operation.REMOVE: "d",
    Operation.SNAPSHOT: "r",
}


@dataclass(frozen=True, slots=True)
class Position:
    """Where a record sits: stream ARN, shard id and sequence number (string, 21–40 digits)."""

    stream_arn: str
    shard_id: str
    sequence_number: str


@dataclass(frozen=True, slots=True)
class Source:
    """Provenance of one change.

    ``approximate_creation_time`` is ApproximateCreationDateTime as a timezone-aware datetime
    (DynamoDB rounds it down to the second; DynamoDB Local to the minute). ``size_bytes`` is the
    record's SizeBytes. ``ttl_delete`` is True when the REMOVE was done by DynamoDB's TTL process
    (userIdentity type "Service", principalId "dynamodb.amazonaws.com" — DynamoDB developer guide,
    "TTL and DynamoDB Streams").
    """

    table: str
    stream_arn: str
    shard_id: str
    sequence_number: str
    event_id: str
    approximate_creation_time: datetime | None
    stream_view_type: str
    size_bytes: int
    ttl_delete: bool = False

    @property
    def position(self) -> Position:
        """This record's :class:`Position`."""
        return Position(self.stream_arn, self.shard_id, self.sequence_number)


class _Unset:
    """Sentinel of a lazy part not decoded yet (one instance, :data:`_UNSET`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not decoded>"

    def __reduce__(self) -> str:
        return "_UNSET"


_UNSET: Any = _Unset()


class _Failed:
    """A lazy part whose decode raised: the error, kept so that every access raises it again."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


#: Guards the store of a lazily decoded part, so every reader sees one decoded object: a part is
#: decoded once, by the first reader, under this lock (decoding is pure Python and holds the GIL
#: anyway, so one lock for all events costs no parallelism).
_DECODE_LOCK = threading.Lock()


@dataclass(frozen=True)
class _EventFields:
    """The public fields of :class:`ChangeEvent` (lent to it so that ``dataclasses.replace`` /
    ``fields`` / ``asdict`` keep working on events)."""

    operation: Operation
    keys: Mapping[str, Any]
    key_id: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    source: Source
    version: int


class ChangeEvent:
    """One item change; keys and images kept as they arrived, decoded losslessly on first access.

    - ``keys``: decoded key attributes (``{"pk": "a", "sk": Decimal("1")}``).
    - ``key_id``: stable string id of the item, built from the keys (see ``codec.key_id``).
    - ``before`` / ``after``: decoded OldImage / NewImage, None when the stream view type or the
      operation leaves them out.
    - ``version``: 63-bit integer that increases for successive changes of one item, across
      shard splits too, computed from the record and its shard's version floor (see
      ``codec.record_version``).
    - ``raw_keys`` / ``raw_new_image`` / ``raw_old_image``: the same parts in the wire form,
      DynamoDB AttributeValue JSON as parsed (``{"pk": {"S": "a"}}``; ``B`` as base64 text or
      bytes, as the source gave it), or None. Treat them as read-only: they are the objects the
      record was parsed into, shared with every sink. With ``source.read_path: typed`` the event
      holds :class:`pipeline.avwire.WireImage` objects instead, and these properties give their
      plain-dict form (the same JSON as parsed, built on first access).

    **Lazy decoding** (issue 16). An event read from a stream (:meth:`from_raw`, what
    :func:`pipeline.codec.decode_record` builds) keeps the AttributeValue maps and decodes
    ``before`` / ``after`` on first access, once: the result is cached on the event, and
    concurrent readers (sinks run on several threads) all get the same object. The key attributes,
    the sequence number and the rest of the record are decoded and checked when the record is
    read, so an event always has a valid ``key_id``, ``version`` and ``source``. An image that
    cannot be decoded (a malformed AttributeValue, nesting beyond 32 levels, a number DynamoDB
    cannot hold) raises :class:`~pipeline.errors.DecodeError` on *every* access of that image —
    the fan-out then dead-letters the raw record (a ``decode`` entry) instead of retrying the
    sink (see :mod:`pipeline.runtime.fanout`). :meth:`decode_error` forces every part and
    returns the first such error, or None.

    Constructed from decoded values (``ChangeEvent(operation, keys, key_id, before, after,
    source, version)``, the form plugins and tests use), the event is eager and its ``raw_*``
    parts are encoded from the values on first access (:func:`pipeline.codec.encode_item`).

    Events compare equal when their decoded parts are equal (lazy or eager alike; when an image
    cannot be decoded, when their wire forms are equal), are
    immutable (setting an attribute raises ``dataclasses.FrozenInstanceError``), unhashable, and
    pickle with their parts as they are (a lazy event stays lazy).
    """

    __slots__ = ("operation", "key_id", "source", "version", "_keys", "_before", "_after",
                 "_raw_keys", "_raw_new", "_raw_old", "_typed", "_typed_json")
    __dataclass_fields__ = _EventFields.__dataclass_fields__
    __dataclass_params__ = _EventFields.__dataclass_params__  # type: ignore[attr-defined]
    __match_args__ = ("operation", "keys", "key_id", "before", "after", "source", "version")
    __hash__ = None  # type: ignore[assignment]  # like the frozen dataclass it was: dict fields

    def __init__(self, operation: Operation, keys: Mapping[str, Any], key_id: str,
                 before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, source: Source,
                 version: int) -> None:
        s = object.__setattr__
        s(self, "operation", operation)
        s(self, "key_id", key_id)
        s(self, "source", source)
        s(self, "version", version)
        s(self, "_keys", keys)
        s(self, "_before", before)
        s(self, "_after", after)
        s(self, "_raw_keys", _UNSET)
        s(self, "_raw_new", _UNSET)
        s(self, "_raw_old", _UNSET)
        s(self, "_typed", None)
        s(self, "_typed_json", None)

    @classmethod
    def from_raw(cls, operation: Operation, *, raw_keys: Mapping[str, Any],
                 raw_new_image: Mapping[str, Any] | None, raw_old_image: Mapping[str, Any] | None,
                 source: Source, version: int, keys: Mapping[str, Any] | None = None,
                 key_id: str | None = None) -> "ChangeEvent":
        """A lazy event from AttributeValue maps (``{"name": {"S": "x"}, ...}``, or None).

        ``keys`` / ``key_id``: the decoded keys and their id when the caller has them; else they
        are decoded from ``raw_keys`` here. Images are not looked at until ``before`` / ``after``
        is read. Used by :func:`pipeline.codec.decode_record` (stream records) and
        :func:`pipeline.codec.event_from_item` (a Scan item of a snapshot: ``raw_new_image`` =
        the item, ``raw_old_image`` = None).

        Raises DecodeError when ``raw_keys`` is not a non-empty map of S / N / B values.
        """
        if keys is None or key_id is None:
            from pipeline.codec import decode_item, key_id as make_key_id

            keys = decode_item(raw_keys)
            if not keys:
                from pipeline.errors import DecodeError

                raise DecodeError("record has no Keys")
            key_id = make_key_id(keys)
        event = cls.__new__(cls)
        s = object.__setattr__
        s(event, "operation", operation)
        s(event, "key_id", key_id)
        s(event, "source", source)
        s(event, "version", version)
        s(event, "_keys", keys)
        s(event, "_before", _UNSET if raw_old_image is not None else None)
        s(event, "_after", _UNSET if raw_new_image is not None else None)
        s(event, "_raw_keys", raw_keys)
        s(event, "_raw_new", raw_new_image)
        s(event, "_raw_old", raw_old_image)
        s(event, "_typed", None)
        s(event, "_typed_json", None)
        return event

    # -- decoded parts (lazy) -----------------------------------------------------------------

    @property
    def keys(self) -> Mapping[str, Any]:
        """The decoded key attributes (decoded when the record was read)."""
        return self._keys

    @property
    def before(self) -> Mapping[str, Any] | None:
        """The decoded OldImage, or None. Raises DecodeError when it cannot be decoded."""
        value = self._before
        if value is _UNSET or type(value) is _Failed:
            return self._decoded("_before", "_raw_old")
        return value

    @property
    def after(self) -> Mapping[str, Any] | None:
        """The decoded NewImage, or None. Raises DecodeError when it cannot be decoded."""
        value = self._after
        if value is _UNSET or type(value) is _Failed:
            return self._decoded("_after", "_raw_new")
        return value

    def _decoded(self, slot: str, raw_slot: str) -> Any:
        value = getattr(self, slot)
        if value is _UNSET:
            with _DECODE_LOCK:
                value = getattr(self, slot)
                if value is _UNSET:
                    from pipeline.codec import decode_item

                    try:
                        value = decode_item(_plain(getattr(self, raw_slot)))
                    except Exception as exc:  # noqa: BLE001 — any failure is this image's decode error
                        from pipeline.errors import DecodeError

                        if not isinstance(exc, DecodeError):
                            exc = DecodeError(f"{type(exc).__name__}: {str(exc)[:200]}")
                        value = _Failed(exc)
                    object.__setattr__(self, slot, value)
        if type(value) is _Failed:
            raise type(value.error)(*value.error.args)
        return value

    def decode_error(self) -> Exception | None:
        """Decode every part not decoded yet; the first DecodeError (keys, old, new image), or None."""
        for name in ("before", "after"):
            try:
                getattr(self, name)
            except Exception as exc:  # noqa: BLE001 — DecodeError, as _decoded makes it
                return exc
        return None

    def attributes(self, part: str, names: "Iterable[str]") -> dict[str, Any] | None:
        """Only the attributes ``names`` of the ``"before"`` or ``"after"`` image, decoded
        (``{"email": "a@b"}``; names the image lacks are left out), or None when the image is
        absent. A lazy image is not decoded as a whole: only these attributes are, each time
        (use it for a few names, e.g. cache-key templates). Raises DecodeError for a named
        attribute that cannot be decoded (other attributes are not looked at).
        """
        if part == "before":
            value, raw = self._before, self._raw_old
        elif part == "after":
            value, raw = self._after, self._raw_new
        else:
            raise ValueError(f"part must be 'before' or 'after', got {part!r}")
        if value is None:
            return None
        if value is not _UNSET:
            if type(value) is _Failed:
                raise type(value.error)(*value.error.args)
            return {name: value[name] for name in names if name in value}
        from pipeline.codec import decode_value

        attribute = getattr(raw, "attribute", raw.__getitem__)  # a WireImage converts only these
        return {name: decode_value(attribute(name)) for name in names if name in raw}

    @property
    def is_lazy(self) -> bool:
        """True while an image is still in its wire form only (not decoded yet)."""
        return self._before is _UNSET or self._after is _UNSET

    # -- wire form ----------------------------------------------------------------------------

    @property
    def raw_keys(self) -> Mapping[str, Any]:
        """The key attributes as AttributeValue JSON (as read, or encoded from ``keys``)."""
        value = self._raw_keys
        return self._encoded("_raw_keys", "_keys") if value is _UNSET else _plain(value)

    @property
    def raw_new_image(self) -> Mapping[str, Any] | None:
        """NewImage as AttributeValue JSON (as read, or encoded from ``after``), or None."""
        value = self._raw_new
        return self._encoded("_raw_new", "_after") if value is _UNSET else _plain(value)

    @property
    def raw_old_image(self) -> Mapping[str, Any] | None:
        """OldImage as AttributeValue JSON (as read, or encoded from ``before``), or None."""
        value = self._raw_old
        return self._encoded("_raw_old", "_before") if value is _UNSET else _plain(value)

    def _encoded(self, slot: str, decoded_slot: str) -> Any:
        from pipeline.codec import encode_item

        with _DECODE_LOCK:
            value = getattr(self, slot)
            if value is _UNSET:
                value = encode_item(getattr(self, decoded_slot))
                object.__setattr__(self, slot, value)
        return value

    def typed_parts(self) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
        """(keys, before, after) as *canonical* AttributeValue JSON, cached: exactly
        ``encode_item(decode_item(raw))`` of each part (the form the S3 audit line and the typed
        OpenSearch document write), computed from the wire form without building Python values
        where the wire form is canonical already (:func:`pipeline.avjson.canonical_item`).

        The returned maps may share objects with ``raw_*``: read-only. Raises DecodeError (every
        call) when a part cannot be decoded.
        """
        typed = self._typed
        if typed is None:
            from pipeline.avjson import canonical_item
            from pipeline.codec import encode_item

            try:
                if self._raw_keys is _UNSET:  # an eager event: encode its decoded values
                    typed = (encode_item(self._keys), encode_item(self.before), encode_item(self.after))
                else:
                    typed = (canonical_item(_plain(self._raw_keys)), canonical_item(_plain(self._raw_old)),
                             canonical_item(_plain(self._raw_new)))
            except Exception as exc:  # noqa: BLE001
                from pipeline.errors import DecodeError

                typed = _Failed(exc if isinstance(exc, DecodeError)
                                else DecodeError(f"{type(exc).__name__}: {str(exc)[:200]}"))
            object.__setattr__(self, "_typed", typed)  # a race computes equal values: either one is fine
        if type(typed) is _Failed:
            raise type(typed.error)(*typed.error.args)
        return typed

    def typed_json_parts(self) -> tuple[bytes, bytes | None, bytes | None]:
        """:meth:`typed_parts` as JSON bytes, cached: ``orjson.dumps`` of each part (None stays
        None), byte for byte. A part read by msgspec (:class:`pipeline.avwire.WireImage`) is
        written from its structs without building dicts
        (:meth:`~pipeline.avwire.WireImage.canonical_json`); the others as in :meth:`typed_parts`.

        Raises DecodeError (every call) when a part cannot be decoded.
        """
        typed = self._typed_json
        if typed is None:
            typed = (self._typed_json_part(0, self._raw_keys), self._typed_json_part(1, self._raw_old),
                     self._typed_json_part(2, self._raw_new))
            object.__setattr__(self, "_typed_json", typed)  # a race computes equal values
        return typed

    def _typed_json_part(self, index: int, raw: Any) -> bytes | None:
        import orjson

        if raw is None:
            return None
        canonical_json = getattr(raw, "canonical_json", None)
        if canonical_json is not None:  # a WireImage
            data = canonical_json()
            if data is not None:
                return data
        elif type(raw) is dict and self._typed is None:  # one part alone (the others may be WireImages)
            from pipeline.avjson import canonical_item
            from pipeline.errors import DecodeError

            try:
                return orjson.dumps(canonical_item(raw))
            except DecodeError:
                pass  # typed_parts raises it, and keeps it for every later call
        part = self.typed_parts()[index]
        return None if part is None else orjson.dumps(part)

    # -- the rest of the API ------------------------------------------------------------------

    @property
    def op(self) -> str:
        """Debezium ``op`` code (c/u/d/r)."""
        return self.operation.op

    @property
    def sequence_number(self) -> str:
        """The stream record's sequence number."""
        return self.source.sequence_number

    @property
    def image(self) -> Mapping[str, Any] | None:
        """The item as it is after this change: ``after``, or None for a REMOVE."""
        return None if self.operation is Operation.REMOVE else self.after

    def raw_record(self) -> dict[str, Any]:
        """A stream record (GetRecords ``Records`` element shape) holding this event's wire form:
        eventID, eventName, dynamodb.{Keys, NewImage, OldImage, SequenceNumber, SizeBytes,
        StreamViewType, ApproximateCreationDateTime (epoch seconds)}, and the TTL userIdentity
        for a TTL delete — what a ``decode`` dead-letter entry stores, and what
        :func:`pipeline.codec.decode_record` reads back into an equal event (the same version
        with the same version floor)."""
        src = self.source
        body: dict[str, Any] = {"Keys": self.raw_keys, "SequenceNumber": src.sequence_number,
                                "SizeBytes": src.size_bytes, "StreamViewType": src.stream_view_type}
        if src.approximate_creation_time is not None:
            body["ApproximateCreationDateTime"] = src.approximate_creation_time.timestamp()
        new, old = self.raw_new_image, self.raw_old_image
        if new is not None:
            body["NewImage"] = new
        if old is not None:
            body["OldImage"] = old
        record: dict[str, Any] = {"eventID": src.event_id, "eventName": self.operation.value, "dynamodb": body}
        if src.ttl_delete:
            record["userIdentity"] = {"Type": "Service", "PrincipalId": "dynamodb.amazonaws.com"}
        return record

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        if self is other:
            return True
        if not (self.operation == other.operation and self.key_id == other.key_id
                and self.version == other.version and self.source == other.source and self._keys == other._keys):
            return False
        try:
            return self.before == other.before and self.after == other.after
        except Exception:  # noqa: BLE001 — an image that cannot be decoded: equal when the wire forms are
            return self.raw_old_image == other.raw_old_image and self.raw_new_image == other.raw_new_image

    def __repr__(self) -> str:
        def part(slot: str) -> str:
            value = getattr(self, slot)
            if value is _UNSET:
                return "<lazy>"
            if type(value) is _Failed:
                return f"<DecodeError: {value.error}>"
            return repr(value)

        return (f"ChangeEvent(operation={self.operation!r}, keys={self._keys!r}, key_id={self.key_id!r}, "
                f"before={part('_before')}, after={part('_after')}, source={self.source!r}, "
                f"version={self.version!r})")

    def __reduce__(self) -> tuple:
        state = tuple(getattr(self, name) for name in self.__slots__[:-2])  # the caches are not pickled
        return (_rebuild_event, state)

    def __copy__(self) -> "ChangeEvent":
        return self  # immutable

    def __deepcopy__(self, memo: dict) -> "ChangeEvent":
        import copy

        return _rebuild_event(*copy.deepcopy(tuple(getattr(self, n) for n in self.__slots__[:-2]), memo))


def _rebuild_event(*state: Any) -> ChangeEvent:
    """Unpickle a :class:`ChangeEvent` (its slots in order, the caches left empty)."""
    event = ChangeEvent.__new__(ChangeEvent)
    for name, value in zip(ChangeEvent.__slots__, state):
        object.__setattr__(event, name, value)
    object.__setattr__(event, "_typed", None)
    object.__setattr__(event, "_typed_json", None)
    return event


def _plain(value: Any) -> Any:
    """A part in the wire form as plain dicts: a :class:`pipeline.avwire.WireImage` (a part read
    by msgspec) as its ``as_dict()``, anything else as it is."""
    if type(value) is dict or value is None:
        return value
    as_dict = getattr(value, "as_dict", None)
    return value if as_dict is None else as_dict()


@dataclass(frozen=True, slots=True)
class Batch:
    """One shard's consecutive events, in sequence order, handed to every sink at once.

    ``checkpoint_sequence_number`` is the last sequence number this batch covers (it may belong to
    a record that was dead-lettered by the decoder and so is not in ``events``); None when the
    batch covers no record. ``shard_end`` is True when the shard was closed after this batch.
    """

    table: str
    stream_arn: str
    shard_id: str
    events: tuple[ChangeEvent, ...]
    checkpoint_sequence_number: str | None
    shard_end: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def first_sequence_number(self) -> str | None:
        """Sequence number of the first event, or None for an empty batch."""
        return self.events[0].sequence_number if self.events else None

    @property
    def last_sequence_number(self) -> str | None:
        """Sequence number of the last event, or None for an empty batch."""
        return self.events[-1].sequence_number if self.events else None


def sequence_key(sequence_number: str) -> int:
    """Sequence numbers compared as integers (they are decimal strings of varying length)."""
    return int(sequence_number)
