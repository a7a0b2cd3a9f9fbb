"""The DynamoDB event of a Lambda event source mapping ↔ the stream records ddb-cdc decodes.

Lambda's shape (AWS Lambda developer guide, "Using AWS Lambda with Amazon DynamoDB", example
event; "Configuring partial batch response with DynamoDB and Lambda")::

    {"Records": [
        {"eventID": "c4ca4238a0b923820dcc509a6f75849b", "eventName": "INSERT", "eventVersion": "1.1",
         "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
         "dynamodb": {"ApproximateCreationDateTime": 1480642020,          # epoch seconds (a JSON number)
                      "Keys": {"pk": {"S": "a"}}, "NewImage": {...}, "OldImage": {...},
                      "SequenceNumber": "4421584500000000017450439091",  # a decimal string
                      "SizeBytes": 26, "StreamViewType": "NEW_AND_OLD_IMAGES"},
         "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2024-01-01T00:00:00.000",
         "userIdentity": {"type": "Service", "principalId": "dynamodb.amazonaws.com"}},   # TTL deletes only
        ...]}

It differs from a GetRecords ``Records`` element (DynamoDB Streams API reference, Record) in:

- ``B`` / ``BS`` values are base64 text (JSON), not bytes — :mod:`pipeline.codec` takes both;
- ``ApproximateCreationDateTime`` is epoch seconds, not a datetime — the codec takes both;
- ``eventSourceARN`` (the stream ARN) is added to each record; the table is its ``table/<name>`` part;
- ``userIdentity`` keys are ``type`` / ``principalId`` (GetRecords via boto3: ``Type`` /
  ``PrincipalId``) — :func:`stream_record` maps them back, so TTL deletes are recognised;
- there is **no shard id**: one invocation holds the records of one shard (with
  ``ParallelizationFactor`` > 1, of one partition-key range of one shard), but the event does not
  name it. Only the tumbling-window variant carries a top-level ``shardId``; when present it is used,
  else the events get :data:`UNKNOWN_SHARD_ID` (see the README, "Deploying", Lambda).

:func:`lambda_event` is the reverse conversion, GetRecords output → Lambda event, used by the tests
(real DynamoDB Local stream records become invocations) and useful to replay captured records
through the handler locally. No AWS SDK is imported here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from pipeline.codec import record_sequence_number
from pipeline.errors import LambdaEventError

#: The shard id given to events of an invocation whose event does not name its shard (every event
#: of a mapping without tumbling windows): the audit object keys, dead letters and ``_cdc.shard_id``
#: show it instead of ``shardId-…``.
UNKNOWN_SHARD_ID = "lambda-shard-unknown"


@dataclass(frozen=True)
class LambdaRecord:
    """One record of the invocation: its ``index`` in ``Records``, its ``stream_arn`` and ``table``
    (from ``eventSourceARN``), its ``sequence_number`` (None when the record has no valid one — it
    can then not be reported as a batchItemFailure, only dead-lettered) and ``record``, the record
    in the shape :func:`pipeline.codec.decode_record` reads (``userIdentity`` keys as GetRecords
    names them)."""

    index: int
    stream_arn: str
    table: str
    sequence_number: str | None
    record: Mapping[str, Any]


def table_from_stream_arn(arn: str) -> str:
    """``arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL`` → ``NAME`` (ARN format — DynamoDB
    developer guide, "DynamoDB Streams"). Raises LambdaEventError for any other text."""
    if isinstance(arn, str) and arn.startswith("arn:"):
        parts = arn.split(":", 5)
        if len(parts) == 6 and parts[2] == "dynamodb":
            resource = parts[5].split("/")
            if len(resource) >= 4 and resource[0] == "table" and resource[2] == "stream" and resource[1]:
                return resource[1]
    raise LambdaEventError(f"eventSourceARN {str(arn)[:120]!r} is not a DynamoDB stream ARN "
                           "(arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL); "
                           "the function must be triggered by a DynamoDB stream event source mapping")


def stream_record(lambda_record: Mapping[str, Any]) -> dict[str, Any]:
    """A Lambda record as :func:`pipeline.codec.decode_record` reads it: the same dict with
    ``userIdentity`` ``type``/``principalId`` renamed ``Type``/``PrincipalId``. Never raises."""
    record = dict(lambda_record)
    identity = record.get("userIdentity")
    if isinstance(identity, Mapping):
        renamed = dict(identity)
        for lower, upper in (("type", "Type"), ("principalId", "PrincipalId")):
            if lower in renamed and upper not in renamed:
                renamed[upper] = renamed.pop(lower)
        record["userIdentity"] = renamed
    return record


def parse_event(event: Any) -> tuple[list[LambdaRecord], str | None]:
    """The invocation's records in event order, and the event's ``shardId`` (tumbling windows
    only; else None). A record that is not an object, or has no stream ARN, is still returned
    (it is dead-lettered by the handler) with the ARN of its neighbours.

    Raises LambdaEventError when ``event`` is not a DynamoDB event at all (no ``Records`` list, or
    no record with a DynamoDB stream ARN) — a misconfigured trigger, not bad data.
    """
    if not isinstance(event, Mapping) or not isinstance(event.get("Records"), list):
        raise LambdaEventError("the event has no 'Records' list: the function must be invoked by a "
                               "DynamoDB stream event source mapping (or with an event of that shape)")
    raw = event["Records"]
    shard_id = event.get("shardId") if isinstance(event.get("shardId"), str) and event.get("shardId") else None
    arns = [r.get("eventSourceARN") if isinstance(r, Mapping) else None for r in raw]
    known = next((a for a in arns if isinstance(a, str) and a), None)
    if raw and known is None:
        raise LambdaEventError("no record of the event has an eventSourceARN: not a DynamoDB stream event")
    out: list[LambdaRecord] = []
    last_arn = known
    for index, item in enumerate(raw):
        arn = arns[index] if isinstance(arns[index], str) and arns[index] else last_arn
        last_arn = arn
        table = table_from_stream_arn(arn)
        record = stream_record(item) if isinstance(item, Mapping) else item
        out.append(LambdaRecord(index=index, stream_arn=arn, table=table,
                                sequence_number=record_sequence_number(record), record=record))
    return out, shard_id


# -- GetRecords → Lambda (tests, local replays) ---------------------------------------------------


def lambda_value(av: Any) -> Any:
    """One AttributeValue as Lambda's JSON carries it: ``B`` and ``BS`` bytes → base64 text,
    maps and lists converted recursively, everything else as it is."""
    if not isinstance(av, Mapping) or len(av) != 1:
        return av
    (tag, value), = av.items()
    if tag == "B" and isinstance(value, (bytes, bytearray, memoryview)):
        return {"B": base64.b64encode(bytes(value)).decode("ascii")}
    if tag == "BS" and isinstance(value, list):
        return {"BS": [base64.b64encode(bytes(v)).decode("ascii") if isinstance(v, (bytes, bytearray, memoryview))
                       else v for v in value]}
    if tag == "M" and isinstance(value, Mapping):
        return {"M": {k: lambda_value(v) for k, v in value.items()}}
    if tag == "L" and isinstance(value, list):
        return {"L": [lambda_value(v) for v in value]}
    return {tag: value}


def lambda_record(record: Mapping[str, Any], *, stream_arn: str, region: str = "us-east-1") -> dict[str, Any]:
    """One GetRecords record (boto3 shape) → the record Lambda would deliver:

    - images and keys through :func:`lambda_value` (binary → base64 text);
    - ``ApproximateCreationDateTime`` datetime → epoch seconds (a float; whole seconds as DynamoDB
      gives them stay whole);
    - ``eventSourceARN`` = ``stream_arn``; ``awsRegion`` kept (``region`` when absent);
      ``eventSource`` ``aws:dynamodb``; ``eventVersion`` kept (``1.1`` when absent);
    - ``userIdentity`` ``Type``/``PrincipalId`` → ``type``/``principalId``.
    """
    body = dict(record.get("dynamodb") or {})
    for name in ("Keys", "NewImage", "OldImage"):
        if isinstance(body.get(name), Mapping):
            body[name] = {k: lambda_value(v) for k, v in body[name].items()}
    created = body.get("ApproximateCreationDateTime")
    if isinstance(created, datetime):
        moment = created if created.tzinfo else created.replace(tzinfo=timezone.utc)
        body["ApproximateCreationDateTime"] = moment.timestamp()
    out: dict[str, Any] = {
        "eventID": record.get("eventID"),
        "eventName": record.get("eventName"),
        "eventVersion": record.get("eventVersion", "1.1"),
        "eventSource": record.get("eventSource", "aws:dynamodb"),
        "awsRegion": record.get("awsRegion", region),
        "dynamodb": body,
        "eventSourceARN": stream_arn,
    }
    identity = record.get("userIdentity")
    if isinstance(identity, Mapping):
        out["userIdentity"] = {"type": identity.get("Type"), "principalId": identity.get("PrincipalId")}
    return out


def lambda_event(records: Iterable[Mapping[str, Any]], *, stream_arn: str, region: str = "us-east-1",
                 shard_id: str | None = None) -> dict[str, Any]:
    """GetRecords ``Records`` (one shard) → a Lambda DynamoDB event ``{"Records": [...]}``; with
    ``shard_id``, also the top-level ``shardId`` a tumbling-window mapping adds."""
    event: dict[str, Any] = {"Records": [lambda_record(r, stream_arn=stream_arn, region=region) for r in records]}
    if shard_id:
        event["shardId"] = shard_id
    return event


def batch_item_failures(sequence_numbers: Sequence[str]) -> dict[str, Any]:
    """The ReportBatchItemFailures response: ``{"batchItemFailures": [{"itemIdentifier": seq}, ...]}``
    (AWS Lambda developer guide, "Configuring partial batch response with DynamoDB and Lambda": the
    identifier is the record's SequenceNumber; Lambda checkpoints before the lowest one reported
    and retries from it). An empty list means the whole batch succeeded."""
    return {"batchItemFailures": [{"itemIdentifier": seq} for seq in sequence_numbers]}
