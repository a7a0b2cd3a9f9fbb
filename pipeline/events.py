"""The change event: one per DynamoDB stream record, frozen and typed.

Shapes follow Debezium's envelope (``op`` c/u/d/r, ``before``/``after``, ``source``) with
DynamoDB's own names for the parts. See DESIGN.md, "The change event".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

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


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One item change, decoded losslessly.

    - ``keys``: decoded key attributes (``{"pk": "a", "sk": Decimal("1")}``).
    - ``key_id``: stable string id of the item, built from the keys (see ``codec.key_id``).
    - ``before`` / ``after``: decoded OldImage / NewImage, None when the stream view type or the
      operation leaves them out.
    - ``version``: 63-bit integer that increases for successive changes of one item, across
      shard splits too, computed from the record and its shard's version floor (see
      ``codec.record_version``).
    """

    operation: Operation
    keys: Mapping[str, Any]
    key_id: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    source: Source
    version: int

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
