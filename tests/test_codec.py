"""Decoder: every DynamoDB type, both B encodings, edge values, versions, and a differential test
against boto3's TypeDeserializer on generated items (hypothesis)."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from boto3.dynamodb.types import Binary, TypeDeserializer, TypeSerializer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.codec import (
    decode_item,
    decode_record,
    decode_value,
    encode_item,
    key_id,
    record_version,
)
from pipeline.errors import DecodeError
from pipeline.events import Operation
from pipeline.render import event_from_record_dict, event_to_record_dict, plain_json_bytes
from pipeline.testing import make_stream_record

ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-01-01T00:00:00.000"


def test_every_type_decodes():
    item = {
        "s": {"S": "héllo 🦄"},
        "empty": {"S": ""},
        "n": {"N": "12345678901234567890123456789012345678"},
        "neg_exp": {"N": "-1.5E-120"},
        "big_exp": {"N": "9.9999999999999999999999999999999999999E+125"},
        "b_bytes": {"B": b"\x00\xff"},
        "b_text": {"B": base64.b64encode(b"\x00\xff").decode()},
        "b_empty": {"B": ""},
        "ss": {"SS": ["a", "b"]},
        "ns": {"NS": ["1", "2.50"]},
        "bs": {"BS": ["AAE=", b"\x02"]},
        "l": {"L": [{"N": "1"}, {"S": "x"}, {"NULL": True}, {"L": []}]},
        "m": {"M": {"deep": {"M": {"deeper": {"BOOL": False}}}}},
        "null": {"NULL": True},
        "bool": {"BOOL": True},
    }
    out = decode_item(item)
    assert out["s"] == "héllo 🦄" and out["empty"] == ""
    assert out["n"] == Decimal("12345678901234567890123456789012345678")
    assert str(out["n"]) == "12345678901234567890123456789012345678"  # integers exact, no exponent
    assert out["neg_exp"] == Decimal("-1.5E-120")
    assert out["big_exp"] == Decimal("9.9999999999999999999999999999999999999E+125")
    assert out["b_bytes"] == b"\x00\xff" == out["b_text"]
    assert out["b_empty"] == b""
    assert out["ss"] == {"a", "b"}
    assert out["ns"] == {Decimal(1), Decimal("2.5")}
    assert out["bs"] == {b"\x00\x01", b"\x02"}
    assert out["l"] == [Decimal(1), "x", None, []]
    assert out["m"] == {"deep": {"deeper": False}}
    assert out["null"] is None and out["bool"] is True


@pytest.mark.parametrize("bad, fragment", [
    ({"N": "1e999"}, "not a DynamoDB number"),
    ({"N": "1.000000000000000000000000000000000000001"}, "not a DynamoDB number"),  # 40 digits: would round
    ({"N": "abc"}, "not a DynamoDB number"),
    ({"N": 5}, "must be a string"),
    ({"B": "not base64!"}, "not valid base64"),
    ({"S": 1}, "must be a string"),
    ({"BOOL": "true"}, "true/false"),
    ({"X": "1"}, "unknown AttributeValue type"),
    ({"S": "a", "N": "1"}, "one type tag"),
    ({"M": []}, "must be an object"),
    ({"SS": [1]}, "SS members"),
])
def test_bad_values_raise_decode_error(bad, fragment):
    with pytest.raises(DecodeError, match=fragment):
        decode_value(bad)


def test_record_decodes_for_all_view_types():
    keys = {"pk": "a"}
    new = {"pk": "a", "v": Decimal(2)}
    old = {"pk": "a", "v": Decimal(1)}
    full = make_stream_record(event_name="MODIFY", keys=keys, new_image=new, old_image=old)
    ev = decode_record(full, table="t", stream_arn=ARN, shard_id="s1")
    assert ev.operation is Operation.MODIFY and ev.op == "u"
    assert ev.before == old and ev.after == new and ev.keys == keys and ev.key_id == "a"
    keys_only = make_stream_record(event_name="MODIFY", keys=keys, view_type="KEYS_ONLY")
    ev = decode_record(keys_only, table="t", stream_arn=ARN, shard_id="s1")
    assert ev.before is None and ev.after is None and ev.source.stream_view_type == "KEYS_ONLY"
    new_only = make_stream_record(event_name="INSERT", keys=keys, new_image=new, view_type="NEW_IMAGE")
    assert decode_record(new_only, table="t", stream_arn=ARN, shard_id="s1").after == new
    old_only = make_stream_record(event_name="REMOVE", keys=keys, old_image=old, view_type="OLD_IMAGE")
    ev = decode_record(old_only, table="t", stream_arn=ARN, shard_id="s1")
    assert ev.operation is Operation.REMOVE and ev.op == "d" and ev.before == old and ev.image is None


def test_ttl_delete_is_flagged_only_for_service_principal():
    rec = make_stream_record(event_name="REMOVE", keys={"pk": "a"}, old_image={"pk": "a"}, ttl=True)
    assert decode_record(rec, table="t", stream_arn=ARN, shard_id="s").source.ttl_delete is True
    rec["userIdentity"]["PrincipalId"] = "someone"
    assert decode_record(rec, table="t", stream_arn=ARN, shard_id="s").source.ttl_delete is False


def test_boto3_shape_record_with_datetime_and_bytes():
    rec = {
        "eventID": "e1", "eventName": "INSERT",
        "dynamodb": {
            "ApproximateCreationDateTime": datetime(2026, 5, 1, 12, 0, 7, tzinfo=timezone.utc),
            "Keys": {"id": {"B": b"\x01\x02"}},
            "NewImage": {"id": {"B": b"\x01\x02"}, "x": {"BS": [b"\x03"]}},
            "SequenceNumber": "4421584500000000017450439091",
            "SizeBytes": 26, "StreamViewType": "NEW_AND_OLD_IMAGES",
        },
    }
    ev = decode_record(rec, table="t", stream_arn=ARN, shard_id="s")
    assert ev.keys == {"id": b"\x01\x02"} and ev.key_id == "AQI="
    assert ev.after["x"] == {b"\x03"}
    assert ev.source.approximate_creation_time == datetime(2026, 5, 1, 12, 0, 7, tzinfo=timezone.utc)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda r: r.pop("dynamodb"), "no 'dynamodb'"),
    (lambda r: r.update(eventName="UPSERT"), "eventName"),
    (lambda r: r["dynamodb"].update(SequenceNumber=12), "SequenceNumber"),
    (lambda r: r["dynamodb"].pop("Keys"), "no Keys"),
    (lambda r: r["dynamodb"].update(SizeBytes="x"), "SizeBytes"),
    (lambda r: r["dynamodb"].update(ApproximateCreationDateTime="yesterday"), "ApproximateCreationDateTime"),
])
def test_malformed_records_raise_decode_error(mutate, fragment):
    rec = make_stream_record(keys={"pk": "a"}, new_image={"pk": "a"})
    mutate(rec)
    with pytest.raises(DecodeError, match=fragment):
        decode_record(rec, table="t", stream_arn=ARN, shard_id="s")


def test_key_id_is_unambiguous():
    assert key_id({"pk": "a", "sk": Decimal(7)}) == "a|7"
    assert key_id({"pk": "a|b", "sk": "c"}) != key_id({"pk": "a", "sk": "b|c"})
    assert key_id({"pk": "a\\", "sk": "|b"}) != key_id({"pk": "a\\|", "sk": "b"})
    assert key_id({"sk": "2", "pk": "1"}) == key_id({"pk": "1", "sk": "2"})


def test_version_orders_changes_of_an_item():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    t1 = datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc)
    v_a = record_version(t0, "100000000000000000005")
    v_b = record_version(t0, "100000000000000000006")
    v_c = record_version(t1, "100000000000000000001")  # later second, smaller low bits
    assert v_a < v_b < v_c
    assert 0 < v_c < 2**63
    # far future still fits 63 bits
    assert record_version(datetime(2079, 12, 31, tzinfo=timezone.utc), "9" * 40) < 2**63
    # same record → same version (restarts, replays)
    assert record_version(t0, "100000000000000000005") == v_a


# -- differential: our decoder vs boto3's TypeDeserializer -----------------------------------------

_deser = TypeDeserializer()
_ser = TypeSerializer()

numbers = st.one_of(
    st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1).map(Decimal),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: d.is_finite() and len(d.as_tuple().digits) <= 38 and -130 < d.adjusted() < 125 and d != 0
    ).map(lambda d: d.normalize()),
)
strings = st.text(max_size=20)
binaries = st.binary(max_size=20)
scalars = st.one_of(strings, numbers, binaries, st.booleans(), st.none())
sets = st.one_of(
    st.sets(strings, min_size=1, max_size=5),
    st.sets(st.integers(-(10**20), 10**20).map(Decimal), min_size=1, max_size=5),
    st.sets(binaries, min_size=1, max_size=5),
)
values = st.recursive(
    st.one_of(scalars, sets),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=4),
    ),
    max_leaves=20,
)
items = st.dictionaries(st.text(min_size=1, max_size=10), values, min_size=1, max_size=8)


def _normalise_boto3(value):
    if isinstance(value, Binary):
        return bytes(value.value)
    if isinstance(value, dict):
        return {k: _normalise_boto3(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise_boto3(v) for v in value]
    if isinstance(value, set):
        return {_normalise_boto3(v) for v in value}
    return value


def _to_base64_form(av):
    """One AttributeValue with raw bytes → the JSON form (base64 text), as Lambda delivers it.

    Walks by structure (type tag → value), so an attribute *named* "B" is not mistaken for a tag.
    """
    ((tag, value),) = av.items()
    if tag == "B":
        return {"B": base64.b64encode(bytes(value)).decode()}
    if tag == "BS":
        return {"BS": [base64.b64encode(bytes(b)).decode() for b in value]}
    if tag == "M":
        return {"M": {k: _to_base64_form(v) for k, v in value.items()}}
    if tag == "L":
        return {"L": [_to_base64_form(v) for v in value]}
    return av


@settings(max_examples=300, deadline=None)
@given(items)
@example({"B": [], "BS": {"S": "x"}, "M": {b"\x00"}})  # attribute names that look like type tags
def test_differential_against_boto3_type_deserializer(item):
    wire = {k: _ser.serialize(v) for k, v in item.items()}  # boto3 shape: B as bytes
    expected = {k: _normalise_boto3(_deser.deserialize(v)) for k, v in wire.items()}
    assert decode_item(wire) == expected
    json_form = {k: _to_base64_form(v) for k, v in wire.items()}
    assert decode_item(json_form) == expected  # JSON shape: B as base64 text
    # our encoder round-trips what the decoder produced
    assert decode_item(encode_item(expected)) == expected


@settings(max_examples=150, deadline=None)
@given(items)
def test_audit_rendering_round_trips(item):
    rec = make_stream_record(event_name="INSERT", keys={"pk": "k"}, new_image={**item, "pk": "k"},
                             sequence_number="300000000000000000042")
    ev = decode_record(rec, table="t", stream_arn=ARN, shard_id="s")
    assert event_from_record_dict(event_to_record_dict(ev)) == ev
    plain_json_bytes(ev.after)  # renders every generated value without error


def test_plain_rendering_never_uses_float():
    import orjson

    rendered = orjson.loads(plain_json_bytes({
        "int": Decimal("9223372036854775807"),
        "huge": Decimal("12345678901234567890123456789012345678"),
        "frac": Decimal("0.1"),
        "precise": Decimal("0.12345678901234567890123"),
        "exp": Decimal("1E+125"),
        "bytes": b"\x00", "set": {"b", "a"},
    }))
    assert rendered["int"] == 9223372036854775807
    assert rendered["huge"] == "12345678901234567890123456789012345678"
    assert rendered["precise"] == "0.12345678901234567890123"
    assert rendered["frac"] == 0.1 and rendered["exp"] == 1e125
    assert rendered["bytes"] == "AA==" and rendered["set"] == ["a", "b"]
