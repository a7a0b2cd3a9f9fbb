"""A test double at the DynamoDB Streams API boundary (DESIGN.md, "Running the real thing in tests"),
shipped for plugin authors and users too: test a sink, a filter or a whole worker against shard
splits, late children, trimmed data and throttling, which DynamoDB Local never produces. Pass a
:class:`FakeStreams` as ``streams=`` to :class:`~connectors.dynamodb_streams.source.DynamoDBStreamSource`.

:class:`FakeStreams` has the methods of a boto3 ``dynamodbstreams`` client that
:class:`connectors.dynamodb_streams.source.DynamoDBStreamSource` calls — ``describe_stream``,
``get_shard_iterator``, ``get_records`` — with the same request parameters and response shapes,
and raises :class:`botocore.exceptions.ClientError` with the service's real error codes. It
produces what DynamoDB Local cannot: shard lineage (splits), shards that appear later, trimmed
data, expired iterators.

- ``DescribeStream`` pages ``page_size`` shards per call (``LastEvaluatedShardId`` /
  ``ExclusiveStartShardId``); a shard added with ``visible_after=n`` is listed only from the
  ``n``-th full listing on (a listing is a call without ``ExclusiveStartShardId``).
- Shard iterators are opaque tokens for (shard, index of the next record); ``GetRecords``
  returns at most ``Limit`` records and no ``NextShardIterator`` once a closed shard is fully
  read; an open shard at its end returns no records and a new iterator.
- ``fail_get_records(shard_id, at_index, code, times)`` makes GetRecords raise ``code`` when it
  is asked to read ``shard_id`` from record ``at_index`` (``times=None``: always).

Sequence numbers and splits as DynamoDB Streams makes them (``open_shard``, ``put``, ``split``,
``trim_head``), each behaviour from the DynamoDB Streams API reference:

- a sequence number is a per-shard prefix followed by a 20-digit record counter, and neither part
  rises from a parent to its child in a way a 32-bit remainder would keep (the DescribeStream
  example: ``205|00000000000000910398`` → child ``8204|00000000000001192334`` → child
  ``16837|00000000000001135967``); :func:`real_seq` builds them;
- shard ids are ``shardId-<20-digit creation time in ms>-<8 hex>`` (same example); a shard
  opened without ``created_ms`` is created now (wall clock, each id's time above the last), so
  it is younger than the 24 h retention as a shard a live stream splits off is — pass
  ``created_ms`` for an older one;
- a split closes the parent (EndingSequenceNumber set) and opens children listed with
  ``ParentShardId``; it may happen within the same second as changes in the parent, so a change in
  the parent and the next change of the same item in the child carry the same
  ApproximateCreationDateTime (rounded down to the second — StreamRecord);
- trimming drops a shard's oldest records but keeps its SequenceNumberRange.StartingSequenceNumber
  ("the first sequence number for the stream records contained within a shard"); TRIM_HORIZON
  then starts at the oldest record left, and reading or asking for an iterator at a trimmed
  record raises TrimmedDataAccessException ("the operation attempted to read past the oldest
  stream record in a shard" — GetShardIterator and GetRecords errors).

Every call is recorded in ``calls`` as ``(operation, kwargs)``. Thread-safe.
"""

from __future__ import annotations

import copy
import itertools
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import ClientError

STREAM_ARN = "arn:aws:dynamodb:us-east-1:000000000000:table/orders/stream/2026-01-01T00:00:00.000"


def client_error(code: str, message: str, operation: str, status: int = 400) -> ClientError:
    """A ClientError as botocore raises it for a JSON-protocol error response."""
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def seq(shard_no: int, i: int) -> str:
    """A 21-digit sequence number; shards numbered higher get higher numbers (children after parents)."""
    return f"{shard_no * 1_000_000 + i + 1:021d}"


def real_seq(prefix: int, counter: int) -> str:
    """A sequence number in DynamoDB Streams' layout: ``prefix`` then the counter in 20 digits."""
    return f"{prefix}{counter:020d}"


def to_boto3_shape(record: dict[str, Any]) -> dict[str, Any]:
    """make_stream_record's Lambda JSON shape → boto3's (ApproximateCreationDateTime as datetime)."""
    out = copy.deepcopy(record)
    body = out.get("dynamodb")
    if isinstance(body, dict) and isinstance(body.get("ApproximateCreationDateTime"), (int, float)):
        body["ApproximateCreationDateTime"] = datetime.fromtimestamp(body["ApproximateCreationDateTime"],
                                                                     tz=timezone.utc)
    return out


@dataclass
class FakeShard:
    shard_id: str
    parent_shard_id: str | None
    records: list[dict[str, Any]]
    closed: bool
    visible_after: int = 0
    trimmed: int = 0  # records at the head dropped by trim_head (indices below this are gone)
    prefix: int = 0  # real layout (open_shard): this shard's sequence number prefix and next counter
    counter: int = 0

    def seq_at(self, index: int) -> str:
        return self.records[index]["dynamodb"]["SequenceNumber"]


@dataclass
class _Failure:
    shard_id: str
    at_index: int
    code: str
    times: int | None
    message: str = ""


class FakeStreams:
    """An in-memory stream with the boto3 ``dynamodbstreams`` client's methods (see module doc)."""

    def __init__(self, stream_arn: str = STREAM_ARN, *, page_size: int = 2, get_records_delay_s: float = 0.0,
                 seed: int = 0):
        self.stream_arn = stream_arn
        self.page_size = page_size
        self.get_records_delay_s = get_records_delay_s
        self.shards: dict[str, FakeShard] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.listings = 0
        self._iterators: dict[str, tuple[str, int]] = {}
        self._ids = itertools.count(1)
        self._last_created_ms = 0
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._random = random.Random(seed)

    # -- building the stream -------------------------------------------------------------------

    def add_shard(self, shard_id: str, records: list[dict[str, Any]], *, parent: str | None = None,
                  closed: bool = True, visible_after: int = 0) -> FakeShard:
        with self._lock:
            shard = FakeShard(shard_id, parent, [to_boto3_shape(r) for r in records], closed, visible_after)
            self.shards[shard_id] = shard
            return shard

    def append(self, shard_id: str, records: list[dict[str, Any]], *, close: bool = False) -> None:
        with self._lock:
            shard = self.shards[shard_id]
            shard.records.extend(to_boto3_shape(r) for r in records)
            shard.closed = shard.closed or close

    def fail_get_records(self, shard_id: str, at_index: int, code: str, *, times: int | None = 1,
                         message: str = "injected") -> None:
        with self._lock:
            self._failures.append(_Failure(shard_id, at_index, code, times, message))

    # -- the real layout: shards, changes, splits and trims as DynamoDB Streams makes them ------

    def open_shard(self, *, parent: str | None = None, prefix: int | None = None,
                   counter: int | None = None, created_ms: int | None = None) -> str:
        """Open a shard in the real layout (see module doc); returns its id. Without ``prefix`` /
        ``counter``: a prefix above the parent's and a counter start unrelated to it, as in the
        API reference's example."""
        with self._lock:
            rnd = self._random
            if prefix is None:
                base = self.shards[parent].prefix if parent else rnd.randrange(100, 999)
                prefix = base + rnd.randrange(100, 9000)
            if counter is None:
                counter = rnd.randrange(1, 3_000_000)
            if created_ms is None:  # now, and after every shard opened before
                created_ms = max(int(time.time() * 1000), self._last_created_ms + 1)
            self._last_created_ms = max(self._last_created_ms, created_ms)
            shard_id = f"shardId-{created_ms:020d}-{rnd.getrandbits(32):08x}"
            self.shards[shard_id] = FakeShard(shard_id, parent, [], False, prefix=prefix, counter=counter)
            return shard_id

    def put(self, shard_id: str, record: dict[str, Any]) -> str:
        """Append ``record`` (make_stream_record's shape; its SequenceNumber is replaced) to an open
        shard of the real layout; returns the sequence number it got. The counter steps by 1–3."""
        with self._lock:
            shard = self.shards[shard_id]
            if shard.closed:
                raise ValueError(f"{shard_id} is closed")
            if shard.records:  # the first record gets the shard's StartingSequenceNumber
                shard.counter += self._random.randrange(1, 4)
            out = to_boto3_shape(record)
            out["dynamodb"]["SequenceNumber"] = sequence = real_seq(shard.prefix, shard.counter)
            shard.records.append(out)
            return sequence

    def split(self, shard_id: str, *, children: int = 1, created_ms: int | None = None) -> list[str]:
        """Close ``shard_id`` and open ``children`` child shards (a roll-over is one child, a
        partition split two); returns their ids. ``created_ms`` (epoch ms): when the children
        were created (default now; see :meth:`open_shard`)."""
        with self._lock:
            self.shards[shard_id].closed = True
            return [self.open_shard(parent=shard_id, created_ms=None if created_ms is None else created_ms + n)
                    for n in range(children)]

    def trim_head(self, shard_id: str, count: int) -> None:
        """Drop the ``count`` oldest records still in ``shard_id`` (older than 24 h)."""
        with self._lock:
            shard = self.shards[shard_id]
            shard.trimmed = min(len(shard.records), shard.trimmed + count)

    def calls_of(self, operation: str) -> list[dict[str, Any]]:
        with self._lock:
            return [kwargs for op, kwargs in self.calls if op == operation]

    # -- the client API ------------------------------------------------------------------------

    def describe_stream(self, *, StreamArn: str, Limit: int | None = None,
                        ExclusiveStartShardId: str | None = None) -> dict[str, Any]:
        with self._lock:
            self.calls.append(("DescribeStream", {"StreamArn": StreamArn, "Limit": Limit,
                                                  "ExclusiveStartShardId": ExclusiveStartShardId}))
            self._check_arn(StreamArn, "DescribeStream")
            if ExclusiveStartShardId is None:
                self.listings += 1
            visible = [s for s in self.shards.values() if self.listings >= s.visible_after]
            start = 0
            if ExclusiveStartShardId is not None:
                ids = [s.shard_id for s in visible]
                if ExclusiveStartShardId not in ids:
                    raise client_error("ValidationException", "unknown ExclusiveStartShardId", "DescribeStream")
                start = ids.index(ExclusiveStartShardId) + 1
            size = min(Limit or 100, self.page_size)
            page = visible[start:start + size]
            desc: dict[str, Any] = {
                "StreamArn": self.stream_arn,
                "StreamLabel": self.stream_arn.rsplit("/", 1)[-1],
                "StreamStatus": "ENABLED",
                "StreamViewType": "NEW_AND_OLD_IMAGES",
                "TableName": self.stream_arn.split(":table/", 1)[1].split("/", 1)[0],
                "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
                "Shards": [self._shard_desc(s) for s in page],
            }
            if start + size < len(visible):
                desc["LastEvaluatedShardId"] = page[-1].shard_id
            return {"StreamDescription": desc, "ResponseMetadata": {"HTTPStatusCode": 200}}

    def get_shard_iterator(self, *, StreamArn: str, ShardId: str, ShardIteratorType: str,
                           SequenceNumber: str | None = None) -> dict[str, Any]:
        with self._lock:
            self.calls.append(("GetShardIterator", {"StreamArn": StreamArn, "ShardId": ShardId,
                                                    "ShardIteratorType": ShardIteratorType,
                                                    "SequenceNumber": SequenceNumber}))
            self._check_arn(StreamArn, "GetShardIterator")
            shard = self.shards.get(ShardId)
            if shard is None:
                raise client_error("ResourceNotFoundException", f"Requested resource not found: Shard: {ShardId}",
                                   "GetShardIterator")
            if ShardIteratorType == "TRIM_HORIZON":
                index = shard.trimmed
            elif ShardIteratorType == "LATEST":
                index = len(shard.records)
            elif ShardIteratorType in ("AT_SEQUENCE_NUMBER", "AFTER_SEQUENCE_NUMBER"):
                if SequenceNumber is None:
                    raise client_error("ValidationException", "SequenceNumber required", "GetShardIterator")
                seqs = [shard.seq_at(i) for i in range(len(shard.records))]
                if SequenceNumber not in seqs:
                    raise client_error("ValidationException",
                                       f"Invalid SequenceNumber {SequenceNumber} for shard {ShardId}",
                                       "GetShardIterator")
                index = seqs.index(SequenceNumber) + (1 if ShardIteratorType == "AFTER_SEQUENCE_NUMBER" else 0)
                if index < shard.trimmed:
                    raise client_error("TrimmedDataAccessException", "The operation attempted to read past the "
                                       "oldest stream record in a shard.", "GetShardIterator")
            else:
                raise client_error("ValidationException", f"bad ShardIteratorType {ShardIteratorType}",
                                   "GetShardIterator")
            return {"ShardIterator": self._issue(ShardId, index), "ResponseMetadata": {"HTTPStatusCode": 200}}

    def get_records(self, *, ShardIterator: str, Limit: int | None = None) -> dict[str, Any]:
        if self.get_records_delay_s:
            threading.Event().wait(self.get_records_delay_s)
        with self._lock:
            self.calls.append(("GetRecords", {"ShardIterator": ShardIterator, "Limit": Limit}))
            where = self._iterators.get(ShardIterator)
            if where is None:
                raise client_error("ValidationException", "Invalid ShardIterator", "GetRecords")
            shard_id, index = where
            for failure in self._failures:
                if failure.shard_id == shard_id and failure.at_index == index and failure.times != 0:
                    if failure.times is not None:
                        failure.times -= 1
                    raise client_error(failure.code, failure.message, "GetRecords")
            shard = self.shards[shard_id]
            if index < shard.trimmed:
                raise client_error("TrimmedDataAccessException", "The operation attempted to read past the "
                                   "oldest stream record in a shard.", "GetRecords")
            limit = Limit or 1000
            if not 1 <= limit <= 1000:
                raise client_error("ValidationException", "Limit must be 1..1000", "GetRecords")
            records = [copy.deepcopy(r) for r in shard.records[index:index + limit]]
            end = index + len(records)
            response: dict[str, Any] = {"Records": records, "ResponseMetadata": {"HTTPStatusCode": 200}}
            if not (shard.closed and end >= len(shard.records)):
                response["NextShardIterator"] = self._issue(shard_id, end)
            return response

    # -- internals -----------------------------------------------------------------------------

    def _issue(self, shard_id: str, index: int) -> str:
        token = f"it-{next(self._ids)}-{shard_id}"
        self._iterators[token] = (shard_id, index)
        return token

    def _check_arn(self, arn: str, operation: str) -> None:
        if arn != self.stream_arn:
            raise client_error("ResourceNotFoundException", f"Requested resource not found: Stream: {arn}",
                               operation)

    @staticmethod
    def _shard_desc(shard: FakeShard) -> dict[str, Any]:
        first = shard.seq_at(0) if shard.records else real_seq(shard.prefix, shard.counter) if shard.prefix else "0" * 21
        rng: dict[str, Any] = {"StartingSequenceNumber": first}
        if shard.closed:
            rng["EndingSequenceNumber"] = shard.seq_at(len(shard.records) - 1) if shard.records else "0" * 21
        out: dict[str, Any] = {"ShardId": shard.shard_id, "SequenceNumberRange": rng}
        if shard.parent_shard_id:
            out["ParentShardId"] = shard.parent_shard_id
        return out
