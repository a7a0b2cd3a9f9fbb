"""End-state checks of a run: OpenSearch mirrors the table, S3 audits every change once, Redis keys are gone.

Used by ``ddb-cdc demo`` (its closing checks) and by the end-to-end tests. The truth is read
independently of the worker: the table by a consistent Scan, the changes by reading the stream
from TRIM_HORIZON with plain boto3 calls.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable, Mapping

from connectors.opensearch.sink import restore_document
from pipeline.codec import decode_record
from pipeline.events import ChangeEvent


@dataclass
class CheckResult:
    """One check: ``name``, ``ok``, a one-line ``summary`` and up to 20 ``problems``."""

    name: str
    ok: bool
    summary: str
    problems: list[str] = field(default_factory=list)


def read_stream_events(streams_client: Any, stream_arn: str, table: str) -> list[ChangeEvent]:
    """Every record in the stream (all shards, TRIM_HORIZON to now), decoded, in shard order."""
    events: list[ChangeEvent] = []
    desc = streams_client.describe_stream(StreamArn=stream_arn)["StreamDescription"]
    shards = list(desc.get("Shards", []))
    while desc.get("LastEvaluatedShardId"):
        desc = streams_client.describe_stream(StreamArn=stream_arn,
                                              ExclusiveStartShardId=desc["LastEvaluatedShardId"])["StreamDescription"]
        shards.extend(desc.get("Shards", []))
    for shard in shards:
        it = streams_client.get_shard_iterator(StreamArn=stream_arn, ShardId=shard["ShardId"],
                                               ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            resp = streams_client.get_records(ShardIterator=it, Limit=1000)
            events.extend(decode_record(r, table=table, stream_arn=stream_arn, shard_id=shard["ShardId"])
                          for r in resp.get("Records", []))
            if not resp.get("Records"):
                break  # an open shard has no end; an empty read means we are caught up
            it = resp.get("NextShardIterator")
    return events


def values_match(expected: Any, actual: Any) -> bool:
    """Does a document value (plain JSON rendering) hold exactly the DynamoDB value?

    Decimal ↔ JSON number or exact decimal string; bytes ↔ base64 text; sets ↔ lists with the
    same members; maps and lists recursively; everything else by equality.
    """
    if isinstance(expected, bool) or expected is None:
        return actual is expected or actual == expected and type(actual) is type(expected)
    if isinstance(expected, Decimal):
        if isinstance(actual, bool) or not isinstance(actual, (int, float, Decimal, str)):
            return False
        if isinstance(actual, float):
            return False  # a float would mean precision was lost somewhere
        try:
            return Decimal(str(actual)) == expected
        except ArithmeticError:
            return False
    if isinstance(expected, (bytes, bytearray)):
        return isinstance(actual, str) and base64.b64decode(actual) == bytes(expected)
    if isinstance(expected, (set, frozenset)):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return False
        remaining = list(expected)
        for value in actual:
            match = next((i for i, e in enumerate(remaining) if values_match(e, value)), None)
            if match is None:
                return False
            remaining.pop(match)
        return True
    if isinstance(expected, Mapping):
        return (isinstance(actual, Mapping) and set(expected) == set(actual)
                and all(values_match(expected[k], actual[k]) for k in expected))
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(values_match(e, a) for e, a in zip(expected, actual)))
    return expected == actual


def check_opensearch(os_url: str, index: str, items: list[dict[str, Any]], key_id_of) -> CheckResult:
    """The index holds exactly ``items`` (by ``key_id_of(item)`` as ``_id``), content-equal, numbers exact.

    Documents are read as raw JSON and parsed with Decimal for non-integers, so no float
    rounding hides a difference.
    """
    import urllib.request

    def get(path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{os_url.rstrip('/')}{path}", data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read(), parse_float=Decimal)

    try:
        urllib.request.urlopen(urllib.request.Request(f"{os_url.rstrip('/')}/{index}/_refresh", method="POST"),
                               timeout=60).read()
    except Exception:
        pass
    result = get(f"/{index}/_search", {"size": 10000, "query": {"match_all": {}}})
    hits = {h["_id"]: h["_source"] for h in result["hits"]["hits"]}
    problems: list[str] = []
    expected_ids = set()
    for item in items:
        doc_id = key_id_of(item)
        expected_ids.add(doc_id)
        source = hits.get(doc_id)
        if source is None:
            problems.append(f"missing document {doc_id!r}")
            continue
        source = restore_document(source)  # undo the sink's name escaping and deep-map flattening
        if not values_match(item, source):
            diff = sorted(k for k in set(item) | set(source) if not values_match(item.get(k), source.get(k)))
            problems.append(f"document {doc_id!r} differs in {diff}")
    extra = set(hits) - expected_ids
    problems.extend(f"document {doc_id!r} is not in the table" for doc_id in sorted(extra))
    ok = not problems
    return CheckResult("opensearch", ok,
                       f"{len(hits)} documents for {len(items)} table items" + ("" if ok else f", {len(problems)} problems"),
                       problems[:20])


def check_s3_audit(audit_lines: Iterable[Mapping[str, Any]], events: list[ChangeEvent]) -> CheckResult:
    """Every stream sequence number appears in the audit log, none that is not in the stream,
    and any repeated line is identical to the first (an identical rewrite)."""
    from pipeline.render import event_to_record_dict

    seen: dict[str, Mapping[str, Any]] = {}
    problems: list[str] = []
    lines = 0
    for line in audit_lines:
        lines += 1
        seq = line["source"]["sequence_number"]
        if seq in seen and seen[seq] != line:
            problems.append(f"sequence number {seq} appears twice with different content")
        seen.setdefault(seq, line)
    expected = {ev.sequence_number: ev for ev in events}
    missing = sorted(set(expected) - set(seen), key=int)
    unknown = sorted(set(seen) - set(expected), key=int)
    problems.extend(f"sequence number {s} missing from the audit log" for s in missing[:10])
    problems.extend(f"sequence number {s} in the audit log but not in the stream" for s in unknown[:10])
    for seq, ev in expected.items():
        if seq in seen and dict(seen[seq]) != event_to_record_dict(ev):
            problems.append(f"audit line of {seq} does not equal the stream record")
            break
    ok = not problems
    return CheckResult("s3_audit", ok,
                       f"{len(seen)} distinct sequence numbers in {lines} lines for {len(expected)} changes",
                       problems[:20])


def check_redis(redis_client: Any, keys: Iterable[str], sentinel_key: str | None = None) -> CheckResult:
    """None of ``keys`` exists any more; ``sentinel_key`` (not derived from any change) still does."""
    keys = sorted(set(keys))
    present = [k for k in keys if redis_client.exists(k)]
    problems = [f"cache key {k!r} was not invalidated" for k in present[:20]]
    if sentinel_key is not None and not redis_client.exists(sentinel_key):
        problems.append(f"unrelated key {sentinel_key!r} was deleted")
    ok = not problems
    return CheckResult("redis", ok, f"{len(keys) - len(present)} of {len(keys)} cache keys invalidated", problems)
