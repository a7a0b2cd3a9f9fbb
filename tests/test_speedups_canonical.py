"""The C writer of canonical AttributeValue JSON of ``speedups/`` (``ddb_cdc_speedups._canonical``,
an experiment of issue 16, not used by ddb-cdc) against ``orjson.dumps(pipeline.avjson.canonical_item(x))``.

The contract of both functions, ``canonical_json`` and ``canonical_json_basic``: for any input the
result is None ("not sure: take the Python path") or exactly the bytes of the Python path — and
None wherever the Python path raises (a DecodeError of canonical_item, orjson's error for a lone
surrogate). Checked for every image of the benchmark suite's generator, for hypothesis-generated
wire items, values, numbers, sets, strings and arbitrary Python objects, and for hand-picked hostile
inputs. Also checked: that the C writer really takes the common case (bytes for at least 95 % of
the benchmark images; exact expected bytes for simple inputs), and that a ChangeEvent whose
``_typed_json_part`` tries it first renders the same S3 lines and OpenSearch lines.

The extension is built with the machine's C compiler when it is not installed
(tests/speedups_build.py).
"""

from __future__ import annotations

import base64
import sys
from collections import OrderedDict

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.speedups_build import build_speedups

build_speedups("_canonical")
import ddb_cdc_speedups._canonical as _canonical  # noqa: E402

import ddb_cdc_speedups  # noqa: E402
from benchmarks import inputs  # noqa: E402
from pipeline import codec  # noqa: E402
from pipeline.avjson import _canonical_base64, _plain_number_text, canonical_item  # noqa: E402
from tests.test_lazy_events import nested, number_texts, wire_items, wire_values, with_edge_wire_items  # noqa: E402

FULL, BASIC = _canonical.canonical_json, _canonical.canonical_json_basic
WRITERS = (FULL, BASIC)
PARTS = ("Keys", "NewImage", "OldImage")


def reference(image):
    """``orjson.dumps(canonical_item(image))``, or None when the Python path raises."""
    try:
        return orjson.dumps(canonical_item(image))
    except Exception:  # noqa: BLE001 — DecodeError, orjson.JSONEncodeError, ...: C must say None
        return None


def check(image):
    """Assert the contract for both writers; return (full, basic, reference)."""
    expected = reference(image)
    got = tuple(writer(image) for writer in WRITERS)
    for writer, out in zip(WRITERS, got):
        assert out is None or type(out) is bytes, (writer.__name__, image)
        if out is not None:
            assert expected is not None, (writer.__name__, "bytes where the Python path raises", image)
            assert out == expected, (writer.__name__, image, out, expected)
    return (*got, expected)


def in_maps(av, levels):
    """``av`` inside ``levels`` maps: at nesting level ``levels`` of the image ``{"x": ...}``."""
    for _ in range(levels):
        av = {"M": {"a": av}}
    return av


def suite_images():
    records = orjson.loads(orjson.dumps(inputs.make_records(3000) + inputs.make_records(500, shard_no=3, seed=11)))
    return [(part, record["dynamodb"].get(part)) for record in records for part in PARTS]


def body_images():
    return [(part, record["dynamodb"].get(part)) for body in inputs.decode_bodies(3)
            for record in orjson.loads(body)["Records"] for part in PARTS]


# -- the benchmark's images: same bytes, and C takes nearly all of them ---------------------------

@pytest.mark.parametrize("images", [suite_images, body_images], ids=["suite generator", "benchmark bodies"])
def test_the_benchmark_images_are_written_alike_and_nearly_all_in_c(images):
    taken = {"Keys": [0, 0], "images": [0, 0]}
    basic_taken = 0
    for part, image in images():
        if image is None:
            continue
        full, basic, expected = check(image)
        assert expected is not None
        bucket = taken["Keys" if part == "Keys" else "images"]
        bucket[0] += full is not None
        bucket[1] += 1
        basic_taken += basic is not None
    keys, imgs = taken["Keys"], taken["images"]
    assert imgs[1] > 4000
    assert keys[0] == keys[1]  # S / N keys: always in C
    assert imgs[0] >= 0.95 * imgs[1], f"C wrote only {imgs[0]} of {imgs[1]} images"
    assert basic_taken >= keys[1]  # the basic writer takes at least every key


def test_the_exposed_functions_and_the_depth_limit():
    assert ddb_cdc_speedups.canonical_json is FULL
    assert ddb_cdc_speedups.canonical_json_basic is BASIC
    assert _canonical.MAX_NESTING_DEPTH == codec.MAX_NESTING_DEPTH


# -- exact bytes for simple inputs ----------------------------------------------------------------

EXACT = [
    ({}, b"{}", b"{}"),
    ({"pk": {"S": "a"}, "sk": {"N": "7"}}, b'{"pk":{"S":"a"},"sk":{"N":"7"}}', None),
    ({"z": {"S": ""}, "a": {"BOOL": True}, "m": {"BOOL": False}, "n": {"NULL": True}},
     b'{"z":{"S":""},"a":{"BOOL":true},"m":{"BOOL":false},"n":{"NULL":true}}', None),
    ({"s": {"S": 'q"b\\s/\n\r\t\x08\x0c\x00\x01\x1f\x7f'}},
     b'{"s":{"S":"q\\"b\\\\s/\\n\\r\\t\\b\\f\\u0000\\u0001\\u001f\x7f"}}', None),
    ({"s": {"S": "é€💡\u2028"}}, b'{"s":{"S":"' + "é€💡\u2028".encode() + b'"}}', None),
    ({"na\nme\x1a": {"S": "x"}}, b'{"na\\nme\\u001a":{"S":"x"}}', None),
    ({"m": {"M": {}}, "l": {"L": []}, "ss": {"SS": []}}, b'{"m":{"M":{}},"l":{"L":[]},"ss":{"SS":[]}}', None),
    ({"m": {"M": {"l": {"L": [{"N": "-1.5"}, {"B": "QUI="}, {"SS": ["a", "b"]}]}}}},
     b'{"m":{"M":{"l":{"L":[{"N":"-1.5"},{"B":"QUI="},{"SS":["a","b"]}]}}}}', None),
    ({"n": {"N": "0.000001"}, "z": {"N": "-0"}, "y": {"N": "0.000000"}},
     b'{"n":{"N":"0.000001"},"z":{"N":"-0"},"y":{"N":"0.000000"}}', None),
    ({"n": {"N": "0.0000001"}}, b'{"n":{"N":"1E-7"}}', "none"),
    ({"n": {"N": "007"}, "e": {"N": "1e2"}, "f": {"N": "12."}, "g": {"N": "+.5"}, "h": {"N": "-0E-3"}},
     b'{"n":{"N":"7"},"e":{"N":"1E+2"},"f":{"N":"12"},"g":{"N":"0.5"},"h":{"N":"-0.000"}}', "none"),
    ({"n": {"N": "12345678901234567890123456789012345678e88"}},
     b'{"n":{"N":"1.2345678901234567890123456789012345678E+125"}}', "none"),
    ({"ns": {"NS": ["10", "9", "1.0", "1", "-3", "0", "-0"]}}, b'{"ns":{"NS":["-3","0","1.0","9","10"]}}', "none"),
    ({"bs": {"BS": ["QQ==", "AA==", "QQ==", "/w==", ""]}}, b'{"bs":{"BS":["","AA==","QQ==","/w=="]}}', "none"),
    ({"ss": {"SS": ["b", "a", "b", "é", "B"]}}, b'{"ss":{"SS":["B","a","b","\xc3\xa9"]}}', "none"),
]


@pytest.mark.parametrize("image,full,basic", EXACT, ids=[f"exact{n}" for n in range(len(EXACT))])
def test_simple_inputs_give_exactly_these_bytes(image, full, basic):
    assert FULL(image) == full
    assert BASIC(image) == (None if basic == "none" else full if basic is None else basic)
    assert reference(image) == full


# -- hostile and unusual inputs -------------------------------------------------------------------

class Name(str):
    pass


class Image(dict):
    pass


HOSTILE = [
    None, 5, 1.5, "x", b"{}", [], (), {"a"}, OrderedDict(a={"S": "x"}), Image(a={"S": "x"}),
    {"a": {"S": "\ud800"}}, {"a": {"S": "x\udfffy"}}, {"\ud83d": {"S": "x"}}, {"a": {"SS": ["a", "\udc00"]}},
    {"a": {"SS": ["\udc00", "a"]}}, {"a": {"M": {"\ud800": {"S": "x"}}}}, {"a": {"S": "\U0010ffff\ud7ff\ue000"}},
    {1: {"S": "a"}}, {None: {"S": "a"}}, {("t",): {"S": "a"}}, {"ok": {"S": "x"}, 2: {"S": "y"}},
    {Name("a"): {"S": "x"}}, {"a": {Name("S"): "x"}}, {"a": {"S": Name("x")}}, {"a": {"N": Name("1")}},
    {"a": {"SS": [Name("x")]}}, {"a": {"NS": [Name("2")]}}, {"a": {"BS": [Name("QQ==")]}}, {"a": {"B": Name("QQ==")}},
    {"a": Image(S="x")}, {"a": OrderedDict(S="x")}, {"a": {"M": Image(b={"S": "x"})}}, {"a": {"M": OrderedDict()}},
    {"a": None}, {"a": {}}, {"a": []}, {"a": "S"}, {"a": {"S": 1}}, {"a": {"S": None}}, {"a": {"S": b"x"}},
    {"a": {"N": 5}}, {"a": {"N": 1.5}}, {"a": {"N": "NaN"}}, {"a": {"N": "sNaN"}}, {"a": {"N": "-Infinity"}},
    {"a": {"N": "1e400"}}, {"a": {"N": "1" * 39}}, {"a": {"N": "1" + "0" * 125}}, {"a": {"N": "1" + "0" * 126}},
    {"a": {"N": "1e-200"}}, {"a": {"N": "0e-200"}}, {"a": {"N": "1e-130"}}, {"a": {"N": "1e-128"}},
    {"a": {"N": "1e-129"}}, {"a": {"N": "1e-165"}}, {"a": {"N": "1e-166"}}, {"a": {"N": "1.5e-165"}},
    {"a": {"N": "123e-167"}}, {"a": {"N": "-1.5e-168"}}, {"a": {"N": "0e-166"}},
    {"a": {"N": "1e126"}}, {"a": {"N": "1e127"}}, {"a": {"N": "0e126"}}, {"a": {"N": "0e127"}}, {"a": {"N": "0e-165"}},
    {"a": {"N": " 7 "}}, {"a": {"N": "1_000"}}, {"a": {"N": "١٢٣"}}, {"a": {"N": "²"}}, {"a": {"N": ""}},
    {"a": {"N": "-"}}, {"a": {"N": "."}}, {"a": {"N": "1e"}}, {"a": {"N": "1e+"}}, {"a": {"N": "e5"}},
    {"a": {"N": "1.2.3"}}, {"a": {"N": "--1"}}, {"a": {"N": "0x10"}}, {"a": {"N": "1e99999999999999999999"}},
    {"a": {"N": "0." + "0" * 5000 + "1"}}, {"a": {"N": "1" + "0" * 5000 + "e-5000"}}, {"a": {"N": "0" * 5000 + "1"}},
    {"a": {"N": "1.00000000000000000000000000000000000000"}}, {"a": {"N": "1.0000000000000000000000000000000000000"}},
    {"a": {"BOOL": "true"}}, {"a": {"BOOL": 1}}, {"a": {"BOOL": None}},
    {"a": {"NULL": False}}, {"a": {"NULL": None}}, {"a": {"NULL": "x"}}, {"a": {"NULL": 1}},
    {"a": {"Q": "x"}}, {"a": {"s": "x"}}, {"a": {"": "x"}}, {"a": {"SSS": []}}, {"a": {"BOOLEAN": True}},
    {"a": {"S": "a", "N": "1"}}, {"a": {"M": {}, "L": []}},
    {"a": {"B": "Q==="}}, {"a": {"B": "QQ"}}, {"a": {"B": "QR=="}}, {"a": {"B": "QUJ="}}, {"a": {"B": "QQ==QQ=="}},
    {"a": {"B": "QY=="}}, {"a": {"B": "QI=="}}, {"a": {"B": "Qo=="}}, {"a": {"B": "Q4=="}}, {"a": {"B": "QUK="}},
    {"a": {"B": "QUL="}}, {"a": {"B": "QUJ="}}, {"a": {"BS": ["QY==", "QQ=="]}}, {"a": {"BS": ["QUK="]}},
    {"a": {"B": "=QQ="}}, {"a": {"B": "QUI=\n"}}, {"a": {"B": "é"}}, {"a": {"B": "QU-_"}}, {"a": {"B": 5}},
    {"a": {"B": b"raw"}}, {"a": {"B": bytearray(b"x")}}, {"a": {"B": memoryview(b"x")}}, {"a": {"B": ""}},
    {"a": {"SS": ["a", 1]}}, {"a": {"SS": "a"}}, {"a": {"SS": ("a",)}}, {"a": {"SS": ["b", "a"]}},
    {"a": {"SS": ["a", "a"]}}, {"a": {"SS": ["a", "b", "a"]}}, {"a": {"SS": ["", ""]}},
    {"a": {"NS": []}}, {"a": {"NS": ["1", 2]}}, {"a": {"NS": ["1", "x"]}}, {"a": {"NS": "1"}}, {"a": {"NS": ("1",)}},
    {"a": {"NS": ["1", "1.0", "1e0", "10e-1"]}}, {"a": {"NS": ["1.0", "1"]}}, {"a": {"NS": ["-0", "0", "0.0"]}},
    {"a": {"NS": ["2", "1", "2"]}}, {"a": {"NS": ["1e-7", "0.0000001", "1E-7"]}}, {"a": {"NS": ["1e400"]}},
    {"a": {"BS": []}}, {"a": {"BS": ["QQ==", 5]}}, {"a": {"BS": ["QQ==", b"A"]}}, {"a": {"BS": ["!!"]}},
    {"a": {"BS": ["QR==", "QQ=="]}}, {"a": {"BS": ["QQ==", "QQ=="]}}, {"a": {"BS": "QQ=="}}, {"a": {"BS": [b"A"]}},
    {"a": {"M": []}}, {"a": {"M": None}}, {"a": {"M": {1: {"S": "y"}}}}, {"a": {"L": ({"S": "y"},)}}, {"a": {"L": None}},
    {"a": {"L": [{"S": "ok"}, {"N": "bad"}]}}, {"a": {"M": {"x": {"S": "ok"}, "y": {"B": "bad"}}}},
    {"a": {"L": [{"S": "ok"}, {}]}}, {"a": {"L": [{"S": "ok"}, "S"]}},
    {"deep": nested(32)}, {"deep": nested(33)}, {"deep": nested(34)}, {"deep": nested(33, "L")},
    {"deep": nested(34, "L")}, {"deep": nested(2000)}, {"deep": nested(2000, "L")},
    {"deep": in_maps({"L": [{"L": []}]}, 31)}, {"deep": in_maps({"L": [{"L": []}]}, 32)},
]


@pytest.mark.parametrize("image", HOSTILE, ids=[f"case{n}" for n in range(len(HOSTILE))])
def test_hostile_and_unusual_inputs_give_none_or_the_same_bytes(image):
    check(image)


def test_what_c_must_refuse_and_what_it_must_take_at_the_limits():
    for image in ({"a": {"S": "\ud800"}}, {"\udfff": {"S": "x"}}, {"a": {"NULL": False}}, {"a": {}},
                  {"a": {"S": "a", "N": "1"}}, {"a": {"B": b"x"}}, {"deep": nested(34)}, {"deep": nested(34, "L")},
                  {"deep": nested(2000)}, {1: {"S": "a"}}, Image(a={"S": "x"}), {"a": {"S": Name("x")}}, None, 5):
        assert FULL(image) is None and BASIC(image) is None, image
    assert reference({"deep": nested(34)}) is None  # the Python path raises: too deep
    at_limit = {"deep": nested(33)}  # 33 maps: the innermost at level 32, the deepest allowed
    assert FULL(at_limit) == reference(at_limit) is not None
    assert FULL({"deep": nested(33, "L")}) == reference({"deep": nested(33, "L")}) is not None
    assert BASIC(at_limit) is None  # its leaf is N "007" (not plain text)
    at_limit = {"deep": in_maps({"N": "7"}, 33)}
    assert BASIC(at_limit) == reference(at_limit) is not None


def test_huge_strings_and_images_grow_the_buffer():
    text = ("a\"\\\n\x01é€💡" * 200_000) + "end"
    image = {"s": {"S": text}, "l": {"L": [{"S": text[i:i + 97]} for i in range(0, 300_000, 97)]},
             "ss": {"SS": sorted({text[i:i + 5] for i in range(0, 50_000, 7)})}}
    image.update({f"k{i}": {"N": str(i)} for i in range(20_000)})
    full, basic, expected = check(image)
    assert full == expected and basic == expected and len(full) > 5_000_000
    ascii_text = "x" * 10_000_000
    assert FULL({"s": {"S": ascii_text}}) == b'{"s":{"S":"' + ascii_text.encode() + b'"}}'


def test_no_reference_is_kept_or_lost():
    name, text, number = "name" + str(id(check)), "text" * 3, "12.50" + "0"
    image = {name: {"M": {"s": {"S": text}, "n": {"N": number}, "ns": {"NS": [number, "1"]}}}}
    before = [sys.getrefcount(x) for x in (name, text, number, image)]
    for _ in range(1000):
        FULL(image), BASIC(image), FULL({"x": {"S": "\ud800"}}), FULL(None)
    assert [sys.getrefcount(x) for x in (name, text, number, image)] == before


# -- generated inputs -----------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(wire_items)
@with_edge_wire_items
def test_generated_wire_items_give_none_or_the_same_bytes(image):
    check(image)


@settings(max_examples=300, deadline=None)
@given(wire_values, st.integers(0, 34))
def test_generated_wire_values_at_any_depth_give_none_or_the_same_bytes(av, depth):
    check({"x": in_maps(av, depth)})


#: Numbers around every limit of the C fast path: 37–39 significant digits, adjusted exponents
#: -130..128, zeros with large exponents, leading and trailing zeros, signs, both exponent letters.
edge_numbers = st.builds(
    lambda sign, lead, digits, point, exp: f"{sign}{lead}{digits[:point]}.{digits[point:]}{exp}"
    if point is not None else f"{sign}{lead}{digits}{exp}",
    st.sampled_from(["", "-", "+"]), st.sampled_from(["", "0", "000"]),
    st.one_of(st.text("0123456789", min_size=1, max_size=41), st.sampled_from(["1" * 38, "9" * 39, "1" + "0" * 38])),
    st.one_of(st.none(), st.integers(0, 41)),
    st.one_of(st.just(""), st.builds(lambda e, n: f"{e}{n}", st.sampled_from(["e", "E", "e+", "E-"]),
                                     st.integers(0, 200))),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(number_texts, edge_numbers))
@example("0.000001")
@example("0.0000001")
@example("-0.0000000")
@example("99999999999999999999999999999999999999e88")
@example("99999999999999999999999999999999999999e89")
@example("1e-128")
@example("1e-129")
@example("1e-166")
@example("1.5e-165")
def test_number_texts_give_none_or_the_same_bytes(text):
    full, basic, expected = check({"n": {"N": text}})
    check({"ns": {"NS": [text, "1"]}})
    check({"ns": {"NS": ["1", text, text]}})
    if _plain_number_text(text):  # the basic writer takes every number in plain text
        assert basic == expected is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["1", "1.0", "1e0", "10e-1", "-0", "0", "0.00", "2", "-3", "1e1", "10",
                                           "0.5", ".5", "5e-1", "-1e-7", "-0.0000001", "1e125", "x"]),
                          number_texts), max_size=8))
def test_number_sets_give_none_or_the_same_bytes(members):
    full, basic, expected = check({"ns": {"NS": members}})
    texts = [m for m in members if m != "x"]
    if members and len(texts) == len(members) and all(_plain_number_text(t) for t in texts):
        assert full == expected is not None  # plain members: always in C, however ordered


B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
b64_members = st.one_of(st.binary(max_size=10).map(lambda b: base64.b64encode(b).decode()),
                        st.sampled_from(["QQ==", "QR==", "AA==", "/w==", "+/+/", "", "QQ", "!!"]),
                        # padded texts with any last character: canonical or not (trailing bits set)
                        st.text(B64_ALPHABET, min_size=2, max_size=2).map(lambda t: t + "=="),
                        st.text(B64_ALPHABET, min_size=3, max_size=3).map(lambda t: t + "="))


@settings(max_examples=300, deadline=None)
@given(st.lists(b64_members, max_size=6), b64_members)
def test_binary_values_and_sets_give_none_or_the_same_bytes(members, text):
    full, basic, expected = check({"bs": {"BS": members}})
    check({"b": {"B": text}})
    if members and all(_canonical_base64(m) for m in members):  # canonical texts: always in C, however ordered
        assert full == expected is not None


hostile_chars = st.one_of(st.characters(exclude_categories=()),
                          st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", '"', "\\", "\n", "\r", "\t",
                                           "\x00", "\x08", "\x0b", "\x0c", "\x1f", "\x7f", "\x80", "é", "\u07ff",
                                           "\u0800", "€", "\uffff", "💡", "\U0010ffff", "\u2028"]))


@settings(max_examples=400, deadline=None)
@given(st.text(hostile_chars, max_size=12), st.text(hostile_chars, max_size=4),
       st.lists(st.text(hostile_chars, max_size=3), max_size=4))
def test_strings_give_none_or_the_same_bytes(text, name, members):
    image = {name: {"S": text}, "m": {"M": {name: {"L": [{"S": text}]}}}}
    full, basic, expected = check(image)
    if expected is not None:  # no surrogate: every escape and every UTF-8 length is written in C
        assert full == basic == expected
    check({"ss": {"SS": members}})
    check({"ss": {"SS": sorted(set(members))}})


python_objects = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(hostile_chars, max_size=4),
              st.binary(max_size=4), st.sampled_from(["S", "N", "B", "M", "L", "SS", "NS", "BS", "BOOL", "NULL"])),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.tuples(children),
        st.dictionaries(st.one_of(st.sampled_from(["S", "N", "B", "M", "L", "SS", "NS", "BS", "BOOL", "NULL", "a"]),
                                  st.integers(), st.text(hostile_chars, max_size=2)), children, max_size=3),
        st.builds(lambda d: Image(d), st.dictionaries(st.sampled_from(["S", "M", "a"]), children, max_size=2)),
    ),
    max_leaves=15,
)


@settings(max_examples=400, deadline=None)
@given(python_objects)
def test_arbitrary_python_objects_never_raise_and_give_none_or_the_same_bytes(value):
    check(value)
    check({"a": value})
    check({"a": {"M": value}} if type(value) is dict else {"a": {"L": value}})


# -- wired into ChangeEvent (as benchmarks/ccanonical_probe.py does it, in this process only) -----

def test_events_render_the_same_with_the_c_writer_tried_first():
    from benchmarks.ccanonical_probe import c_writer_in_events
    from pipeline.codec import decode_record
    from pipeline.render import event_to_json_line

    records = orjson.loads(orjson.dumps(inputs.make_records(300)))
    hostile = [{"eventID": "h", "eventName": "MODIFY",
                "dynamodb": {"Keys": {"pk": {"S": "a"}}, "SequenceNumber": "1", "SizeBytes": 1,
                             "StreamViewType": "NEW_AND_OLD_IMAGES", "NewImage": image, "OldImage": {"x": {"N": "1e2"}}}}
               for image in ({"x": {"S": "\ud800"}}, {"x": {"NULL": False}}, {"x": {}}, {"deep": nested(34)})]

    def lines(patched: bool):
        out = []
        for record in records + hostile:
            event = decode_record(record, table="t", stream_arn="arn", shard_id="s")
            if patched:
                with c_writer_in_events(FULL):
                    out.append(_outcome(lambda: event_to_json_line(event)))
            else:
                out.append(_outcome(lambda: event_to_json_line(event)))
        return out

    plain = lines(False)
    assert lines(True) == plain
    with c_writer_in_events(FULL) as counts:
        for record in records:
            decode_record(record, table="t", stream_arn="arn", shard_id="s").typed_json_parts()
    assert counts["c"] >= 0.95 * (counts["c"] + counts["python"]) and counts["c"] > 600


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 — the type and message are compared
        return "error", type(exc), str(exc)
