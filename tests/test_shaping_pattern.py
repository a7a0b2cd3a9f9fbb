"""AWS event filter patterns over the Lambda-shaped view (issue 19 item 1).

Each case is a pattern as the AWS Lambda developer guide writes it ("Lambda event filtering",
"Filtering DynamoDB events") and the records it must / must not match.
"""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from pipeline.errors import ConfigError, FilterPatternError
from pipeline.events import Operation
from pipeline.shaping.pattern import compile_filter
from pipeline.shaping.view import LambdaView
from pipeline.testing import make_batch, make_stream_record


def _event(event_name="INSERT", keys=None, new=None, old=None, ttl=False, seq="100000000000000000001"):
    keys = keys or {"CustomerName": "AnyCompany Industries"}
    return make_batch([make_stream_record(event_name=event_name, keys=keys, new_image=new, old_image=old,
                                          ttl=ttl, sequence_number=seq)]).events[0]


ITEM = {"CustomerName": "AnyCompany Industries", "AccountManager": "Pat Candella", "PaymentTerms": "60 days",
        "Quantity": Decimal("5"), "Price": Decimal("15.5"), "Big": Decimal("300.0"), "Active": True,
        "Nothing": None, "Empty": "", "Tags": {"gold", "eu"}, "Scores": {Decimal("1"), Decimal("7")},
        "Organizations": ["Sales", "Marketing", {"Name": "Support"}],
        "Address": {"City": "Seattle", "Zip": "98101", "Geo": {"Lat": Decimal("47.6")}},
        "Blob": b"\x00\x01"}
INSERT = _event(new=ITEM)
MODIFY = _event("MODIFY", new={**ITEM, "AccountManager": "Shirley Rodriguez"}, old=ITEM,
                seq="100000000000000000002")
REMOVE = _event("REMOVE", old=ITEM, seq="100000000000000000003")
TTL_REMOVE = _event("REMOVE", old=ITEM, ttl=True, seq="100000000000000000004")

NI = lambda attr, rules: {"dynamodb": {"NewImage": {attr: rules}}}  # noqa: E731


def matches(pattern, event) -> bool:
    return compile_filter(pattern).matches(event)


# -- the guide's own examples ----------------------------------------------------------------------


def test_guide_example_table_key():
    p = {"dynamodb": {"Keys": {"CustomerName": {"S": ["AnyCompany Industries"]}}}}
    assert matches(p, INSERT) and matches(p, REMOVE)
    assert not matches(p, _event(keys={"CustomerName": "Other"}, new={"CustomerName": "Other"}))


def test_guide_example_new_image_or_and_string_pattern():
    p = NI("AccountManager", {"S": ["Pat Candella", "Shirley Rodriguez"]})
    assert matches(p, INSERT) and matches(p, MODIFY)
    assert not matches(p, REMOVE)  # a REMOVE has no NewImage: the field is missing
    # pasted as Lambda's JSON string, and as FilterCriteria
    text = orjson.dumps(p).decode()
    assert matches(text, MODIFY)
    assert matches({"Filters": [{"Pattern": text}]}, MODIFY)


def test_guide_example_multi_level_number_key_as_string():
    ev = _event(keys={"Id": Decimal("101")}, new={"Id": Decimal("101"), "Message": "New item!"})
    assert matches({"dynamodb": {"Keys": {"Id": {"N": ["101"]}}}}, ev)
    # numbers are DynamoDB JSON strings: a JSON number literal never equals them
    assert not matches({"dynamodb": {"Keys": {"Id": {"N": [101]}}}}, ev)


def test_numbers_match_by_exact_text():
    assert matches(NI("Quantity", {"N": ["5"]}), INSERT)
    assert not matches(NI("Quantity", {"N": ["5.0"]}), INSERT)
    assert matches(NI("Big", {"N": ["300.0"]}), INSERT)
    assert not matches(NI("Big", {"N": ["300"]}), INSERT)  # "300, 300.0, and 3.0e2 are not considered equal"


def test_event_name_and_and_across_fields():
    p = {"eventName": ["INSERT", "MODIFY"], "dynamodb": {"NewImage": {"PaymentTerms": {"S": ["60 days"]}}}}
    assert matches(p, INSERT) and matches(p, MODIFY)
    assert not matches(p, REMOVE)
    both = {"eventName": ["MODIFY"], "dynamodb": {"OldImage": {"AccountManager": {"S": ["Pat Candella"]}},
                                                  "NewImage": {"AccountManager": {"S": ["Shirley Rodriguez"]}}}}
    assert matches(both, MODIFY) and not matches(both, INSERT)


# -- operators ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, expected", [
    ({"prefix": "Pat"}, True), ({"prefix": "pat"}, False), ({"prefix": "Candella"}, False),
    ({"suffix": "Candella"}, True), ({"suffix": "Pat"}, False),
    ({"equals-ignore-case": "PAT CANDELLA"}, True), ({"equals-ignore-case": "pat"}, False),
    ({"anything-but": "Shirley Rodriguez"}, True), ({"anything-but": ["Pat Candella", "x"]}, False),
    ({"anything-but": {"prefix": "Shirley"}}, True), ({"anything-but": {"prefix": "Pat"}}, False),
    ({"anything-but": {"suffix": "Candella"}}, False),
    ("Pat Candella", True), ("pat candella", False),
])
def test_string_operators(rule, expected):
    assert matches(NI("AccountManager", {"S": [rule]}), INSERT) is expected


@pytest.mark.parametrize("numeric, expected", [
    (["=", 5], True), (["=", 5.0], True), (["=", 4], False),
    ([">", 4], True), ([">", 5], False), ([">=", 5], True), (["<", 5], False), (["<=", 5], True),
    ([">", 0, "<=", 5], True), ([">", 5, "<=", 10], False), ([">=", 1, "<", 5], False),
])
def test_numeric_on_dynamodb_number_strings(numeric, expected):
    assert matches(NI("Quantity", {"N": [{"numeric": numeric}]}), INSERT) is expected


def test_numeric_range_on_decimal_and_number_sets():
    assert matches(NI("Price", {"N": [{"numeric": [">", 15, "<", 16]}]}), INSERT)
    assert matches(NI("Scores", {"NS": [{"numeric": [">", 6]}]}), INSERT)  # any member
    assert not matches(NI("Scores", {"NS": [{"numeric": [">", 7]}]}), INSERT)
    # numeric never reads a string attribute as a number (only N / NS hold number text)
    assert not matches(NI("Address", {"M": {"Zip": {"S": [{"numeric": [">", 0]}]}}}), INSERT)


def test_numeric_on_json_numbers_of_the_record():
    assert matches({"dynamodb": {"SizeBytes": [{"numeric": [">", 10]}]}}, INSERT)  # make_stream_record: 100
    assert not matches({"dynamodb": {"SizeBytes": [{"numeric": ["<", 10]}]}}, INSERT)
    assert matches({"dynamodb": {"SizeBytes": [100]}}, INSERT)
    assert not matches({"dynamodb": {"SizeBytes": ["100"]}}, INSERT)  # typed equality
    assert not matches({"dynamodb": {"SequenceNumber": [{"numeric": [">", 0]}]}}, INSERT)  # a string


def test_exists_on_leaves_only():
    assert matches(NI("AccountManager", {"S": [{"exists": True}]}), INSERT)
    assert not matches(NI("Missing", {"S": [{"exists": True}]}), INSERT)
    assert matches(NI("Missing", {"S": [{"exists": False}]}), INSERT)
    assert not matches(NI("AccountManager", {"S": [{"exists": False}]}), INSERT)
    # a REMOVE has no NewImage: every NewImage field is absent
    assert matches(NI("AccountManager", {"S": [{"exists": False}]}), REMOVE)
    # the guide's Organizations example: exists on the list's leaves
    assert matches(NI("Organizations", {"L": {"S": [{"exists": True}]}}), INSERT)
    # the wrong type key is absent
    assert not matches(NI("AccountManager", {"N": [{"exists": True}]}), INSERT)


def test_exists_false_or_value():
    p = NI("AccountManager", {"S": ["Pat Candella", {"exists": False}]})
    assert matches(p, INSERT) and matches(p, REMOVE)
    assert not matches(p, MODIFY)  # Shirley


def test_null_bool_empty():
    assert matches(NI("Nothing", {"NULL": [True]}), INSERT)
    assert not matches(NI("AccountManager", {"NULL": [True]}), INSERT)
    assert matches(NI("Active", {"BOOL": [True]}), INSERT)
    assert not matches(NI("Active", {"BOOL": [False]}), INSERT)
    assert not matches(NI("Active", {"BOOL": ["true"]}), INSERT)
    assert matches(NI("Empty", {"S": [""]}), INSERT)
    assert not matches(NI("AccountManager", {"S": [""]}), INSERT)


def test_null_literal_matches_json_null_only():
    view = LambdaView(INSERT)
    assert view.resolve(("dynamodb", "NewImage", "Nothing", "NULL")) == [True]
    assert not matches(NI("Nothing", {"NULL": [None]}), INSERT)


def test_sets_lists_maps_binary():
    assert matches(NI("Tags", {"SS": ["eu"]}), INSERT)
    assert not matches(NI("Tags", {"SS": ["us"]}), INSERT)
    assert matches(NI("Organizations", {"L": {"S": ["Marketing"]}}), INSERT)
    assert matches(NI("Organizations", {"L": {"M": {"Name": {"S": ["Support"]}}}}), INSERT)
    assert matches(NI("Address", {"M": {"City": {"S": ["Seattle"]}, "Geo": {"M": {"Lat": {"N": ["47.6"]}}}}}), INSERT)
    assert not matches(NI("Address", {"M": {"City": {"S": ["Paris"]}}}), INSERT)
    assert matches(NI("Blob", {"B": ["AAE="]}), INSERT)  # base64 text, as Lambda shows binary


def test_anything_but_needs_the_field():
    assert not matches(NI("Missing", {"S": [{"anything-but": "x"}]}), INSERT)
    assert not matches(NI("AccountManager", {"S": [{"anything-but": "x"}]}), REMOVE)


def test_ttl_deletes_by_user_identity():
    p = {"userIdentity": {"type": ["Service"], "principalId": ["dynamodb.amazonaws.com"]}}
    assert matches(p, TTL_REMOVE)
    assert not matches(p, REMOVE) and not matches(p, INSERT)
    not_ttl = {"userIdentity": {"type": [{"exists": False}]}}
    assert matches(not_ttl, REMOVE) and not matches(not_ttl, TTL_REMOVE)


def test_metadata_fields():
    assert matches({"eventSource": ["aws:dynamodb"], "awsRegion": ["us-east-1"]}, INSERT)
    assert matches({"dynamodb": {"StreamViewType": ["NEW_AND_OLD_IMAGES"]}}, INSERT)
    assert matches({"eventSourceARN": [{"prefix": "arn:aws:dynamodb:us-east-1:"}]}, INSERT)


def test_snapshot_events_show_as_insert():
    from dataclasses import replace

    snap = replace(INSERT, operation=Operation.SNAPSHOT)
    assert matches({"eventName": ["INSERT"]}, snap)


def test_several_patterns_are_ored():
    p = [{"eventName": ["REMOVE"]}, NI("AccountManager", {"S": ["Shirley Rodriguez"]})]
    assert matches(p, REMOVE) and matches(p, MODIFY) and not matches(p, INSERT)
    fc = {"Filters": [{"Pattern": orjson.dumps(x).decode()} for x in p]}
    assert matches(fc, REMOVE) and matches(fc, MODIFY) and not matches(fc, INSERT)


def test_raw_attribute_maps_are_used_when_the_event_keeps_them():
    """With ``raw_new_image`` (the lazy event), the view reads the raw AttributeValue, not the
    decoded ``after`` — and converts boto3's bytes to base64 text."""

    class RawEvent:
        def __init__(self, base):
            self._base = base
            self.raw_keys = {"CustomerName": {"S": "AnyCompany Industries"}}
            self.raw_new_image = {"Status": {"S": "raw"}, "Blob": {"B": b"\x00\x01"}}
            self.raw_old_image = None

        def __getattr__(self, name):
            return getattr(self._base, name)

        @property
        def after(self):
            raise AssertionError("the decoded image must not be read")

    ev = RawEvent(INSERT)
    assert compile_filter(NI("Status", {"S": ["raw"]})).matches(ev)
    assert compile_filter(NI("Blob", {"B": ["AAE="]})).matches(ev)
    assert compile_filter({"dynamodb": {"Keys": {"CustomerName": {"S": [{"exists": True}]}}}}).matches(ev)


def test_only_named_attributes_are_encoded(monkeypatch):
    """Item 5: a match encodes the attributes the pattern names, not the whole image."""
    import pipeline.shaping.view as view

    seen = []
    real = view.encode_value
    monkeypatch.setattr(view, "encode_value", lambda v: (seen.append(v), real(v))[1])
    compiled = compile_filter({"eventName": ["INSERT"], "dynamodb": {"NewImage": {"Quantity": {"N": ["5"]}}}})
    assert compiled.attributes == {("NewImage", "Quantity")}
    fresh = _event(new=ITEM)  # a lazy event (issue 16): the pattern reads its wire form
    assert fresh.is_lazy and compiled.matches(fresh)
    assert seen == [] and fresh.is_lazy  # nothing encoded, no image decoded
    decoded = _event(new=ITEM)
    _ = decoded.after, decoded.before  # decoded first: still only the named attribute is looked at
    assert compiled.matches(decoded)


# -- validation: one line naming the bad part ------------------------------------------------------


@pytest.mark.parametrize("pattern, where, words", [
    ({"dynamodb": {"NewImage": {"Status": ["x"]}}}, "dynamodb.NewImage.Status", "under the attribute's type"),
    ({"dynamodb": {"NewImag": {"a": {"S": ["x"]}}}}, "dynamodb.NewImag", "unknown field"),
    ({"dynamoDB": {}}, "dynamoDB", "unknown field"),
    ({"dynamodb": {"NewImage": {"a": {"STR": ["x"]}}}}, "dynamodb.NewImage.a.STR", "unknown AttributeValue type"),
    ({"eventName": "INSERT"}, "eventName", "array of rules"),
    ({"eventName": []}, "eventName", "empty rule array"),
    ({}, "(pattern)", "empty object"),
    ({"eventName": [{"prefix": 1}]}, "eventName[0]", "prefix takes a string"),
    ({"eventName": [{"prefix": "a", "suffix": "b"}]}, "eventName[0]", "exactly one operator"),
    ({"eventName": [{"wildcard": "a*"}]}, "eventName[0]", "not supported"),
    ({"eventName": [{"regex": "a"}]}, "eventName[0]", "unknown operator"),
    ({"$or": [{"eventName": ["INSERT"]}]}, "$or", "not supported"),
    ({"dynamodb": {"SizeBytes": [{"numeric": [">", "1"]}]}}, "dynamodb.SizeBytes[0]", "not a JSON number"),
    ({"dynamodb": {"SizeBytes": [{"numeric": [">", 1, ">", 2]}]}}, "dynamodb.SizeBytes[0]", "lower bound"),
    ({"dynamodb": {"SizeBytes": [{"numeric": [">", 5, "<", 2]}]}}, "dynamodb.SizeBytes[0]", "empty"),
    ({"dynamodb": {"SizeBytes": [{"numeric": ["~", 5]}]}}, "dynamodb.SizeBytes[0]", "not one of"),
    ({"dynamodb": {"SizeBytes": [{"exists": "yes"}]}}, "dynamodb.SizeBytes[0]", "true or false"),
    ({"eventName": [{"anything-but": []}]}, "eventName[0]", "at least one"),
    ({"eventName": [["INSERT"]]}, "eventName[0]", "not an array"),
    ({"dynamodb": ["x"]}, "dynamodb", "not a leaf"),
    ({"userIdentity": {"Type": ["Service"]}}, "userIdentity.Type", "unknown field"),
    ("{not json", "", "not valid JSON"),
    ({"Filters": [{"Pattern": "{]"}]}, "Filters[0].Pattern", "not valid JSON"),
    ({"Filters": []}, "Filters", "non-empty"),
    ([], "", "empty list"),
])
def test_bad_patterns_are_one_line_errors(pattern, where, words):
    with pytest.raises(FilterPatternError) as info:
        compile_filter(pattern)
    assert isinstance(info.value, ConfigError)
    assert info.value.where == where
    assert words in info.value.message
    assert len(info.value.problems) == 1 and "\n" not in info.value.problems[0]
