"""DynamoDB Streams source: stream resolution, shard discovery and GetRecords, via boto3.

Facts used (DynamoDB / DynamoDB Streams API references):

- DescribeTable returns ``LatestStreamArn`` and ``StreamSpecification`` for a table with a stream;
- DescribeStream returns up to 100 shards per call; further pages are asked for with
  ``ExclusiveStartShardId`` = ``LastEvaluatedShardId``;
- GetRecords returns at most 1,000 records (``Limit`` 1–1,000), and no ``NextShardIterator``
  once a closed shard is fully read;
- ExpiredIteratorException: the iterator is older than 15 minutes;
- TrimmedDataAccessException: the position is behind the 24-hour trim horizon;
- throttling (LimitExceededException, ProvisionedThroughputExceededException) and 5xx
  (InternalServerError) are retried by botocore's ``standard`` retry mode with jittered
  exponential backoff (configured in :mod:`connectors.aws`).

Errors left after botocore's attempts are classified in one place,
:mod:`connectors.dynamodb_streams.errors`: those that pass (5xx, timeouts, reset connections,
throttling) become :class:`~pipeline.errors.TransientSourceError` (ThrottledError for
throttling), which the worker retries with backoff; the rest become SourceError (or the specific
ones below) and stop the shard or the worker.
"""

from __future__ import annotations

from typing import Any

import time

from botocore.exceptions import BotoCoreError, ClientError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from connectors.aws import make_client
from connectors.dynamodb_streams.errors import THROTTLING_CODES, classify, count_transient, source_error  # noqa: F401 (re-export)
from connectors.dynamodb_streams.fastpath import install_fast_get_records
from pipeline.awsconfig import AwsConfig
from pipeline.errors import SourceError, TransientSourceError
from pipeline.logs import get_logger
from pipeline.source import (
    IteratorExpiredError,
    ReadResult,
    ShardInfo,
    ShardNotFoundError,
    ThrottledError,
    TrimmedDataError,
)

#: How long resolving a table's stream at start (DescribeTable) retries errors that pass, in s;
#: then SourceError (exit 1). SIGTERM ends the wait at once (connectors/app/cli.py).
DESCRIBE_TABLE_RETRY_S = 120.0
#: Backoff between those attempts: jittered exponential from 0.5 s, capped at 10 s (tenacity).
DESCRIBE_TABLE_BACKOFF_INITIAL_S = 0.5
DESCRIBE_TABLE_BACKOFF_MAX_S = 10.0


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def table_from_stream_arn(stream_arn: str) -> str:
    """``arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL`` → ``NAME``."""
    try:
        return stream_arn.split(":table/", 1)[1].split("/stream/", 1)[0]
    except IndexError:
        raise SourceError(f"{stream_arn!r} is not a DynamoDB stream ARN "
                          "(arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL)") from None


class DynamoDBStreamSource:
    """A table's stream, named by table (→ LatestStreamArn) or by stream ARN.

    ``dynamodb`` / ``streams`` clients may be passed in (tests); otherwise they are built from
    ``aws``. ``read_path``: ``fast`` (default, and what ``auto`` means here — the worker's wiring
    resolves ``auto`` from its sinks: ``connectors.app.wiring.resolve_read_path``): GetRecords
    bodies parsed by orjson, records as raw JSON dicts — :mod:`connectors.dynamodb_streams.fastpath`;
    ``typed``: read by msgspec into checked structs (:mod:`pipeline.avwire`); ``boto3``: botocore's
    shape-driven parser (records with datetime and bytes values). All decode to identical change
    events. Raises SourceError with a one-line fix when the table has no stream or cannot be
    described. DescribeTable errors that pass (5xx, timeouts, refused connections) are retried
    with backoff for ``describe_retry_s`` (default :data:`DESCRIBE_TABLE_RETRY_S`, 120 s) first.
    """

    def __init__(self, aws: AwsConfig, *, table: str | None = None, stream_arn: str | None = None,
                 dynamodb: Any = None, streams: Any = None, read_path: str = "fast",
                 describe_retry_s: float = DESCRIBE_TABLE_RETRY_S):
        self.aws = aws
        self.streams = streams or make_client("dynamodbstreams", aws, max_pool_connections=50)
        if read_path == "auto":
            read_path = "fast"
        if read_path not in ("fast", "typed", "boto3"):
            raise SourceError(f"source.read_path {read_path!r}: use auto, fast, typed or boto3")
        self.read_path = read_path
        if read_path != "boto3" and hasattr(self.streams, "meta"):  # a boto3 client (not a test double)
            install_fast_get_records(self.streams, typed=read_path == "typed")
        #: the table whose LatestStreamArn this source follows (named by table), else None
        self.followed_table: str | None = None
        self._dynamodb = dynamodb
        if stream_arn:
            self.stream_arn = stream_arn
            self.table = table or table_from_stream_arn(stream_arn)
        elif table:
            client = self._dynamodb = dynamodb or make_client("dynamodb", aws)
            self.table = table
            self.followed_table = table
            self.stream_arn = self._latest_stream_arn_retrying(client, table, describe_retry_s)
        else:
            raise SourceError("no stream named: set source.table or source.stream_arn")

    @classmethod
    def _latest_stream_arn_retrying(cls, client: Any, table: str, retry_s: float) -> str:
        """:meth:`_latest_stream_arn`, with errors that pass retried for ``retry_s`` seconds."""
        log = get_logger(component="source")

        def before_sleep(state) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("describe_table_retry", table=table, attempt=state.attempt_number, error=str(exc),
                        retry_in_s=round(state.next_action.sleep, 2) if state.next_action else None,
                        gives_up_after_s=retry_s)

        for attempt in Retrying(retry=retry_if_exception_type(TransientSourceError),
                                wait=wait_exponential_jitter(multiplier=DESCRIBE_TABLE_BACKOFF_INITIAL_S,
                                                             max=DESCRIBE_TABLE_BACKOFF_MAX_S),
                                stop=stop_after_delay(retry_s), sleep=time.sleep, before_sleep=before_sleep,
                                reraise=True):
            with attempt:
                return cls._latest_stream_arn(client, table)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _latest_stream_arn(client: Any, table: str) -> str:
        endpoint = getattr(getattr(client, "meta", None), "endpoint_url", "the DynamoDB endpoint")
        try:
            desc = client.describe_table(TableName=table)["Table"]
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                raise SourceError(f"table {table!r} not found at {endpoint}: "
                                  "check source.table and aws.region / aws.endpoint_url") from None
            raise source_error(exc, "describe_table", f"cannot describe table {table!r}") from None
        except BotoCoreError as exc:
            raise source_error(exc, "describe_table", f"cannot reach DynamoDB at {endpoint} "
                                                      f"(DescribeTable {table!r})") from None
        arn = desc.get("LatestStreamArn")
        spec = desc.get("StreamSpecification") or {}
        if not arn or not spec.get("StreamEnabled", True):
            raise SourceError(f"table {table!r} has no stream: enable DynamoDB Streams with "
                              "StreamViewType NEW_AND_OLD_IMAGES")
        return arn

    # -- following the table's stream (issue 13, 6b) --------------------------------------------

    def latest_stream(self) -> tuple[str | None, bool]:
        """``(LatestStreamArn, enabled)`` of the followed table now (DescribeTable).

        A stream that was disabled keeps its ARN in ``LatestStreamArn`` with no (or a disabled)
        ``StreamSpecification``; re-enabling creates a new stream with a new ARN and label
        (DynamoDB Developer Guide, "Change data capture for DynamoDB Streams": disabling a stream
        closes it, its records stay readable for 24 hours; measured the same on DynamoDB Local).
        Raises SourceError (also for a source named by stream ARN: it follows nothing), its
        transient kind for 5xx, throttling and timeouts (:func:`source_error`).
        """
        if self.followed_table is None or self._dynamodb is None:
            raise SourceError(f"{self.stream_arn} was named by stream ARN: there is no table stream to follow")
        try:
            desc = self._dynamodb.describe_table(TableName=self.followed_table)["Table"]
        except (ClientError, BotoCoreError) as exc:
            raise source_error(exc, "describe_table", f"cannot describe table {self.followed_table!r}") from None
        spec = desc.get("StreamSpecification") or {}
        arn = desc.get("LatestStreamArn")
        return arn, bool(arn) and bool(spec.get("StreamEnabled", False))

    def for_stream(self, stream_arn: str) -> "DynamoDBStreamSource":
        """A source for another stream of the same table (an older or newer one), sharing this
        source's clients; it follows the same table."""
        other = DynamoDBStreamSource(self.aws, stream_arn=stream_arn, table=self.table, dynamodb=self._dynamodb,
                                     streams=self.streams, read_path=self.read_path)
        other.followed_table = self.followed_table
        return other

    def list_shards(self) -> list[ShardInfo]:
        """Every shard of the stream, following ``LastEvaluatedShardId`` pagination."""
        shards: list[ShardInfo] = []
        start: str | None = None
        while True:
            kwargs: dict[str, Any] = {"StreamArn": self.stream_arn}
            if start:
                kwargs["ExclusiveStartShardId"] = start
            try:
                desc = self.streams.describe_stream(**kwargs)["StreamDescription"]
            except (ClientError, BotoCoreError) as exc:
                raise source_error(exc, "describe_stream", f"DescribeStream {self.stream_arn}") from None
            for shard in desc.get("Shards", []):
                rng = shard.get("SequenceNumberRange") or {}
                shards.append(ShardInfo(
                    shard_id=shard["ShardId"],
                    parent_shard_id=shard.get("ParentShardId"),
                    starting_sequence_number=rng.get("StartingSequenceNumber"),
                    ending_sequence_number=rng.get("EndingSequenceNumber"),
                ))
            start = desc.get("LastEvaluatedShardId")
            if not start:
                return shards

    def get_iterator(self, shard_id: str, iterator_type: str, sequence_number: str | None = None) -> str:
        """GetShardIterator. Raises TrimmedDataError, ShardNotFoundError, SourceError."""
        kwargs: dict[str, Any] = {"StreamArn": self.stream_arn, "ShardId": shard_id,
                                  "ShardIteratorType": iterator_type}
        if sequence_number is not None:
            kwargs["SequenceNumber"] = sequence_number
        try:
            return self.streams.get_shard_iterator(**kwargs)["ShardIterator"]
        except (ClientError, BotoCoreError) as exc:
            raise self._map(exc, shard_id, "get_shard_iterator") from None

    def get_records(self, iterator: str, limit: int) -> ReadResult:
        """GetRecords. Raises IteratorExpiredError, TrimmedDataError, ShardNotFoundError, ThrottledError,
        TransientSourceError (5xx, timeout, reset connection: retry), SourceError (cannot pass)."""
        try:
            response = self.streams.get_records(ShardIterator=iterator, Limit=limit)
        except (ClientError, BotoCoreError) as exc:
            raise self._map(exc, None, "get_records") from None
        return ReadResult(records=response.get("Records", []), next_iterator=response.get("NextShardIterator"))

    def _map(self, exc: ClientError | BotoCoreError, shard_id: str | None, operation: str) -> Exception:
        where = f"shard {shard_id}" if shard_id else "shard"
        if not isinstance(exc, ClientError):
            return source_error(exc, operation, f"{where}: {operation}")
        code = _code(exc)
        if code == "ExpiredIteratorException":
            return IteratorExpiredError(f"{where}: shard iterator expired")
        if code == "TrimmedDataAccessException":
            return TrimmedDataError(f"{where}: position is behind the trim horizon: {exc}")
        if code == "ResourceNotFoundException":
            return ShardNotFoundError(f"{where} of {self.stream_arn} not found: {exc}")
        if classify(exc) == "throttled":
            count_transient(operation)
            return ThrottledError(f"{where}: throttled ({code}) after retries: {exc}", operation=operation)
        return source_error(exc, operation, f"{where}: {operation}")
