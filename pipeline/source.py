"""The stream source protocol the worker reads through (implemented in connectors.dynamodb_streams).

Facts about DynamoDB Streams the worker relies on (DynamoDB Streams API reference):

- DescribeStream lists shards with ParentShardId and a SequenceNumberRange; a shard with an
  EndingSequenceNumber is closed;
- GetRecords returns at most 1,000 records per call; a missing NextShardIterator means the
  shard is closed and fully read (SHARD_END);
- a shard iterator expires 15 minutes after it was issued (ExpiredIteratorException);
- records are kept for 24 hours; reading before the trim horizon fails with
  TrimmedDataAccessException.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from pipeline.errors import IteratorExpiredError, TrimmedDataError, ThrottledError, ShardNotFoundError, ShardVanishedError  # noqa: F401 (defined in the one error tree)

#: DynamoDB Streams keeps records 24 hours (DynamoDB developer guide, "Change data capture for
#: DynamoDB Streams"), in seconds: older records may be trimmed at any time, and a shard created
#: less than this long ago cannot have lost its head. The one definition the worker, the metrics
#: and the snapshot's retention watchdog use.
STREAM_RETENTION_S = 24 * 3600


@dataclass(frozen=True)
class ShardInfo:
    """One shard as DescribeStream reports it; ``ending_sequence_number`` is None while open."""

    shard_id: str
    parent_shard_id: str | None
    starting_sequence_number: str | None
    ending_sequence_number: str | None

    @property
    def closed(self) -> bool:
        return self.ending_sequence_number is not None


@dataclass
class ReadResult:
    """One GetRecords response: raw ``records`` (boto3 shape) and the next iterator (None = SHARD_END)."""

    records: Sequence[Any]
    next_iterator: str | None







class StreamSource(Protocol):
    """A table's stream. ``table`` and ``stream_arn`` are resolved at construction."""

    table: str
    stream_arn: str

    def list_shards(self) -> list[ShardInfo]:
        """Every shard of the stream (DescribeStream, all pages)."""

    def get_iterator(self, shard_id: str, iterator_type: str, sequence_number: str | None = None) -> str:
        """A shard iterator: ``TRIM_HORIZON``, ``LATEST``, ``AT_SEQUENCE_NUMBER`` or ``AFTER_SEQUENCE_NUMBER``."""

    def get_records(self, iterator: str, limit: int) -> ReadResult:
        """One GetRecords call. Raises IteratorExpiredError, TrimmedDataError, ShardNotFoundError."""
