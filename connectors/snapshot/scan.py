"""The parallel Scan reader of a snapshot (boto3): one ``Scan`` call per page.

Each call is ``Scan(TableName, Segment=s, TotalSegments=N, ReturnConsumedCapacity=TOTAL,
ConsistentRead=…, ExclusiveStartKey=<previous LastEvaluatedKey>, Limit=<from the RCU budget>)``
— DynamoDB API reference, Scan: a page holds at most 1 MB (or ``Limit`` items); a
``LastEvaluatedKey`` in the response means there is more, and it must be given back as
``ExclusiveStartKey`` with the same Segment; its absence means the segment is read to its end.

Fast path: like GetRecords (:mod:`connectors.dynamodb_streams.fastpath`), a 200 response body is
parsed by orjson instead of botocore's shape walk (items stay AttributeValue JSON, B as base64
text, which :func:`pipeline.codec.decode_item` decodes); signing, retries and error mapping stay
botocore's. The body's length gives the page's bytes exactly.

Throttling (ProvisionedThroughputExceededException, ThrottlingException, RequestLimitExceeded)
and transient failures that outlast botocore's own retries become SnapshotThrottledError, which
the runner backs off from; anything else (no such table, access denied) is SnapshotError.
Permissions: ``dynamodb:Scan`` and ``dynamodb:DescribeTable`` on the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import SnapshotError, SnapshotThrottledError
from pipeline.snapshot.items import key_from_json, key_to_json
from pipeline.snapshot.runner import Page

#: Most items asked for per Scan page (``Limit``): one page is one batch to the sinks, and a
#: 1 MB page of small items (DynamoDB Local returns ~5,000 of 140 bytes) would make a batch too
#: large to checkpoint often.
MAX_PAGE_ITEMS = 1000
_EVENT = "before-parse.dynamodb.Scan"
_UNIQUE_ID = "ddb-cdc-fast-scan"
_THROTTLING = {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
               "InternalServerError", "ServiceUnavailable", "InternalFailure", "LimitExceededException"}


def _before_parse(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    if response_dict.get("status_code") != 200 or not response_dict.get("body"):
        return
    body = response_dict["body"]
    try:
        data = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return  # let botocore's parser report it
    data["BodyBytes"] = len(body)
    customized_response_dict.update(data)
    response_dict["body"] = b"{}"


def install_fast_scan(client: Any) -> Any:
    """Make ``client`` (boto3 ``dynamodb``) return Scan items as raw JSON parsed by orjson, with
    ``BodyBytes`` = the response body's length. Idempotent; returns the client."""
    client.meta.events.register(_EVENT, _before_parse, unique_id=_UNIQUE_ID)
    return client


@dataclass(frozen=True)
class TableInfo:
    """What DescribeTable says: ``key_names`` (hash, then range), ``item_count``,
    ``size_bytes`` (both updated about every 6 h by DynamoDB), ``stream_arn`` (or None)."""

    table: str
    key_names: tuple[str, ...]
    item_count: int | None
    size_bytes: int | None
    stream_arn: str | None


def describe_table(client: Any, table: str) -> TableInfo:
    """DescribeTable → :class:`TableInfo`. Raises SnapshotError (no such table, no access)."""
    try:
        desc = client.describe_table(TableName=table)["Table"]
    except (ClientError, BotoCoreError) as exc:
        raise SnapshotError(f"cannot describe table {table!r}: {_text(exc)}; check the table name, "
                            "aws.region / endpoint and dynamodb:DescribeTable permission") from None
    keys = sorted(desc.get("KeySchema", []), key=lambda k: 0 if k["KeyType"] == "HASH" else 1)
    return TableInfo(table=table, key_names=tuple(k["AttributeName"] for k in keys), item_count=desc.get("ItemCount"),
                     size_bytes=desc.get("TableSizeBytes"), stream_arn=desc.get("LatestStreamArn"))


def _text(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


class ScanReader:
    """:class:`pipeline.snapshot.runner.SegmentReader` over a parallel Scan of ``table``.

    ``client``: boto3 ``dynamodb`` client (the fast path is installed on it); ``segments``:
    TotalSegments; ``consistent_read``: ConsistentRead (twice the RCU; sees every write made
    before the page was read)."""

    def __init__(self, client: Any, table: str, *, key_names: tuple[str, ...], segments: int,
                 consistent_read: bool = False):
        self.client = install_fast_scan(client)
        self.table = table
        self.key_names = key_names
        self.segments = segments
        self.consistent_read = consistent_read

    def read_page(self, segment: int, position: Any, limit: int | None) -> Page:
        """One Scan page of ``segment`` starting after ``position`` (a stored LastEvaluatedKey)."""
        kwargs: dict[str, Any] = {"TableName": self.table, "ReturnConsumedCapacity": "TOTAL",
                                  "ConsistentRead": self.consistent_read}
        if self.segments > 1:
            kwargs.update(Segment=segment, TotalSegments=self.segments)
        if position is not None:
            kwargs["ExclusiveStartKey"] = key_from_json(position)
        kwargs["Limit"] = min(limit or MAX_PAGE_ITEMS, MAX_PAGE_ITEMS)
        read_at = datetime.now(timezone.utc)
        try:
            resp = self.client.scan(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _THROTTLING or status >= 500:
                raise SnapshotThrottledError(f"Scan of {self.table} segment {segment}: {_text(exc)}",
                                             operation="scan") from None
            raise SnapshotError(f"Scan of {self.table} segment {segment} failed: {_text(exc)}; check the table, "
                                "the dynamodb:Scan permission and the endpoint") from None
        except BotoCoreError as exc:  # connection reset, read timeout after botocore's retries
            raise SnapshotThrottledError(f"Scan of {self.table} segment {segment}: {_text(exc)}",
                                         operation="scan") from None
        items = resp.get("Items") or []
        consumed = (resp.get("ConsumedCapacity") or {}).get("CapacityUnits") or 0.0
        return Page(items=items, next_position=key_to_json(resp.get("LastEvaluatedKey")),
                    consumed_rcu=float(consumed), bytes=int(resp.get("BodyBytes") or 0), read_at=read_at)
