"""OpenSearchSink against a real OpenSearch-compatible server (osmem-server).

Where the server cannot produce a failure (throttled items, 401, timeouts), a thin proxy around
the real client injects it at the opensearch-py boundary — in addition to, never instead of, the
real-server tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import threading
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from pydantic import ValidationError

from connectors.opensearch.sink import MAX_ID_BYTES, OpenSearchSink, document_id
from pipeline.awsconfig import AwsConfig
from pipeline.codec import decode_record
from pipeline.errors import FatalSinkError, PartialSinkError, RetriableSinkError
from pipeline.events import Batch, ChangeEvent
from pipeline.sink import SinkContext

STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/Orders/stream/2024-05-01T00:00:00.000"
SHARD_ID = "shardId-00000001714521600000-abcdef01"
T0 = 1_714_521_600  # 2024-05-01T00:00:00Z


# --------------------------------------------------------------------------------------------
# Server fixture. The lead will move this to conftest.py as the shared ``opensearch_server``
# fixture (an object with ``.url``); then delete this one and nothing else changes.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opensearch_server():
    """An in-memory OpenSearch-compatible server for this module (``.url``)."""
    try:
        from osmem_server import OsmemServer

        server = OsmemServer.start(japanese=False, freeze=False)
    except Exception as exc:  # pragma: no cover - depends on the machine
        message = f"cannot start osmem-server: {type(exc).__name__}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield server
    server.close()


@pytest.fixture
def url(opensearch_server) -> str:
    return opensearch_server.url


@pytest.fixture
def table() -> str:
    """A fresh table name per test, so every test has its own index (``cdc-<table lower>``)."""
    return f"Orders_{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_event(
    table: str,
    name: str,
    keys: dict[str, Any],
    *,
    seq: int,
    t: int = T0,
    new: dict[str, Any] | None = None,
    old: dict[str, Any] | None = None,
    view: str = "NEW_AND_OLD_IMAGES",
) -> ChangeEvent:
    """Decode a hand-built stream record (DynamoDB JSON shape) into a ChangeEvent."""
    body: dict[str, Any] = {
        "Keys": keys,
        "SequenceNumber": str(10**20 + seq),
        "SizeBytes": 100,
        "StreamViewType": view,
        "ApproximateCreationDateTime": t,
    }
    if new is not None:
        body["NewImage"] = new
    if old is not None:
        body["OldImage"] = old
    record = {"eventID": uuid.uuid4().hex, "eventName": name, "dynamodb": body}
    return decode_record(record, table=table, stream_arn=STREAM_ARN, shard_id=SHARD_ID)


def item(pk: str, **attrs: Any) -> dict[str, Any]:
    """A NewImage with key ``pk`` and the given AttributeValues."""
    return {"pk": {"S": pk}, **attrs}


def batch(table: str, *events: ChangeEvent) -> Batch:
    return Batch(table, STREAM_ARN, SHARD_ID, events=tuple(events),
                 checkpoint_sequence_number=events[-1].sequence_number if events else None)


def context(aws: AwsConfig | None = None) -> SinkContext:
    return SinkContext(sink_name="search", worker_id="w1", logger=logging.getLogger("test"), aws=aws)


def open_sink(url: str, **options: Any) -> OpenSearchSink:
    options.setdefault("index", "cdc-{table}")
    options.setdefault("mapping", "dynamic")  # this file checks the plain rendering of _source
    options.setdefault("refresh", True)
    options.setdefault("retry_backoff_s", 0)
    # this file checks the order of bulk bodies: one request at a time, unless a test asks for more
    # (test_concurrent_bulks_end_with_every_document_at_its_last_version)
    options.setdefault("max_bulk_in_flight", 1)
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=[url], **options))
    sink.open(context())
    return sink


def index_of(table: str) -> str:
    return f"cdc-{table}".lower()


def get_doc(url: str, table: str, doc_id: str) -> dict[str, Any] | None:
    """GET the raw document; numbers parsed exactly (floats as Decimal). None when missing."""
    req = urllib.request.Request(f"{url}/{index_of(table)}/_doc/{quote(doc_id, safe='')}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = json.loads(resp.read(), parse_float=Decimal)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return data if data.get("found") else None


def all_docs(url: str, table: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """{_id: (_version, _source)} of every document of the table's index."""
    body = json.dumps({"query": {"match_all": {}}, "size": 1000, "version": True}).encode()
    req = urllib.request.Request(f"{url}/{index_of(table)}/_search", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        data = json.loads(resp.read(), parse_float=Decimal)
    return {h["_id"]: (h.get("_version"), h["_source"]) for h in data["hits"]["hits"]}


def bulk_actions(body: bytes) -> list[tuple[str, str]]:
    """(kind, _id) of every action in an NDJSON bulk body, in order."""
    lines = body.split(b"\n")
    assert lines[-1] == b"", "bulk body must end with a newline"
    out, i = [], 0
    while i < len(lines) - 1:
        action = orjson.loads(lines[i])
        ((kind, meta),) = action.items()
        out.append((kind, meta["_id"]))
        i += 2 if kind == "index" else 1
    return out


class RecordingClient:
    """Wraps the real client; records every bulk body, forwards everything."""

    def __init__(self, client: Any):
        self._client = client
        self.bodies: list[bytes] = []

    def bulk(self, *, body: bytes, **kwargs: Any) -> Any:
        self.bodies.append(body)
        return self._client.bulk(body=body, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class FlakyItemsClient(RecordingClient):
    """Fails chosen documents' items with injected statuses (one per attempt), as a throttled
    cluster would: those actions are NOT forwarded, and their response items are error objects."""

    def __init__(self, client: Any, failures: dict[str, list[int]]):
        super().__init__(client)
        self.failures = {k: list(v) for k, v in failures.items()}

    def bulk(self, *, body: bytes, **kwargs: Any) -> Any:
        self.bodies.append(body)
        lines = body.split(b"\n")[:-1]
        groups, i = [], 0
        while i < len(lines):
            kind = next(iter(orjson.loads(lines[i])))
            n = 2 if kind == "index" else 1
            groups.append((kind, orjson.loads(lines[i])[kind]["_id"], lines[i:i + n]))
            i += n
        injected: dict[int, dict[str, Any]] = {}
        forward: list[bytes] = []
        for pos, (kind, doc_id, group) in enumerate(groups):
            statuses = self.failures.get(doc_id)
            if statuses:
                status = statuses.pop(0)
                err = "es_rejected_execution_exception" if status == 429 else "unavailable_shards_exception"
                injected[pos] = {kind: {"_id": doc_id, "status": status, "error": {"type": err, "reason": "injected"}}}
            else:
                forward.extend(group)
        real_items = []
        if forward:
            real_items = self._client.bulk(body=b"\n".join(forward) + b"\n", **kwargs)["items"]
        it = iter(real_items)
        items = [injected[pos] if pos in injected else next(it) for pos in range(len(groups))]
        return {"took": 1, "errors": True, "items": items}


class RaisingClient(RecordingClient):
    """Every bulk request fails as a whole with ``exc``."""

    def __init__(self, client: Any, exc: Exception):
        super().__init__(client)
        self.exc = exc

    def bulk(self, *, body: bytes, **kwargs: Any) -> Any:
        self.bodies.append(body)
        raise self.exc


RICH_IMAGE = item(
    "user#1",
    small={"N": "42"},
    neg={"N": "-7"},
    big64={"N": "9007199254740993"},  # 2**53 + 1: a float would round it
    dec={"N": "1.5"},
    tenth={"N": "0.1"},
    n38={"N": "12345678901234567890123456789012345678"},
    precise={"N": "3.14159265358979323846"},
    bin={"B": b64(b"\x00\x01\xffhello")},
    ss={"SS": ["pear", "apple", "fig"]},
    ns={"NS": ["10", "2", "-3"]},  # homogeneous: [1, 1.5] in one new field is a mapping conflict
    bs={"BS": [b64(b"b"), b64(b"a")]},
    nested={"M": {
        "name": {"S": "ünïcødé 日本語 🚀"},
        "rows": {"L": [{"M": {"qty": {"N": "1"}, "ok": {"BOOL": True}}}, {"M": {"qty": {"N": "2"}, "ok": {"BOOL": False}}}]},
        "tags": {"L": [{"S": "a"}, {"S": "b"}]},
    }},
    flag={"BOOL": False},
    nothing={"NULL": True},
)


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_insert_modify_remove_round_trip(url, table):
    sink = open_sink(url)
    try:
        ins = make_event(table, "INSERT", {"pk": {"S": "user#1"}}, seq=1, t=T0, new=RICH_IMAGE)
        sink.write(batch(table, ins))
        sink.flush()

        doc = get_doc(url, table, "user#1")
        assert doc is not None
        assert doc["_version"] == ins.version
        src = doc["_source"]
        assert src["pk"] == "user#1"
        assert src["small"] == 42 and src["neg"] == -7
        assert src["big64"] == 9007199254740993 and isinstance(src["big64"], int)
        assert src["dec"] == Decimal("1.5") and src["tenth"] == Decimal("0.1")
        assert src["n38"] == "12345678901234567890123456789012345678"
        assert src["precise"] == "3.14159265358979323846"
        assert src["bin"] == b64(b"\x00\x01\xffhello")
        assert src["ss"] == ["apple", "fig", "pear"]
        assert src["ns"] == [-3, 2, 10]
        assert src["bs"] == [b64(b"a"), b64(b"b")]
        assert src["nested"] == {
            "name": "ünïcødé 日本語 🚀",
            "rows": [{"qty": 1, "ok": True}, {"qty": 2, "ok": False}],
            "tags": ["a", "b"],
        }
        assert src["flag"] is False and src["nothing"] is None
        assert src["_cdc"] == {
            "sequence_number": ins.sequence_number,
            "shard_id": SHARD_ID,
            "stream_arn": STREAM_ARN,
            "table": table,
            "event_time": "2024-05-01T00:00:00Z",
            "operation": "INSERT",
            "version": ins.version,
        }

        new_image = dict(RICH_IMAGE)
        del new_image["small"]
        new_image["dec"] = {"N": "2.25"}
        mod = make_event(table, "MODIFY", {"pk": {"S": "user#1"}}, seq=2, t=T0 + 5, new=new_image, old=RICH_IMAGE)
        sink.write(batch(table, mod))
        doc = get_doc(url, table, "user#1")
        assert doc["_version"] == mod.version > ins.version
        assert "small" not in doc["_source"]
        assert doc["_source"]["dec"] == Decimal("2.25")
        assert doc["_source"]["_cdc"]["operation"] == "MODIFY"
        assert doc["_source"]["_cdc"]["event_time"] == "2024-05-01T00:00:05Z"

        rem = make_event(table, "REMOVE", {"pk": {"S": "user#1"}}, seq=3, t=T0 + 6, old=new_image)
        sink.write(batch(table, rem))
        assert get_doc(url, table, "user#1") is None
    finally:
        sink.close()
    assert sink.client is None


def test_composite_key_and_numeric_key_ids(url, table):
    sink = open_sink(url)
    try:
        ev = make_event(table, "INSERT", {"pk": {"S": "a|b"}, "sk": {"N": "7"}}, seq=1,
                        new={"pk": {"S": "a|b"}, "sk": {"N": "7"}, "v": {"S": "x"}})
        sink.write(batch(table, ev))
        assert ev.key_id == "a\\|b|7"
        doc = get_doc(url, table, ev.key_id)
        assert doc is not None and doc["_source"]["sk"] == 7
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# Versioning: older never overwrites newer; idempotency
# --------------------------------------------------------------------------------------------


def test_older_version_after_newer_is_ignored(url, table):
    sink = open_sink(url)
    try:
        key = {"pk": {"S": "k"}}
        newer = make_event(table, "MODIFY", key, seq=20, t=T0 + 10, new=item("k", v={"S": "new"}))
        older_same_second = make_event(table, "INSERT", key, seq=10, t=T0 + 10, new=item("k", v={"S": "old"}))
        older_second = make_event(table, "MODIFY", key, seq=30, t=T0 + 9, new=item("k", v={"S": "older"}))
        assert older_same_second.version < newer.version and older_second.version < newer.version

        sink.write(batch(table, newer))
        sink.write(batch(table, older_same_second))  # must not raise
        sink.write(batch(table, older_second))
        # and out of order inside one batch
        sink.write(batch(table, older_second, newer, older_same_second))

        doc = get_doc(url, table, "k")
        assert doc["_source"]["v"] == "new"
        assert doc["_version"] == newer.version
        assert doc["_source"]["_cdc"]["sequence_number"] == newer.sequence_number
    finally:
        sink.close()


def test_delete_then_stale_index_does_not_resurrect(url, table):
    sink = open_sink(url)
    try:
        key = {"pk": {"S": "gone"}}
        ins = make_event(table, "INSERT", key, seq=1, t=T0, new=item("gone", v={"N": "1"}))
        mod = make_event(table, "MODIFY", key, seq=2, t=T0 + 1, new=item("gone", v={"N": "2"}))
        rem = make_event(table, "REMOVE", key, seq=3, t=T0 + 2, old=item("gone", v={"N": "2"}))
        sink.write(batch(table, ins))
        sink.write(batch(table, rem))
        assert get_doc(url, table, "gone") is None
        # a replay of older changes arrives after the delete
        sink.write(batch(table, ins, mod))
        assert get_doc(url, table, "gone") is None
        # deleting again (and deleting something that never existed) is a success
        never = make_event(table, "REMOVE", {"pk": {"S": "never"}}, seq=4, t=T0 + 3, old=item("never"))
        sink.write(batch(table, rem, never))
        assert get_doc(url, table, "never") is None
    finally:
        sink.close()


def test_same_batch_twice_gives_same_end_state(url, table):
    sink = open_sink(url)
    try:
        b = batch(
            table,
            make_event(table, "INSERT", {"pk": {"S": "a"}}, seq=1, new=item("a", n={"N": "1"})),
            make_event(table, "INSERT", {"pk": {"S": "b"}}, seq=2, new=item("b", n={"N": "2"})),
            make_event(table, "MODIFY", {"pk": {"S": "a"}}, seq=3, t=T0 + 1, new=item("a", n={"N": "3"})),
            make_event(table, "INSERT", {"pk": {"S": "c"}}, seq=4, t=T0 + 1, new=item("c")),
            make_event(table, "REMOVE", {"pk": {"S": "c"}}, seq=5, t=T0 + 2, old=item("c")),
        )
        sink.write(b)
        first = all_docs(url, table)
        sink.write(b)
        second = all_docs(url, table)
        assert first == second
        assert set(first) == {"a", "b"}
        assert first["a"][1]["n"] == 3 and first["b"][1]["n"] == 2
        assert first["a"][0] == b.events[2].version
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# Per-item failures
# --------------------------------------------------------------------------------------------


def test_mapping_conflict_is_permanent_for_that_event_only(url, table):
    sink = open_sink(url)
    try:
        ok1 = make_event(table, "INSERT", {"pk": {"S": "a"}}, seq=1, new=item("a", f={"N": "1"}))
        bad = make_event(table, "INSERT", {"pk": {"S": "b"}}, seq=2, new=item("b", f={"M": {"x": {"N": "1"}}}))
        ok2 = make_event(table, "INSERT", {"pk": {"S": "c"}}, seq=3, new=item("c", f={"N": "2"}))
        with pytest.raises(PartialSinkError) as info:
            sink.write(batch(table, ok1, bad, ok2))
        err = info.value
        assert err.retriable == []
        assert [e for e, _ in err.permanent] == [bad]
        assert "mapper_parsing_exception" in err.permanent[0][1]
        assert "\n" not in str(err) and "1 of 3 events failed" in str(err)
        assert get_doc(url, table, "a")["_source"]["f"] == 1
        assert get_doc(url, table, "c")["_source"]["f"] == 2
        assert get_doc(url, table, "b") is None
    finally:
        sink.close()


def test_throttled_item_is_resent_and_succeeds(url, table):
    sink = open_sink(url, max_retries=2)
    flaky = FlakyItemsClient(sink.client, {"b": [429]})
    sink.client = flaky
    try:
        events = [make_event(table, "INSERT", {"pk": {"S": k}}, seq=i, new=item(k)) for i, k in enumerate("abc", 1)]
        sink.write(batch(table, *events))
        assert [bulk_actions(b) for b in flaky.bodies] == [
            [("index", "a"), ("index", "b"), ("index", "c")],
            [("index", "b")],
        ]
        assert set(all_docs(url, table)) == {"a", "b", "c"}
    finally:
        sink.close()


def test_items_still_failing_are_reported_retriable_and_permanent(url, table):
    sink = open_sink(url, max_retries=1)
    flaky = FlakyItemsClient(sink.client, {"b": [503, 503, 503], "d": [429, 429]})
    sink.client = flaky
    try:
        a = make_event(table, "INSERT", {"pk": {"S": "a"}}, seq=1, new=item("a", f={"N": "1"}))
        b = make_event(table, "INSERT", {"pk": {"S": "b"}}, seq=2, new=item("b"))
        c = make_event(table, "INSERT", {"pk": {"S": "c"}}, seq=3, new=item("c", f={"S": "not a number"}))
        d = make_event(table, "REMOVE", {"pk": {"S": "d"}}, seq=4, old=item("d"))
        with pytest.raises(PartialSinkError) as info:
            sink.write(batch(table, a, b, c, d))
        err = info.value
        assert [e for e, _ in err.retriable] == [b, d]
        assert err.retriable[0][1].startswith("503 ") and err.retriable[1][1].startswith("429 ")
        assert [e for e, _ in err.permanent] == [c]
        assert len(flaky.bodies) == 2  # first attempt + max_retries=1 re-send of b and d only
        assert bulk_actions(flaky.bodies[1]) == [("index", "b"), ("delete", "d")]
        assert set(all_docs(url, table)) == {"a"}
    finally:
        sink.close()


def test_whole_request_400_is_narrowed_to_the_offending_event(url, table):
    from opensearchpy.exceptions import RequestError

    sink = open_sink(url)
    real = sink.client

    class PoisonClient(RecordingClient):
        def bulk(self, *, body: bytes, **kwargs: Any) -> Any:
            self.bodies.append(body)
            if any(doc_id == "poison" for _, doc_id in bulk_actions(body)):
                raise RequestError(400, "action_request_validation_exception",
                                   {"error": {"type": "action_request_validation_exception", "reason": "bad"}})
            return real.bulk(body=body, **kwargs)

    sink.client = PoisonClient(real)
    try:
        events = [make_event(table, "INSERT", {"pk": {"S": k}}, seq=i, new=item(k))
                  for i, k in enumerate(["a", "poison", "c"], 1)]
        with pytest.raises(PartialSinkError) as info:
            sink.write(batch(table, *events))
        assert [e for e, _ in info.value.permanent] == [events[1]]
        assert "action_request_validation_exception" in info.value.permanent[0][1]
        assert info.value.retriable == []
        assert set(all_docs(url, table)) == {"a", "c"}
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# Whole-request failures
# --------------------------------------------------------------------------------------------


def _transport_errors():
    from opensearchpy.exceptions import (AuthenticationException, AuthorizationException, ConnectionError,
                                         ConnectionTimeout, TransportError)

    return [
        (AuthenticationException(401, "security_exception", {"error": {"type": "security_exception", "reason": "no"}}),
         FatalSinkError, "credentials"),
        (AuthorizationException(403, "security_exception", {"error": {"type": "security_exception", "reason": "no"}}),
         FatalSinkError, "credentials"),
        (TransportError(413, "request entity too large", None), FatalSinkError, "max_bulk_bytes"),
        (TransportError(429, "too_many_requests", None), RetriableSinkError, "429"),
        (TransportError(503, "unavailable", None), RetriableSinkError, "503"),
        (ConnectionError("N/A", "refused", OSError("Connection refused")), RetriableSinkError, "cannot connect"),
        (ConnectionTimeout("TIMEOUT", "timed out", TimeoutError("read timed out")), RetriableSinkError, "timeout"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_whole_request_errors_are_classified(url, table, index):
    exc, expected, words = _transport_errors()[index]
    sink = open_sink(url)
    sink.client = RaisingClient(sink.client, exc)
    try:
        ev = make_event(table, "INSERT", {"pk": {"S": "a"}}, seq=1, new=item("a"))
        with pytest.raises(expected) as info:
            sink.write(batch(table, ev))
        assert type(info.value) is expected
        message = str(info.value)
        assert words in message and url.split("//")[1] in message and "\n" not in message
    finally:
        sink.close()


def test_unreachable_host_is_fatal_at_open():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=[f"http://127.0.0.1:{port}"], max_retries=0, timeout_s=3))
    with pytest.raises(FatalSinkError) as info:
        sink.open(context())
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    assert "'search'" in message
    assert sink.client is None


def test_write_before_open_is_fatal(table):
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=["http://127.0.0.1:9"]))
    ev = make_event(table, "INSERT", {"pk": {"S": "a"}}, seq=1, new=item("a"))
    with pytest.raises(FatalSinkError, match="before open"):
        sink.write(batch(table, ev))


def test_keys_only_stream_indexes_keys_only_documents(url, table):
    sink = open_sink(url)
    try:
        keys = {"pk": {"S": "a"}, "sk": {"N": "7"}}
        ins = make_event(table, "INSERT", keys, seq=1, view="KEYS_ONLY")
        mod = make_event(table, "MODIFY", {"pk": {"S": "b"}, "sk": {"N": "1"}}, seq=2, view="OLD_IMAGE",
                         old={"pk": {"S": "b"}, "sk": {"N": "1"}, "v": {"S": "old"}})
        sink.write(batch(table, ins, mod))
        doc = get_doc(url, table, ins.key_id)["_source"]
        assert {k: v for k, v in doc.items() if k != "_cdc"} == {"pk": "a", "sk": 7}
        assert doc["_cdc"]["image"] == "keys_only" and doc["_cdc"]["operation"] == "INSERT"
        assert get_doc(url, table, mod.key_id)["_source"]["_cdc"]["image"] == "keys_only"
        rem = make_event(table, "REMOVE", keys, seq=3, t=T0 + 1, view="KEYS_ONLY")
        sink.write(batch(table, rem))
        assert get_doc(url, table, ins.key_id) is None
    finally:
        sink.close()


@pytest.mark.parametrize("view", ["NEW_IMAGE", "NEW_AND_OLD_IMAGES", ""])
def test_missing_new_image_is_permanent_for_that_event_only(url, table, view):
    sink = open_sink(url)
    try:
        bad = make_event(table, "MODIFY", {"pk": {"S": "a"}}, seq=1, view=view)
        ok = make_event(table, "INSERT", {"pk": {"S": "b"}}, seq=2, view=view, new=item("b"))
        with pytest.raises(PartialSinkError) as info:
            sink.write(batch(table, bad, ok))
        assert info.value.retriable == [] and [e for e, _ in info.value.permanent] == [bad]
        assert "stream has no new image: use NEW_IMAGE or NEW_AND_OLD_IMAGES" in info.value.permanent[0][1]
        assert get_doc(url, table, "b") is not None and get_doc(url, table, "a") is None
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# Attribute names and depth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "top", "escaped"), [
    ("plain", True, "plain"),
    ("ключ 🚀", True, "ключ 🚀"),
    ("_id", True, "_ddb_id"),
    ("_id", False, "_id"),
    ("_source", True, "_ddb_source"),
    ("_cdc", True, "_ddb_cdc"),
    ("_foo", True, "_foo"),
    ("", True, "_ddb"),
    ("", False, "_ddb"),
    ("  ", False, "_ddb  "),
    ("a.b", False, "_ddba%2Eb"),
    (".", True, "_ddb%2E"),
    ("50%.x", True, "_ddb50%25%2Ex"),
    ("50%", True, "50%"),
    ("_ddb", True, "_ddb_ddb"),
    ("_ddbx", False, "_ddb_ddbx"),
    ("_ddj", True, "_ddb_ddj"),
    ("_dd", True, "_ddb_dd"),
    ("_ddb%2E", True, "_ddb_ddb%252E"),
])
def test_field_name_escaping_is_reversible(name, top, escaped):
    from connectors.opensearch.sink import escape_field_name, unescape_field_name

    assert escape_field_name(name, top_level=top) == escaped
    assert unescape_field_name(escaped) == name


HOSTILE_NAMES_IMAGE = item(
    "h",
    _id={"S": "not the id"},
    _source={"S": "not the source"},
    _index={"N": "1"},
    _routing={"S": "r"},
    _version={"N": "2"},
    _seq_no={"N": "3"},
    _cdc={"S": "the item's own _cdc"},
    _ddbx={"S": "looks escaped"},
    **{
        "": {"S": "empty name"},
        ".": {"S": "only a dot"},
        "a": {"N": "1"},
        "a.b": {"N": "2"},
        "a.b.c": {"M": {"x.y": {"S": "dotted inside"}, "": {"BOOL": True}, "_id": {"S": "nested _id"}}},
        "ключ 🚀": {"L": [{"M": {"_source": {"S": "in a list"}, "k.k": {"NULL": True}}}]},
    },
)


def test_hostile_attribute_names_are_indexed_and_restored(url, table):
    from connectors.opensearch.sink import restore_document

    sink = open_sink(url)
    try:
        ev = make_event(table, "INSERT", {"pk": {"S": "h"}}, seq=1, new=HOSTILE_NAMES_IMAGE)
        sink.write(batch(table, ev))
        src = get_doc(url, table, "h")["_source"]
        assert src["_ddb_id"] == "not the id" and src["_ddb_cdc"] == "the item's own _cdc"
        assert src["_ddba%2Eb"] == 2 and src["a"] == 1 and src["_ddb"] == "empty name"
        assert src["_cdc"]["sequence_number"] == ev.sequence_number
        restored = restore_document(src)
        from pipeline.render import to_plain
        assert restored == to_plain(ev.after)
    finally:
        sink.close()


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": {"S": "bottom"}}
    for i in range(levels):
        value = {"M": {f"l{i}": value, "n": {"N": str(i)}}} if i else {"M": value}
    return value


@pytest.mark.parametrize("levels", [19, 20, 32])
def test_deep_maps_are_flattened_below_the_depth_limit(url, table, levels):
    from connectors.opensearch.sink import restore_document
    from pipeline.render import to_plain

    sink = open_sink(url)
    try:
        ev = make_event(table, "INSERT", {"pk": {"S": "d"}}, seq=1,
                        new=item("d", deep=_nested(levels), lst={"L": [_nested(levels)]}))
        sink.write(batch(table, ev))
        src = get_doc(url, table, "d")["_source"]
        if levels <= 19:  # 19 maps in a top-level attribute: fields at depth 20, OpenSearch's default limit
            assert "deep" in src and "lst" in src
        else:
            flat = [k for k in str(src).split("'") if k.startswith("_ddj")]
            assert flat, src
        restored = restore_document(src)
        assert restored == to_plain(ev.after)
    finally:
        sink.close()


def test_depth_limit_option_moves_the_flattening_point(url, table):
    from connectors.opensearch.sink import restore_document

    sink = open_sink(url, depth_limit=3)
    try:
        ev = make_event(table, "INSERT", {"pk": {"S": "d"}}, seq=1,
                        new=item("d", m={"M": {"x": {"M": {"y": {"M": {"z": {"N": "1"}}}, "k": {"N": "2"}}}}}))
        sink.write(batch(table, ev))
        src = get_doc(url, table, "d")["_source"]
        # m (depth 1) → x (2) → y would hold fields at depth 4 > 3: y is flattened
        assert src["m"]["x"] == {"_ddjy": '{"z":1}', "k": 2}
        assert restore_document(src)["m"] == {"x": {"y": {"z": 1}, "k": 2}}
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# Bulk splitting
# --------------------------------------------------------------------------------------------


def test_bulk_split_by_max_bulk_docs_keeps_order(url, table):
    sink = open_sink(url, max_bulk_docs=3)
    rec = RecordingClient(sink.client)
    sink.client = rec
    try:
        key = {"pk": {"S": "x"}}
        events = [
            make_event(table, "INSERT", {"pk": {"S": "a"}}, seq=1, new=item("a")),
            make_event(table, "INSERT", key, seq=2, new=item("x", v={"N": "1"})),
            make_event(table, "INSERT", {"pk": {"S": "b"}}, seq=3, new=item("b")),
            make_event(table, "MODIFY", key, seq=4, new=item("x", v={"N": "2"})),
            make_event(table, "REMOVE", {"pk": {"S": "a"}}, seq=5, old=item("a")),
            make_event(table, "INSERT", {"pk": {"S": "c"}}, seq=6, new=item("c")),
            make_event(table, "MODIFY", key, seq=7, new=item("x", v={"N": "3"})),
        ]
        sink.write(batch(table, *events))
        sent = [bulk_actions(b) for b in rec.bodies]
        assert [len(s) for s in sent] == [3, 3, 1]
        assert [a for s in sent for a in s] == [
            ("index", "a"), ("index", "x"), ("index", "b"), ("index", "x"), ("delete", "a"), ("index", "c"), ("index", "x"),
        ]
        docs = all_docs(url, table)
        assert set(docs) == {"b", "c", "x"}
        assert docs["x"][1]["v"] == 3 and docs["x"][0] == events[-1].version
    finally:
        sink.close()


def test_bulk_split_by_max_bulk_bytes(url, table):
    limit = 2500
    sink = open_sink(url, max_bulk_bytes=limit)
    rec = RecordingClient(sink.client)
    sink.client = rec
    try:
        pad = {"S": "p" * 700}  # each index action (with _cdc) is ~1.15 KB: two fit in 2500 bytes, three do not
        events = [make_event(table, "INSERT", {"pk": {"S": f"d{i}"}}, seq=i, new=item(f"d{i}", pad=pad))
                  for i in range(7)]
        huge = make_event(table, "INSERT", {"pk": {"S": "huge"}}, seq=99, new=item("huge", pad={"S": "h" * 6000}))
        sink.write(batch(table, *events, huge))
        sizes = [len(b) for b in rec.bodies]
        counts = [len(bulk_actions(b)) for b in rec.bodies]
        assert counts == [2, 2, 2, 1, 1]
        assert all(size <= limit for size in sizes[:4])
        assert sizes[4] > limit  # a single action larger than the limit goes alone
        assert bulk_actions(rec.bodies[4]) == [("index", "huge")]
        docs = all_docs(url, table)
        assert set(docs) == {f"d{i}" for i in range(7)} | {"huge"}
        assert docs["huge"][1]["pad"] == "h" * 6000
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


def test_long_key_uses_hashed_id(url, table):
    long_key = "k" * 600
    edge = "é" * 256  # exactly 512 UTF-8 bytes: kept as is
    assert document_id(edge) == edge and len(edge.encode()) == MAX_ID_BYTES
    assert document_id(edge + "x").startswith("sha256:")
    expected = "sha256:" + hashlib.sha256(long_key.encode()).hexdigest()
    assert document_id(long_key) == expected

    sink = open_sink(url)
    try:
        ev_long = make_event(table, "INSERT", {"pk": {"S": long_key}}, seq=1, new=item(long_key, v={"N": "1"}))
        ev_edge = make_event(table, "INSERT", {"pk": {"S": edge}}, seq=2, new=item(edge, v={"N": "2"}))
        sink.write(batch(table, ev_long, ev_edge))
        doc = get_doc(url, table, expected)
        assert doc is not None and doc["_source"]["pk"] == long_key
        assert get_doc(url, table, edge)["_source"]["v"] == 2
        rem = make_event(table, "REMOVE", {"pk": {"S": long_key}}, seq=3, t=T0 + 1, old=item(long_key))
        sink.write(batch(table, rem))
        assert get_doc(url, table, expected) is None
    finally:
        sink.close()


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_options_defaults():
    opts = OpenSearchSink.Options(hosts=["https://search.example.com"])
    assert opts.index == "{table}" and opts.auth.type == "none"
    assert (opts.max_bulk_docs, opts.max_bulk_bytes) == (500, 5 * 1024 * 1024)
    assert opts.max_bulk_in_flight == 4
    assert opts.refresh is False and opts.verify_certs is True and opts.max_retries == 3
    sink = OpenSearchSink("s", opts)
    assert sink.index_for("My.Orders-2024") == "my.orders-2024"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"hosts": ["http://h:9200"], "auth": {"type": "basic", "username": "u"}}, "password"),
        ({"hosts": ["http://h:9200"], "auth": {"type": "basic", "username": "u", "password": ""}}, "password"),
        ({"hosts": ["http://h:9200"], "auth": {"type": "basic", "password": "p"}}, "username"),
        ({"hosts": ["http://h:9200"], "auth": {"type": "aws_sigv4", "service": "s3"}}, "service"),
        ({"hosts": ["http://h:9200"], "auth": {"type": "kerberos"}}, "auth"),
        ({"hosts": []}, "hosts"),
        ({"hosts": ["ftp://h"]}, "hosts"),
        ({"hosts": ["h:9200"]}, "hosts"),
        ({}, "hosts"),
        ({"hosts": ["http://h"], "index": "{tabel}"}, "index"),
        ({"hosts": ["http://h"], "index": "_{table}"}, "index"),
        ({"hosts": ["http://h"], "index": "a b {table}"}, "index"),
        ({"hosts": ["http://h"], "max_bulk_docs": 0}, "max_bulk_docs"),
        ({"hosts": ["http://h"], "timeout_s": 0}, "timeout_s"),
        ({"hosts": ["http://h"], "refesh": True}, "refesh"),
    ],
)
def test_options_validation_names_the_field(options, field):
    with pytest.raises(ValidationError) as info:
        OpenSearchSink.Options(**options)
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert any(field in loc for loc in locs), locs


def test_secrets_do_not_leak_into_repr_or_messages():
    opts = OpenSearchSink.Options(hosts=["http://h:9200"], auth={"type": "basic", "username": "u", "password": "hunter2"})
    assert "hunter2" not in repr(opts) and "hunter2" not in str(opts.model_dump())
    with pytest.raises(ValidationError) as info:
        OpenSearchSink.Options(hosts=["ftp://user:hunter2@h"])
    assert "hunter2" not in str(info.value) and "hosts[0]" in str(info.value)
    with pytest.raises(ValidationError) as info:
        OpenSearchSink.Options(hosts=["http://h"], auth={"type": "basic", "password": "hunter2"})
    assert "hunter2" not in str(info.value) and "username" in str(info.value)


def test_invalid_index_for_table_is_fatal():
    sink = OpenSearchSink("s", OpenSearchSink.Options(hosts=["http://h"], index="{table}"))
    with pytest.raises(FatalSinkError, match="options.index"):
        sink.index_for("-leading-dash")


def test_aws_sigv4_signs_requests(url, table):
    sink = OpenSearchSink("search", OpenSearchSink.Options(
        hosts=[url], index="cdc-{table}", refresh=True, auth={"type": "aws_sigv4", "region": "eu-west-1"}))
    aws = AwsConfig(access_key_id="AKIDEXAMPLE", secret_access_key="secret", region="us-east-1")
    sink.open(context(aws))
    try:
        from opensearchpy import AWSV4SignerAuth

        conn = sink.client.transport.connection_pool.connections[0]
        auth = conn.session.auth
        assert isinstance(auth, AWSV4SignerAuth)
        assert auth.signer.region == "eu-west-1" and auth.signer.service == "es"
        ev = make_event(table, "INSERT", {"pk": {"S": "a"}}, seq=1, new=item("a"))
        sink.write(batch(table, ev))
        assert get_doc(url, table, "a") is not None
    finally:
        sink.close()


class OverlapClient(RecordingClient):
    """Holds each of the first ``overlap`` bulk requests until that many are in flight at once
    (a barrier, 20 s timeout), so the test knows the requests really were concurrent."""

    def __init__(self, client: Any, overlap: int):
        super().__init__(client)
        self.barrier = threading.Barrier(overlap, timeout=20)
        self.calls = 0
        self._lock = threading.Lock()

    def bulk(self, *, body: bytes, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
            first = self.calls <= self.barrier.parties
        if first:
            self.barrier.wait()
        return super().bulk(body=body, **kwargs)


def test_concurrent_bulks_end_with_every_document_at_its_last_version(url, table):
    """Issue 15 item 4: many versions of the same 12 items (deletes among them), shuffled, sent
    through up to 8 concurrent bulk requests of 3 actions: OpenSearch applies them in whatever
    order the requests arrive, and external versions still leave every document at its last
    version and every item whose last change is a delete absent."""
    import random

    sink = open_sink(url, max_bulk_docs=3, max_bulk_in_flight=8)
    probe = OverlapClient(sink.client, overlap=4)
    sink.client = probe
    rng = random.Random(15)
    events, last = [], {}
    n = 0
    for _ in range(25):
        for k in range(12):
            n += 1
            key = {"pk": {"S": f"k{k}"}}
            if rng.random() < 0.25:
                event = make_event(table, "REMOVE", key, seq=n, t=T0 + n, old=item(f"k{k}", v={"N": str(n)}))
            else:
                event = make_event(table, "MODIFY", key, seq=n, t=T0 + n, new=item(f"k{k}", v={"N": str(n)}))
            events.append(event)
            last[f"k{k}"] = event
    try:
        for start in range(0, len(events), 60):
            part = events[start:start + 60]
            rng.shuffle(part)
            sink.write(batch(table, *part))
        assert sink.peak_bulks_in_flight >= 4, sink.peak_bulks_in_flight
        assert len(probe.bodies) >= 100
        docs = all_docs(url, table)
        for key, event in last.items():
            if event.op == "d":
                assert key not in docs, f"{key}: deleted last, but the index holds {docs.get(key)}"
            else:
                version, source = docs[key]
                assert version == event.version and source["v"] == int(event.after["v"]), (key, docs[key])
        assert any(ev.op == "d" for ev in last.values()) and any(ev.op != "d" for ev in last.values())
    finally:
        sink.close()
