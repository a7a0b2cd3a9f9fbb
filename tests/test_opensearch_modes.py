"""OpenSearch mapping modes, index template and alias, against osmem-server (a fresh clone per test).

The sink is driven directly with decoded stream records; tests/test_opensearch_single_table.py
runs the same modes through the worker and DynamoDB Local.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from connectors.opensearch.sink import OpenSearchSink, restore_document
from connectors.opensearch.mapping import MappingSpec, MappingSpecError
from pipeline.errors import FatalSinkError, PartialSinkError
from pipeline.render import to_plain
from tests.test_opensearch_sink import T0, batch, context, item, make_event

BIG_INT = "12345678901234567890123456789012345678"  # 38 digits, DynamoDB's maximum precision


def request(url: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read(), parse_float=Decimal)
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read() or b"{}")}


def search(url: str, index: str, query: dict[str, Any]) -> set[str]:
    request(url, "POST", f"/{index}/_refresh")
    found = request(url, "POST", f"/{index}/_search", {"query": query, "size": 1000})
    return {hit["_id"] for hit in found["hits"]["hits"]}


def sources(url: str, index: str) -> dict[str, Any]:
    request(url, "POST", f"/{index}/_refresh")
    found = request(url, "POST", f"/{index}/_search", {"query": {"match_all": {}}, "size": 1000})
    return {hit["_id"]: hit["_source"] for hit in found["hits"]["hits"]}


def field_count(mapping: dict[str, Any]) -> int:
    """Mapped fields (objects, leaves and multi-fields), as OpenSearch counts them for the limit."""
    total = 0
    for spec in (mapping.get("properties") or {}).values():
        total += 1 + field_count(spec) + len(spec.get("fields") or {})
    return total


def open_sink(url: str, **options: Any) -> OpenSearchSink:
    options.setdefault("index", "m-{table}")
    options.setdefault("retry_backoff_s", 0)
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=[url], **options))
    sink.open(context())
    return sink


@pytest.fixture
def table() -> str:
    return f"St_{uuid.uuid4().hex[:8]}"


def mixed_events(table: str) -> list:
    """One attribute name (``value``) holding S, N, M and L; lists of mixed types; huge and tiny
    numbers; an id-keyed map; a reserved and a dotted name."""
    n = lambda text: {"N": text}  # noqa: E731
    images = [
        item("a", value={"S": "text"}, total=n("12"), created={"S": "2024-05-01T12:00:00Z"}),
        item("b", value=n(BIG_INT), total={"S": "not a number"}, created={"S": "yesterday"}),
        item("c", value={"M": {"x": {"S": "y"}, "deep": {"M": {"z": n("1E-130")}}}}, total=n("1E+125")),
        item("d", value={"L": [{"S": "s"}, n("1"), {"M": {"k": {"BOOL": True}}}, {"NULL": True}]}, total=n(BIG_INT)),
        item("e", value={"SS": ["p", "q"]}, total={"M": {"oops": {"S": "map"}}}, tags={"NS": ["1E-130", BIG_INT]}),
        item("f", counts={"M": {f"id-{i}": n(str(i)) for i in range(2500)}}, _id={"S": "reserved"},
             **{"a.b": {"S": "dotted"}}),
        item("g", counts={"M": {f"id-{i}": n(str(i)) for i in range(2500, 5000)}}, blob={"B": "AAEC"}),
    ]
    return [make_event(table, "INSERT", {"pk": img["pk"]}, seq=i + 1, t=T0 + i, new=img)
            for i, img in enumerate(images)]


def assert_sources_equal_items(url: str, index: str, events: list) -> dict[str, Any]:
    docs = sources(url, index)
    assert set(docs) == {ev.key_id for ev in events}
    for ev in events:
        assert restore_document(docs[ev.key_id]) == to_plain(ev.after), ev.key_id
    return docs


# --------------------------------------------------------------------------------------------
# typed
# --------------------------------------------------------------------------------------------


def test_typed_mode_indexes_every_item_exactly_and_answers_typed_queries(opensearch_url, table):
    sink = open_sink(opensearch_url, refresh=True)
    events = mixed_events(table)
    sink.write(batch(table, *events))  # raises PartialSinkError if any document were refused
    alias = f"m-{table}".lower()
    docs = assert_sources_equal_items(opensearch_url, alias, events)
    # _source is the item as AttributeValue JSON: numbers exact, as DynamoDB holds them
    assert docs["b"]["value"] == {"N": BIG_INT}
    assert docs["e"]["tags"] == {"NS": ["1E-130", BIG_INT]}  # sets sorted by value
    assert docs["f"]["_ddb_id"] == {"S": "reserved"} and docs["f"]["_ddba%2Eb"] == {"S": "dotted"}
    assert docs["a"]["_cdc"]["mapping"] == "typed"
    # the README's query examples
    assert search(opensearch_url, alias, {"term": {"value.S": "text"}}) == {"a"}
    assert search(opensearch_url, alias, {"range": {"total.N.double": {"gte": 1e100}}}) == {"c"}
    assert search(opensearch_url, alias, {"range": {"total.N.double": {"gt": 1e30}}}) == {"c", "d"}
    assert search(opensearch_url, alias, {"term": {"total.N": BIG_INT}}) == {"d"}
    assert search(opensearch_url, alias, {"exists": {"field": "total.S"}}) == {"b"}
    assert search(opensearch_url, alias, {"term": {"value.M.x.S": "y"}}) == {"c"}
    assert search(opensearch_url, alias, {"term": {"value.L.M.k.BOOL": "true"}}) == {"d"}
    assert search(opensearch_url, alias, {"term": {"counts.M.id-4321.N": "4321"}}) == {"g"}
    assert search(opensearch_url, alias, {"term": {"value.SS": "q"}}) == {"e"}
    assert search(opensearch_url, alias, {"match": {"value.S.text": "TEXT"}}) == {"a"}
    # 5,000 distinct map keys and 7 attribute names: the mapping stays small
    mapping = request(opensearch_url, "GET", f"/{alias}/_mapping")
    (index, body), = mapping.items()
    assert index == f"{alias}-v1"
    assert field_count(body["mappings"]) < 100, field_count(body["mappings"])


def test_typed_mode_puts_an_item_past_the_field_limit_whole_under_ddo(opensearch_url, table):
    sink = open_sink(opensearch_url, refresh=True, total_fields_limit=40)
    wide = item("wide", **{f"attr{i}": {"S": f"v{i}"} for i in range(60)})
    narrow = item("narrow", attr1={"S": "x"})
    events = [make_event(table, "INSERT", {"pk": {"S": "wide"}}, seq=1, new=wide),
              make_event(table, "INSERT", {"pk": {"S": "narrow"}}, seq=2, new=narrow)]
    sink.write(batch(table, *events))
    alias = f"m-{table}".lower()
    docs = assert_sources_equal_items(opensearch_url, alias, events)
    assert docs["wide"]["_cdc"]["overflow"] is True and "_ddo" in docs["wide"]
    assert "_ddo" not in docs["narrow"]
    assert search(opensearch_url, alias, {"term": {"_ddo.attr59.S": "v59"}}) == {"wide"}


# --------------------------------------------------------------------------------------------
# explicit
# --------------------------------------------------------------------------------------------

EXPLICIT_FIELDS = {"value": "keyword", "total": "long", "created": "date", "counts": "flat_object",
                   "tags": "double", "pk": "keyword"}


def test_explicit_mode_never_refuses_and_notes_values_that_do_not_fit(opensearch_url, table):
    sink = open_sink(opensearch_url, refresh=True, fields=EXPLICIT_FIELDS)
    assert sink.options.spec().mode == "explicit"  # the default when fields are declared
    events = mixed_events(table)
    sink.write(batch(table, *events))
    alias = f"m-{table}".lower()
    docs = assert_sources_equal_items(opensearch_url, alias, events)
    malformed = {doc_id: doc["_cdc"].get("malformed", []) for doc_id, doc in docs.items()}
    assert malformed == {
        "a": [],
        "b": ["created", "total"],  # "yesterday" is no date, a string is no long
        "c": ["total", "value"],  # 1E+125 is beyond a long; a map is no keyword
        "d": ["total", "value"],  # 38 digits are beyond a long; a list holding a map is no keyword
        "e": ["total"],
        "f": [],
        "g": [],
    }
    assert "_ddmtotal" in docs["b"] and "total" not in docs["b"]
    # declared fields are searchable with their types; the moved values are not indexed
    assert search(opensearch_url, alias, {"range": {"total": {"gte": 10}}}) == {"a"}
    assert search(opensearch_url, alias, {"term": {"value": "text"}}) == {"a"}
    assert search(opensearch_url, alias, {"term": {"value": "q"}}) == {"e"}  # a string set fits keyword
    assert search(opensearch_url, alias, {"term": {"_cdc.malformed": "total"}}) == {"b", "c", "d", "e"}
    assert search(opensearch_url, alias, {"range": {"created": {"gte": "2024-01-01"}}}) == {"a"}
    assert search(opensearch_url, alias, {"term": {"counts.id-17": "17"}}) == {"f"}
    # undeclared attributes are kept in _source but not mapped: the mapping is what was declared
    mapping = request(opensearch_url, "GET", f"/{alias}/_mapping")
    (body,) = mapping.values()
    assert body["mappings"]["dynamic"] in (False, "false")
    assert set(body["mappings"]["properties"]) == set(EXPLICIT_FIELDS) | {"_cdc"}


def test_explicit_nested_field_paths_move_a_non_map_parent_aside(opensearch_url, table):
    sink = open_sink(opensearch_url, refresh=True, fields={"address.city": "keyword", "address.zip": "integer"})
    images = [item("m1", address={"M": {"city": {"S": "Oslo"}, "zip": {"N": "150"}}}),
              item("m2", address={"S": "just a string"}),
              item("m3", address={"L": [{"M": {"city": {"S": "Rome"}}}, {"M": {"zip": {"S": "x"}}}]})]
    events = [make_event(table, "INSERT", {"pk": img["pk"]}, seq=i + 1, new=img) for i, img in enumerate(images)]
    sink.write(batch(table, *events))
    alias = f"m-{table}".lower()
    docs = assert_sources_equal_items(opensearch_url, alias, events)
    assert docs["m2"]["_cdc"]["malformed"] == ["address"] and "_ddmaddress" in docs["m2"]
    assert docs["m3"]["_cdc"]["malformed"] == ["address.zip"]
    assert search(opensearch_url, alias, {"term": {"address.city": "Rome"}}) == {"m3"}
    assert search(opensearch_url, alias, {"range": {"address.zip": {"gte": 100}}}) == {"m1"}


def test_field_declarations_are_checked_with_one_line_errors():
    base = {"hosts": ["http://127.0.0.1:9"]}
    for options, needle in [
        ({"fields": {"a": "strnig"}}, "type 'strnig'"),
        ({"fields": {"a": "keyword", "a.b": "long"}}, "inside the declared field 'a'"),
        ({"fields": {"_id": "keyword"}}, "cannot be declared"),
        ({"mapping": "typed", "fields": {"a": "keyword"}}, "mapping: explicit"),
        ({"mapping": "explicit"}, "needs fields"),
    ]:
        with pytest.raises(ValidationError) as err:
            OpenSearchSink.Options(**base, **options)
        assert needle in str(err.value), str(err.value)
    assert OpenSearchSink.Options(**base).spec().mode == "typed"
    with pytest.raises(MappingSpecError):
        MappingSpec.from_meta({"mode": "other"})


# --------------------------------------------------------------------------------------------
# dynamic
# --------------------------------------------------------------------------------------------


def test_dynamic_mode_refuses_conflicting_items_as_permanent_failures_with_the_event(opensearch_url, table):
    sink = open_sink(opensearch_url, refresh=True, mapping="dynamic")
    events = mixed_events(table)
    with pytest.raises(PartialSinkError) as err:
        sink.write(batch(table, *events))
    failed = {ev.key_id for ev, _ in err.value.permanent}
    assert not err.value.retriable
    # "a" maps value as text and total as long; later items that disagree are refused, never dropped
    assert {"b", "c", "d"} <= failed and "a" not in failed
    assert all(ev.after is not None for ev, _ in err.value.permanent)  # the dead letter gets the images
    assert any("mapper_parsing_exception" in reason or "Limit of total fields" in reason
               for _, reason in err.value.permanent)
    docs = sources(opensearch_url, f"m-{table}".lower())
    assert set(docs) == {ev.key_id for ev in events} - failed


# --------------------------------------------------------------------------------------------
# template, alias, versions
# --------------------------------------------------------------------------------------------


def test_template_and_alias_are_created_once_and_reused(opensearch_url, table):
    alias = f"m-{table}".lower()
    sink = open_sink(opensearch_url, refresh=True, total_fields_limit=321, index_settings={"index.number_of_shards": 2})
    sink.write(batch(table, make_event(table, "INSERT", {"pk": {"S": "x"}}, seq=1, new=item("x"))))
    template = request(opensearch_url, "GET", f"/_index_template/ddb-cdc-{alias}")["index_templates"][0]
    body = template["index_template"]
    assert body["index_patterns"] == [f"{alias}-v*"] and body["priority"] == 100 + len(alias)
    assert body["_meta"]["managed_by"] == "ddb-cdc"
    settings = request(opensearch_url, "GET", f"/{alias}-v1/_settings")[f"{alias}-v1"]["settings"]["index"]
    assert settings["mapping"]["total_fields"]["limit"] == "321" and settings["number_of_shards"] == "2"
    assert request(opensearch_url, "GET", f"/_alias/{alias}") == {f"{alias}-v1": {"aliases": {alias: {"is_write_index": True}}}}
    # a second sink (another worker, a restart) finds everything in place and changes nothing
    again = open_sink(opensearch_url, refresh=True, total_fields_limit=321, index_settings={"index.number_of_shards": 2})
    assert again.admin.ensure_template(alias, again.options.spec(), again.options.index_settings) is False
    again.write(batch(table, make_event(table, "INSERT", {"pk": {"S": "y"}}, seq=2, new=item("y"))))
    assert set(sources(opensearch_url, alias)) == {"x", "y"}
    assert request(opensearch_url, "GET", f"/{alias}-v2").get("status") == 404


def test_a_bare_index_of_the_alias_name_is_never_written(opensearch_url, table):
    alias = f"m-{table}".lower()
    request(opensearch_url, "PUT", f"/{alias}", {})
    sink = open_sink(opensearch_url)
    with pytest.raises(FatalSinkError) as err:
        sink.write(batch(table, make_event(table, "INSERT", {"pk": {"S": "x"}}, seq=1, new=item("x"))))
    assert "ddb-cdc opensearch reindex --sink search" in str(err.value) and "\n" not in str(err.value)
    assert request(opensearch_url, "GET", f"/{alias}/_count")["count"] == 0


def test_the_sink_renders_for_the_mapping_its_index_was_created_with(opensearch_url, table, caplog):
    alias = f"m-{table}".lower()
    first = open_sink(opensearch_url, refresh=True)  # typed: creates v1
    first.write(batch(table, make_event(table, "INSERT", {"pk": {"S": "x"}}, seq=1, new=item("x", n={"N": "1"}))))
    caplog.set_level(logging.WARNING)
    changed = open_sink(opensearch_url, refresh=True, fields={"n": "long"})  # config now says explicit
    changed.write(batch(table, make_event(table, "INSERT", {"pk": {"S": "y"}}, seq=2, new=item("y", n={"N": "2"}))))
    docs = sources(opensearch_url, alias)
    assert docs["y"]["n"] == {"N": "2"}  # still typed: v1 is a typed index until a reindex
    assert "opensearch_mapping_differs" in caplog.text and "ddb-cdc opensearch reindex" in caplog.text
    # and it leaves the template alone: only a reindex changes it (workers never undo each other)
    template = request(opensearch_url, "GET", f"/_index_template/ddb-cdc-{alias}")["index_templates"][0]
    assert template["index_template"]["template"]["mappings"]["_meta"]["ddb_cdc"]["mode"] == "typed"


def test_a_deleted_index_behind_the_alias_is_set_up_again_not_auto_created_bare(opensearch_url, table):
    alias = f"m-{table}".lower()
    sink = open_sink(opensearch_url, refresh=True)
    sink.write(batch(table, make_event(table, "INSERT", {"pk": {"S": "x"}}, seq=1, new=item("x"))))
    assert request(opensearch_url, "DELETE", f"/{alias}-v1") == {"acknowledged": True}
    sink.write(batch(table, make_event(table, "INSERT", {"pk": {"S": "y"}}, seq=2, new=item("y"))))
    assert request(opensearch_url, "GET", f"/_alias/{alias}") == {f"{alias}-v1": {"aliases": {alias: {"is_write_index": True}}}}
    assert set(sources(opensearch_url, alias)) == {"y"}
    mapping = request(opensearch_url, "GET", f"/{alias}-v1/_mapping")[f"{alias}-v1"]["mappings"]
    assert mapping["_meta"]["ddb_cdc"]["mode"] == "typed"  # made from the template, not by auto-creation
