"""The Lambda-shaped view of one change event, built lazily: only the parts a filter pattern
names are computed.

Shape (a DynamoDB stream record as Lambda delivers it — AWS Lambda developer guide, "Using AWS
Lambda with Amazon DynamoDB", the example event; "Filtering DynamoDB events")::

    {"eventID": "...", "eventName": "INSERT" | "MODIFY" | "REMOVE", "eventVersion": "1.1",
     "eventSource": "aws:dynamodb", "awsRegion": "us-east-1", "eventSourceARN": "<stream ARN>",
     "dynamodb": {"ApproximateCreationDateTime": <epoch s, number>, "Keys": {...},
                  "NewImage": {...}, "OldImage": {...}, "SequenceNumber": "...",
                  "SizeBytes": <int>, "StreamViewType": "..."},
     "userIdentity": {"type": "Service", "principalId": "dynamodb.amazonaws.com"}}  # TTL deletes only

``Keys`` / ``NewImage`` / ``OldImage`` hold DynamoDB AttributeValue JSON: numbers are *strings*
(``{"N": "5"}``), binary is base64 text, sets are lists, ``NULL`` is ``true``. A SNAPSHOT event
(a backfill read, which Lambda never sees) shows ``eventName`` ``INSERT``: it is the item's
current state arriving.

Attribute values come from the event's raw AttributeValue maps when it keeps them (attributes
``raw_keys`` / ``raw_new_image`` / ``raw_old_image``), else they are encoded from the decoded
``keys`` / ``after`` / ``before`` (:func:`pipeline.codec.encode_value`) — one named attribute at a
time, never the whole image.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from pipeline.codec import encode_value
from pipeline.events import ChangeEvent, Operation

#: Sentinel: nothing at this path.
MISSING = object()

_IMAGES = {"Keys": ("raw_keys", "keys"), "NewImage": ("raw_new_image", "after"),
           "OldImage": ("raw_old_image", "before")}

TOP_LEVEL_FIELDS = ("eventID", "eventName", "eventVersion", "eventSource", "awsRegion", "eventSourceARN",
                    "dynamodb", "userIdentity")
DYNAMODB_FIELDS = ("ApproximateCreationDateTime", "Keys", "NewImage", "OldImage", "SequenceNumber",
                   "SizeBytes", "StreamViewType")


def _jsonable_av(av: Any) -> Any:
    """A raw AttributeValue as Lambda's JSON shows it: binary (``bytes`` from boto3) as base64 text."""
    if isinstance(av, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(av)).decode("ascii")
    if isinstance(av, Mapping):
        return {k: _jsonable_av(v) for k, v in av.items()}
    if isinstance(av, (list, tuple, set, frozenset)):
        return [_jsonable_av(v) for v in av]
    return av


class LambdaView:
    """Lazy access to :data:`the Lambda-shaped record <pipeline.shaping.view>` of ``event``.

    :meth:`top` returns one top-level field, :meth:`attribute` one attribute's AttributeValue JSON
    of ``Keys`` / ``NewImage`` / ``OldImage``; both return :data:`MISSING` when absent.
    """

    __slots__ = ("event",)

    def __init__(self, event: ChangeEvent):
        self.event = event

    def top(self, name: str) -> Any:
        ev = self.event
        src = ev.source
        if name == "eventName":
            return "INSERT" if ev.operation is Operation.SNAPSHOT else ev.operation.value
        if name == "eventID":
            return src.event_id
        if name == "eventVersion":
            return "1.1"
        if name == "eventSource":
            return "aws:dynamodb"
        if name == "eventSourceARN":
            return src.stream_arn
        if name == "awsRegion":
            parts = src.stream_arn.split(":")
            return parts[3] if len(parts) > 3 else MISSING
        if name == "userIdentity":
            if src.ttl_delete:
                return {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
            return MISSING
        return MISSING

    def dynamodb(self, name: str) -> Any:
        """A scalar field of ``dynamodb`` (not the images)."""
        src = self.event.source
        if name == "SequenceNumber":
            return src.sequence_number
        if name == "SizeBytes":
            return src.size_bytes
        if name == "StreamViewType":
            return src.stream_view_type or MISSING
        if name == "ApproximateCreationDateTime":
            created = src.approximate_creation_time
            if created is None:
                return MISSING
            ts = created.timestamp()
            return int(ts) if ts == int(ts) else ts
        return MISSING

    def attribute(self, image: str, name: str) -> Any:
        """AttributeValue JSON of attribute ``name`` of ``image`` (Keys / NewImage / OldImage)."""
        raw_attr, decoded_attr = _IMAGES[image]
        raw = getattr(self.event, raw_attr, None)
        if raw is not None and isinstance(raw, Mapping):
            if name not in raw:
                return MISSING
            return _jsonable_av(raw[name])
        decoded = getattr(self.event, decoded_attr)
        if decoded is None or name not in decoded:
            return MISSING
        return encode_value(decoded[name])

    def has_image(self, image: str) -> bool:
        raw_attr, decoded_attr = _IMAGES[image]
        raw = getattr(self.event, raw_attr, None)
        if isinstance(raw, Mapping):
            return True
        return getattr(self.event, decoded_attr) is not None

    def resolve(self, path: tuple[str, ...]) -> list[Any]:
        """Every value reached by ``path`` (arrays on the way are flattened, as EventBridge does);
        ``[]`` when nothing is there."""
        if not path:
            return []
        head = path[0]
        if head == "dynamodb":
            if len(path) == 1:
                return [{}]  # an object: never a leaf
            second = path[1]
            if second in _IMAGES:
                if len(path) == 2:
                    return [{}] if self.has_image(second) else []
                root = self.attribute(second, path[2])
                rest = path[3:]
            else:
                root = self.dynamodb(second)
                rest = path[2:]
        else:
            root = self.top(head)
            rest = path[1:]
        if root is MISSING:
            return []
        values = _flatten([root]) if type(root) is list else [root]
        for segment in rest:
            nxt: list[Any] = []
            for value in values:
                if (type(value) is dict or isinstance(value, Mapping)) and segment in value:
                    child = value[segment]
                    if type(child) is list:
                        nxt.extend(_flatten(child))
                    else:
                        nxt.append(child)
            values = nxt
            if not values:
                break
        return values


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if type(value) is list:
            out.extend(_flatten(value))
        else:
            out.append(value)
    return out
