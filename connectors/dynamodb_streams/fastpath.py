"""The fast GetRecords read path: the response body parsed by orjson, botocore for the rest.

botocore parses a GetRecords response by walking the service model shape for every value of
every record (``botocore.parsers.JSONParser``), which costs far more than reading the JSON: on a
1,000-record response of ~2 KB NEW_AND_OLD_IMAGES records it is most of the read time
(``python -m benchmarks`` measures it). DynamoDB Streams' wire format already is plain JSON whose
AttributeValues :func:`pipeline.codec.decode_record` decodes directly (B as base64 text,
ApproximateCreationDateTime as epoch seconds — the shape Lambda delivers), so for this one
operation the shape walk buys nothing.

:func:`install_fast_get_records` registers a handler on the client's ``before-parse`` event for
``dynamodb-streams.GetRecords`` (botocore emits it in ``Endpoint._do_get_response`` with the raw
``response_dict`` and a ``customized_response_dict`` that is merged into the parsed response).
For a 200 response the handler parses the body with orjson into ``customized_response_dict`` and
hands botocore's parser an empty object instead. Everything else stays botocore's: credentials,
SigV4 signing, endpoint resolution, retries (a retried call runs the hook again) and error
mapping (responses with status ≥ 300 are left untouched, so ClientError codes are as before).
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from pipeline.avwire import parse_get_records

_EVENT = "before-parse.dynamodb-streams.GetRecords"
_UNIQUE_ID = "ddb-cdc-fast-get-records"


def parse_get_records_body(body: bytes, *, typed: bool = False) -> dict[str, Any]:
    """A GetRecords response body → ``{"Records": [raw record dicts], "NextShardIterator": str}``
    (``NextShardIterator`` absent once a closed shard is fully read). Raises orjson.JSONDecodeError.

    ``typed`` (``source.read_path: typed``): first by msgspec against the typed schema of
    :func:`pipeline.avwire.parse_get_records` (the AttributeValues checked in C; Keys / NewImage
    / OldImage come back as :class:`pipeline.avwire.WireImage` Mappings); a body that schema
    refuses — anything unusual: an unknown tag or field, a wrongly typed value, nesting beyond 32
    levels — is parsed by orjson into plain dicts, as without ``typed``, and decoded by the dict
    path, which decides what is wrong.
    """
    if typed:
        try:
            return parse_get_records(body)
        except msgspec.MsgspecError:
            pass
    data = orjson.loads(body)
    out: dict[str, Any] = {"Records": data.get("Records") or []}
    if data.get("NextShardIterator") is not None:
        out["NextShardIterator"] = data["NextShardIterator"]
    return out


def _before_parse(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], *, typed: bool = False,
                  **_: Any) -> None:
    if response_dict.get("status_code") != 200:
        return  # errors: botocore's parser maps them to ClientError codes
    body = response_dict.get("body")
    if not body:
        return
    try:
        parsed = parse_get_records_body(body, typed=typed)
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return  # not what we expect: let botocore's parser deal with it (and report it)
    customized_response_dict.update(parsed)
    response_dict["body"] = b"{}"


def _before_parse_typed(response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any) -> None:
    _before_parse(response_dict, customized_response_dict, typed=True)


def install_fast_get_records(client: Any, *, typed: bool = False) -> Any:
    """Make ``client`` (a boto3 ``dynamodbstreams`` client) return GetRecords records as raw JSON
    dicts parsed by orjson (``typed``: read by msgspec, see :func:`parse_get_records_body`).
    Idempotent, and the first registration wins (one handler per client); returns the client."""
    client.meta.events.register(_EVENT, _before_parse_typed if typed else _before_parse, unique_id=_UNIQUE_ID)
    return client

