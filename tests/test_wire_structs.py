"""The msgspec-typed read of GetRecords bodies (``pipeline.avwire``, issue 16) against the dict
path (orjson + ``decode_record``): for every body — generated wire values, canonical, not
canonical and invalid, the benchmark suite's records, hostile records — the same events, the same
decode errors, byte for byte the same S3 audit lines and typed OpenSearch documents; and the pieces
it rests on (the number-text rule, base64, the name check) against their Python originals.
"""

from __future__ import annotations

import base64
import binascii
import pickle
import re

import msgspec
import orjson
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from benchmarks import inputs
from connectors.dynamodb_streams.fastpath import parse_get_records_body
from connectors.opensearch.mapping import MappingSpec, typed_json_keeps_names
from connectors.opensearch.names import escape_field_name
from connectors.opensearch.sink import OpenSearchSink
from pipeline import avwire
from pipeline.avjson import _canonical_base64, _plain_number_text
from pipeline.avwire import WireImage
from pipeline.codec import decode_record
from pipeline.errors import DecodeError
from pipeline.render import event_to_json_line
from tests.test_hostile_records import hostile_records
from tests.test_lazy_events import nested, number_texts, wire_items, wire_values

ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-01-01T00:00:00.000"
SINK = OpenSearchSink("search", OpenSearchSink.Options(hosts=["http://127.0.0.1:1"]))
TYPED = MappingSpec.build("typed")


def _record(image, old=None, keys=None):
    data = {"ApproximateCreationDateTime": 1767225600, "Keys": keys or {"pk": {"S": "k"}},
            "SequenceNumber": "300000000000000000042", "SizeBytes": 10, "StreamViewType": "NEW_AND_OLD_IMAGES"}
    if image is not None:
        data["NewImage"] = image
    if old is not None:
        data["OldImage"] = old
    return {"eventID": "e1", "eventName": "MODIFY", "eventVersion": "1.1", "eventSource": "aws:dynamodb",
            "awsRegion": "us-east-1", "dynamodb": data}


def _outcome(record):
    """What the consumers see of one record: the event (or the read-time error), its S3 line and
    typed OpenSearch source (or the error type each raises)."""
    try:
        event = decode_record(record, table="t", stream_arn=ARN, shard_id="shardId-1", version_floor=3)
    except DecodeError as exc:
        return ("read-error", str(exc))
    out = [event.decode_error() is None, event.raw_record()]
    for render in (event_to_json_line, lambda e: SINK._render_source(e, TYPED)):
        try:
            out.append(render(event))
        except Exception as exc:  # noqa: BLE001 — the type is the outcome
            out.append(type(exc).__name__)
    return event, out


def _both(records):
    try:
        body = orjson.dumps({"Records": records, "NextShardIterator": "it"})
    except TypeError:  # raw bytes (boto3's B): not a body GetRecords sends
        assume(False)
    dict_path = [_outcome(r) for r in orjson.loads(body)["Records"]]
    fast = parse_get_records_body(body, typed=True)
    assert fast["NextShardIterator"] == "it"
    return dict_path, [_outcome(r) for r in fast["Records"]], fast


def test_read_path_auto_picks_the_typed_read_only_when_every_sink_renders_the_wire_form():
    from connectors.app.wiring import resolve_read_path
    from connectors.redis_cache import RedisCacheSink
    from connectors.s3.audit import S3AuditSink
    from pipeline.sink import Sink

    s3 = S3AuditSink("audit", S3AuditSink.Options(bucket="b"))
    redis = RedisCacheSink("cache", RedisCacheSink.Options(url="redis://127.0.0.1:1/0", key_templates=["k:{pk}"]))
    explicit = OpenSearchSink("search", OpenSearchSink.Options(hosts=["http://127.0.0.1:1"], fields={"a": "keyword"}))
    assert resolve_read_path("auto", [s3, SINK, redis]) == "typed"
    assert resolve_read_path("auto", [s3, explicit]) == "fast"  # explicit mapping decodes images
    assert resolve_read_path("auto", [s3, Sink("plugin")]) == "fast"  # a plugin may decode
    assert resolve_read_path("auto", []) == "fast" and resolve_read_path("boto3", [s3]) == "boto3"


def _assert_same(records):
    dict_path, fast_path, fast = _both(records)
    for (a_event, a_out), (b_event, b_out) in zip(dict_path, fast_path):
        assert a_event == b_event
        if a_event != "read-error":
            assert a_out[0] == b_out[0]
            assert a_out[2:] == b_out[2:]  # the S3 line and the typed document, byte for byte
            assert a_out[1] == b_out[1]  # the raw record (a dead letter's content) too
            again = decode_record(b_out[1], table="t", stream_arn=ARN, shard_id="shardId-1", version_floor=3)
            assert again == a_event
        else:
            assert a_out == b_out
    return fast


@settings(max_examples=500, deadline=None)
@given(wire_items, wire_items)
@example({"deep": nested(32)}, {})
@example({"deep": nested(33)}, {"deep": nested(34, "L")})
@example({"m": {"M": {"x.y": {"N": "1.50"}, "_id": {"NULL": False}}}}, {"e": {}})
@example({"ss": {"SS": ["b", "a", "b"]}, "ns": {"NS": ["2", "1.0", "1"]}}, {"bs": {"BS": ["QQ==", "QR==", "AA=="]}})
@example({"two": {"S": "a", "N": "1"}, "ml": {"M": {}, "L": []}}, {"S": {"M": {"N": {"S": "x"}}}})
@example({"n": {"N": "0.0000000060199"}, "e": {"N": "1e2"}, "z": {"N": "007"}}, {"big": {"N": "1" * 39}})
@example({}, {"pk": {"M": {"a": {"S": ""}, "M": {}}}})  # an attribute named M holding {}: not an empty map
@example({"L": {"L": [{}, {"NULL": True}, {"M": {"": {"S": ""}, " ": {"BOOL": True}}}]}}, {"_cdc": {"S": "x"}})
def test_the_typed_read_gives_what_the_dict_path_gives(new, old):
    _assert_same([_record(new, old or None)])


@pytest.mark.parametrize("what,record", hostile_records(deep=40), ids=[w for w, _ in hostile_records(deep=40)])
def test_hostile_records_read_alike(what, record):
    try:
        orjson.dumps(record)
    except TypeError:
        pytest.skip("not JSON: no body carries it")
    _assert_same([record])


def test_the_suite_records_take_the_typed_read_and_render_alike():
    records = inputs.make_records(1000) + inputs.make_records(300, shard_no=3, seed=11)
    fast = _assert_same(records)
    images = [r["dynamodb"][p] for r in fast["Records"] for p in ("NewImage", "OldImage") if p in r["dynamodb"]]
    assert images and all(type(image) is WireImage for image in images)
    assert all(image.canonical_json() is not None for image in images)  # none needed the dict path


def test_a_body_the_schema_refuses_is_read_by_orjson():
    body = orjson.dumps({"Records": [_record({"a": {"X": "unknown tag"}})]})
    with pytest.raises(msgspec.ValidationError):
        avwire.parse_get_records(body)
    record = parse_get_records_body(body, typed=True)["Records"][0]
    assert type(record["dynamodb"]["NewImage"]) is dict


def test_wire_images_are_read_only_mappings_that_pickle_as_dicts():
    image = parse_get_records_body(orjson.dumps({"Records": [_record({"b": {"B": "QR=="}, "n": {"N": "1"}})]}), typed=True)[
        "Records"][0]["dynamodb"]["NewImage"]
    assert type(image) is WireImage and list(image) == ["b", "n"] and len(image) == 2 and "n" in image
    assert image == {"b": {"B": "QR=="}, "n": {"N": "1"}}  # as it arrived
    assert image.attribute("n") == {"N": "1"}
    assert pickle.loads(pickle.dumps(image)) == image and type(pickle.loads(pickle.dumps(image))) is dict


# -- the pieces -----------------------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(st.one_of(number_texts, st.text("0123456789.-+eE", max_size=42)))
def test_the_number_regex_is_the_plain_text_rule(text):
    data = orjson.dumps({"N": text})
    if "\\" in data.decode():
        return  # an escaped text is never plain (and the regex's group then says so)
    assert (avwire._NOT_PLAIN_NUMBER.search(data) is None) == _plain_number_text(text)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text("AQgw+/=Z9a \n-_", max_size=10), st.binary(max_size=10).map(lambda b: base64.b64encode(b).decode())))
def test_the_base64_regex_finds_every_text_that_is_not_canonical(text):
    data = orjson.dumps({"B": text})
    try:
        canonical = base64.b64encode(base64.b64decode(text, validate=True)).decode()
    except (binascii.Error, ValueError):
        canonical = None
    if avwire._NOT_CANONICAL_BASE64.search(data) is None:
        assert canonical == text
    else:
        assert canonical != text
    assert (_canonical_base64(text) is not None) == (canonical == text)  # the same rule, for BS members


@settings(max_examples=400, deadline=None)
@given(wire_values)
def test_the_name_check_finds_every_name_to_escape(value):
    from pipeline.avjson import canonical_item

    try:
        image = canonical_item({"a": value})
    except DecodeError:
        return
    names = []

    def walk(av):
        if "M" in av:
            for name, child in av["M"].items():
                names.append(name)
                walk(child)
        for child in av.get("L", ()):
            walk(child)

    walk(image["a"])
    if typed_json_keeps_names(orjson.dumps(image)):
        assert all(escape_field_name(n, top_level=True) == n for n in names)


names = st.one_of(st.text(max_size=4), st.sampled_from(["a.\nb", "\n", "\u3000", "\x85 ", "_id", "_cdc", "\"_x", "x\\",
                                                      "\u2028", "€", "_ddb", ".", "\u00a0\u1680"]))
named_values = st.recursive(st.builds(lambda s: {"S": s}, st.sampled_from(["x", "a.b", "_y", " z", "\\", '":{'])),
                            lambda children: st.builds(lambda m: {"M": m}, st.dictionaries(names, children, max_size=3)),
                            max_leaves=6)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(names, named_values, max_size=4))
def test_the_name_check_agrees_with_escaping_every_name(image):
    data = orjson.dumps(image)
    escaped = []

    def walk(m, top):
        for name, av in m.items():
            escaped.append(escape_field_name(name, top_level=True) != name)
            if "M" in av:
                walk(av["M"], False)

    walk(image, True)
    if typed_json_keeps_names(data):
        assert not any(escaped)


def test_the_tag_and_empty_value_checks():
    assert avwire._canonical_json(b'{"a":{"S":"x","N":"1"}}') is None
    assert avwire._canonical_json(b'{"b":{"M":{"N":{"S":"x"}}}}') is not None
    assert avwire._canonical_json(b'{"a":{"M":{"M":{}}}}') is None  # empty map or M holding {}: dict path
    assert avwire._canonical_json(b'{"a":{"M":{"x":{"S":"y"}},"L":[]}}') is None
    assert avwire._canonical_json(b'{"a":{}}') is None and avwire._canonical_json(b"{}") == b"{}"
    assert avwire._canonical_json(b'{"a":{"NULL":false}}') is None
    assert avwire._canonical_json(b'{"a":{"N":"1e2"}}') == b'{"a":{"N":"1E+2"}}'
    assert avwire._canonical_json(b'{"a":{"N":"NaN"}}') is None
    assert avwire._canonical_json(b'{"a":{"N":"1\\n"}}') is None and avwire._canonical_json(b'{"a":{"N":"1\\""}}') is None
    assert avwire._canonical_json(b'{"a":{"B":"QR=="}}') == b'{"a":{"B":"QQ=="}}'
    assert avwire._canonical_json(b'{"a":{"B":"Q\\n=="}}') is None
    assert re.search(avwire._COMMA_TAG, b',"SS":[') is not None
