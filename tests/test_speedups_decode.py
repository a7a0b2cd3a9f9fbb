"""The C decoder of ``speedups/`` (``ddb_cdc_speedups``, an experiment of issue 16, not used by
ddb-cdc) against ``pipeline.codec.decode_item``: the same values of the same types (Decimal: the
same text; sets: the same members, the same kept representative; bytes; the same str objects for
S) for every record of the benchmark suite's generator and for generated items in both B
encodings, and the same outcome — value, or exception type and message — for generated wire
values (canonical, not canonical and invalid), hostile records and hand-picked edge cases.

When the extension is not installed (``pip wheel ./speedups`` + ``pip install``, see
speedups/README.md), this module builds it first with the machine's C compiler into a temporary
directory (``setup.py build_ext``, a few seconds: tests/speedups_build.py); skipped only where there
is no C compiler.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from decimal import Decimal

import orjson
import pytest
from boto3.dynamodb.types import TypeSerializer
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.speedups_build import build_speedups

build_speedups("_decode")
import ddb_cdc_speedups._decode as _decode  # noqa: E402

import ddb_cdc_speedups  # noqa: E402
from benchmarks import inputs  # noqa: E402
from pipeline import codec  # noqa: E402
from pipeline.errors import DecodeError  # noqa: E402
from tests.test_codec import _to_base64_form, items  # noqa: E402
from tests.test_lazy_events import nested, number_texts, wire_items, wire_values, with_edge_wire_items  # noqa: E402

c_decode_item = ddb_cdc_speedups.bind(codec)
SER = TypeSerializer()


def same(a, b) -> bool:
    """Equal values of exactly the same types all the way down; Decimals with the same text."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b)) and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if type(a) in (set, frozenset):
        # equal members; and the same representative kept of equal members (Decimal("1") vs "1.0")
        return a == b and sorted((type(x).__name__, str(x)) for x in a) == sorted((type(x).__name__, str(x)) for x in b)
    if type(a) is Decimal:
        return str(a) == str(b) and a.as_tuple() == b.as_tuple()
    return a == b


def outcome(decode, image):
    try:
        return "value", decode(image)
    except Exception as exc:  # noqa: BLE001 — the type and message are what is compared
        return "error", type(exc), str(exc)


def assert_same_outcome(image):
    expected = outcome(codec.decode_item, image)
    got = outcome(c_decode_item, image)
    if expected[0] == "value":
        assert got[0] == "value", (image, got)
        assert same(got[1], expected[1]), (image, got[1], expected[1])
    else:
        assert got == expected, image


def test_the_suite_records_decode_alike():
    records = orjson.loads(orjson.dumps(inputs.make_records(3000) + inputs.make_records(500, shard_no=3, seed=11)))
    n = 0
    for record in records:
        for part in ("Keys", "NewImage", "OldImage"):
            image = record["dynamodb"].get(part)
            got, expected = c_decode_item(image), codec.decode_item(image)
            assert same(got, expected), (record["eventID"], part)
            n += image is not None
    assert n > 7000


def test_the_benchmark_bodies_decode_alike():
    for body in inputs.decode_bodies(3):
        for record in orjson.loads(body)["Records"]:
            for part in ("Keys", "NewImage", "OldImage"):
                image = record["dynamodb"].get(part)
                assert same(c_decode_item(image), codec.decode_item(image))


def test_s_values_are_the_same_objects_and_numbers_are_decimals_of_the_codec_context():
    text = "".join(["shared", " text"])
    image = {"s": {"S": text}, "b": {"B": b"raw"}, "n": {"N": "1" + "0" * 125}, "f": {"N": "0.0000000060199"}}
    out = c_decode_item(image)
    assert out["s"] is text and out["b"] is image["b"]["B"]
    assert same(out, codec.decode_item(image))
    assert str(out["n"]) == str(codec.DYNAMODB_CONTEXT.create_decimal("1" + "0" * 125))


@settings(max_examples=500, deadline=None)
@given(wire_items)
@with_edge_wire_items
def test_generated_wire_items_decode_or_fail_alike(image):
    assert_same_outcome(image)


@settings(max_examples=300, deadline=None)
@given(wire_values, st.integers(0, 34))
def test_generated_wire_values_at_any_depth_decode_or_fail_alike(av, depth):
    expected = outcome(lambda v: codec.decode_value(v, depth), av)
    got = outcome(lambda v: _decode.decode_value(v, depth), av)
    if expected[0] == "value":
        assert got[0] == "value" and same(got[1], expected[1])
    else:
        assert got == expected


@settings(max_examples=300, deadline=None)
@given(items)
def test_generated_items_decode_alike_in_both_b_encodings(item):
    wire = {k: SER.serialize(v) for k, v in item.items()}  # boto3 shape: B as bytes
    assert same(c_decode_item(wire), codec.decode_item(wire))
    json_form = {k: _to_base64_form(v) for k, v in wire.items()}
    assert same(c_decode_item(json_form), codec.decode_item(json_form))


@settings(max_examples=300, deadline=None)
@given(number_texts)
def test_number_texts_decode_or_fail_alike(text):
    assert_same_outcome({"n": {"N": text}})
    assert_same_outcome({"ns": {"NS": [text, "1"]}})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text("ABCQRSabz019+/=", max_size=10), st.text(max_size=6),
                 st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode())))
def test_base64_texts_decode_or_fail_alike(text):
    assert_same_outcome({"b": {"B": text}})
    assert_same_outcome({"bs": {"BS": [text, "QQ=="]}})


class Tag(str):
    pass


BAD_OR_UNUSUAL = [
    None, 5, "x", [], {}, OrderedDict(a={"S": "x"}), {1: {"S": "a"}}, {"a": None}, {"a": {}}, {"a": []},
    {"a": "S"}, {"a": {"S": 1}}, {"a": {"N": 5}}, {"a": {"N": "NaN"}}, {"a": {"N": "sNaN"}}, {"a": {"N": "-Infinity"}},
    {"a": {"N": "1e400"}}, {"a": {"N": "1" * 39}}, {"a": {"N": "1e-200"}}, {"a": {"N": "0e-200"}}, {"a": {"N": " 7 "}},
    {"a": {"N": "1_000"}}, {"a": {"N": "١٢٣"}}, {"a": {"N": ""}}, {"a": {"BOOL": "true"}}, {"a": {"BOOL": 1}},
    {"a": {"NULL": "x"}}, {"a": {"Q": "x"}}, {"a": {"S": "a", "N": "1"}}, {"a": {"B": "Q==="}}, {"a": {"B": "QQ"}},
    {"a": {"B": "QQ==QQ=="}}, {"a": {"B": "=QQ="}}, {"a": {"B": "QUI=\n"}}, {"a": {"B": "é"}}, {"a": {"B": 5}},
    {"a": {"B": bytearray(b"x")}}, {"a": {"B": memoryview(b"x")}}, {"a": {"SS": ["a", 1]}}, {"a": {"SS": "a"}},
    {"a": {"SS": ("a",)}}, {"a": {"NS": ["1", 2]}}, {"a": {"NS": ["1", "x"]}}, {"a": {"NS": "1"}},
    {"a": {"BS": ["QQ==", 5]}}, {"a": {"BS": ["QQ==", b"A", bytearray(b"B")]}}, {"a": {"BS": ["!!"]}},
    {"a": {"M": []}}, {"a": {"M": OrderedDict(x={"S": "y"})}}, {"a": {"M": {1: {"S": "y"}}}}, {"a": {"L": ({"S": "y"},)}},
    {"a": {"L": [{"S": "ok"}, {"N": "bad"}]}}, {"a": {"M": {"x": {"S": "ok"}, "y": {"B": "bad"}}}},
    {"ok": {"S": "x"}, 2: {"S": "y"}}, {"bad": {"N": "x"}, 2: {"S": "y"}},
    {Tag("name"): {"S": "x"}}, {"a": {Tag("S"): "x"}}, {"a": {Tag("N"): "1.0"}}, {"a": {"S": Tag("x")}},
    {"a": {"N": Tag("1.5")}}, {"a": {"SS": [Tag("x")]}}, {"a": {"NS": [Tag("2")]}},
    {"deep": nested(33)}, {"deep": nested(34)}, {"deep": nested(33, "L")}, {"deep": nested(34, "L")},
    {"deep": nested(2000)}, {"deep": nested(2000, "L")},
]


@pytest.mark.parametrize("image", BAD_OR_UNUSUAL, ids=[f"case{n}" for n in range(len(BAD_OR_UNUSUAL))])
def test_invalid_and_unusual_images_decode_or_fail_alike(image):
    assert_same_outcome(image)


def test_errors_are_the_codecs_decode_errors():
    with pytest.raises(DecodeError, match="not a DynamoDB number"):
        c_decode_item({"a": {"L": [{"M": {"n": {"N": "NaN"}}}]}})
    with pytest.raises(DecodeError, match="nest deeper than 32"):
        c_decode_item({"deep": nested(34)})
    with pytest.raises(DecodeError, match="image must be an object"):
        c_decode_item(5)
