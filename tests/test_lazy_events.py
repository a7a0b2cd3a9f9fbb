"""Issue 16: the raw-preserving, lazily decoded change event.

- lazily and eagerly decoded events are equal for every record of the benchmark suite's generator
  and for generated items (both B encodings);
- the S3 audit line and the typed OpenSearch document rendered from the wire form are byte for
  byte the old decode → encode renderings (over hypothesis wire values, non-canonical and
  invalid ones included, the suite's records and the hostile ones);
- a lazy image that cannot be decoded raises on every access, and the fan-out dead-letters its
  raw record as a ``decode`` entry — never a crash, never an endless retry;
- pickling, ``dataclasses.replace``, concurrent first access, snapshot events from Scan items,
  Redis decoding only the attributes its templates name.
"""

from __future__ import annotations

import base64
import dataclasses
import pickle
import threading
from decimal import Decimal

import orjson
import pytest
from boto3.dynamodb.types import TypeSerializer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from benchmarks import inputs
from connectors.opensearch.mapping import MappingSpec, typed_item, typed_item_from_av
from connectors.opensearch.sink import OpenSearchSink
from connectors.redis_cache import RedisCacheSink
from pipeline.avjson import canonical_item
from pipeline.codec import decode_item, decode_record, encode_item, event_from_item
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.errors import DecodeError
from pipeline.events import Batch, ChangeEvent, Operation, Source
from pipeline.render import event_from_record_dict, event_to_json_line, plain_json_bytes
import structlog

from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.testing import RecordingSink, make_stream_record
from tests.test_codec import _to_base64_form, items
from tests.test_hostile_records import hostile_records

ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-01-01T00:00:00.000"
SER = TypeSerializer()


def lazy(record):
    return decode_record(record, table="t", stream_arn=ARN, shard_id="shardId-1", version_floor=7)


def eager(record):
    """The event as the old decoder built it: every part decoded into the public constructor."""
    ev = decode_record(record, table="t", stream_arn=ARN, shard_id="shardId-1", version_floor=7, eager=True)
    return ChangeEvent(ev.operation, dict(ev.keys), ev.key_id, ev.before, ev.after, ev.source, ev.version)


def old_line(event: ChangeEvent) -> bytes:
    """The S3 audit line as 86b1e25 rendered it: decoded values encoded back (encode_item)."""
    src = event.source
    created = src.approximate_creation_time
    return orjson.dumps({
        "op": event.op, "operation": event.operation.value, "key_id": event.key_id, "version": event.version,
        "keys": encode_item(event.keys), "before": encode_item(event.before), "after": encode_item(event.after),
        "source": {"table": src.table, "stream_arn": src.stream_arn, "shard_id": src.shard_id,
                   "sequence_number": src.sequence_number, "event_id": src.event_id,
                   "approximate_creation_time": created.isoformat() if created else None,
                   "stream_view_type": src.stream_view_type, "size_bytes": src.size_bytes,
                   "ttl_delete": src.ttl_delete},
    }, option=orjson.OPT_APPEND_NEWLINE)


def suite_records():
    return inputs.make_records(3000) + inputs.make_records(500, shard_no=3, seed=11)


# -- wire values, canonical and not --------------------------------------------------------------

digits = st.text("0123456789", min_size=1, max_size=45)
number_texts = st.one_of(
    digits,
    st.builds(lambda s, a, b: f"{s}{a}.{b}", st.sampled_from(["", "-"]), digits, digits),
    st.builds(lambda a, e: f"{a}e{e}", digits, st.integers(-140, 140)),
    st.sampled_from(["-0", "0.0", "007", "1E+2", "1e-7", "0.0000001", "0.000001", ".5", "5.", "1" * 126,
                     "1" * 39, "-" + "9" * 38, "NaN", "Infinity", "1e400", "", "+1", " 1", "١٢٣", "²", "0x10"]),
)
b64_texts = st.one_of(st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode()),
                      st.sampled_from(["QR==", "QQ", "Q===", "!!", "QUI=\n", ""]))
wire_scalars = st.one_of(
    st.builds(lambda s: {"S": s}, st.text(max_size=8)),
    st.builds(lambda n: {"N": n}, number_texts),
    st.builds(lambda b: {"B": b}, b64_texts),
    st.builds(lambda b: {"B": b}, st.binary(max_size=8)),  # boto3's shape
    st.builds(lambda b: {"BOOL": b}, st.booleans()),
    st.builds(lambda v: {"NULL": v}, st.sampled_from([True, False, None, "x"])),
    st.builds(lambda v: {"SS": v}, st.lists(st.sampled_from(["a", "b", "c", "é", ""]), max_size=4)),
    st.builds(lambda v: {"NS": v}, st.lists(st.sampled_from(["1", "1.0", "2", "-3", "10", "1e1", "x"]), max_size=4)),
    st.builds(lambda v: {"BS": v}, st.lists(b64_texts, max_size=3)),
    st.sampled_from([{}, {"S": 1}, {"N": 5}, {"BOOL": "true"}, {"Q": "x"}, {"S": "a", "N": "1"}, [], "S"]),
)
wire_values = st.recursive(
    wire_scalars,
    lambda children: st.one_of(
        st.builds(lambda v: {"L": v}, st.lists(children, max_size=3)),
        st.builds(lambda v: {"M": v}, st.dictionaries(st.sampled_from(["a", "_id", "x.y", "", " ", "_ddbq", "M"]),
                                                      children, max_size=3)),
    ),
    max_leaves=12,
)
wire_items = st.dictionaries(st.sampled_from(["pk", "a", "_id", "_cdc", "x.y", "", "n", "_ddb", "L"]),
                             wire_values, max_size=5)


def nested(levels, kind="M"):
    value = {"N": "007"}
    for _ in range(levels):
        value = {"M": {"a": value}} if kind == "M" else {"L": [value]}
    return value


#: Wire items at the edges the C extensions of ``speedups/`` must hand back or match exactly:
#: nesting at and past ``MAX_NESTING_DEPTH``, names to escape, ``NULL: false``, ``{}``, unsorted
#: and duplicate sets, non-canonical base64, two tags, a map named like a tag.
EDGE_WIRE_ITEMS = [
    {"deep": nested(32)}, {"deep": nested(33)}, {"deep": nested(34)}, {"deep": nested(34, "L")},
    {"m": {"M": {"x.y": {"N": "1.50"}, "_id": {"NULL": False}}}},
    {"e": {}, "ss": {"SS": ["b", "a", "b"]}, "ns": {"NS": ["2", "1.0", "1"]}},
    {"bs": {"BS": ["QQ==", "QR==", "AA=="]}, "b": {"B": "QUJ="}},
    {"two": {"S": "a", "N": "1"}, "ml": {"M": {}, "L": []}, "S": {"M": {"N": {"S": "x"}}}},
]


def with_edge_wire_items(test):
    """Hypothesis ``@example`` of every :data:`EDGE_WIRE_ITEMS` item on a ``@given(wire_items)`` test."""
    from hypothesis import example

    for item in reversed(EDGE_WIRE_ITEMS):
        test = example(item)(test)
    return test


def _reference(image):
    """(old rendering bytes, old typed OpenSearch bytes) of an image, or the DecodeError type."""
    try:
        decoded = decode_item(image)
    except DecodeError:
        return DecodeError
    if decoded is None:
        return None
    return orjson.dumps(encode_item(decoded)), plain_json_bytes(typed_item(decoded))


def _from_raw(image):
    try:
        canon = canonical_item(image)
    except DecodeError:
        return DecodeError
    if canon is None:
        return None
    return orjson.dumps(canon), plain_json_bytes(typed_item_from_av(canon))


@settings(max_examples=500, deadline=None)
@given(wire_items)
@example({"deep": nested(33)})
@example({"deep": nested(34)})
@example({"deep": nested(34, "L")})
@example({"m": {"M": {"x.y": {"N": "1.50"}, "_id": {"NULL": False}}}})
@example({"e": {}, "ss": {"SS": ["b", "a", "b"]}, "ns": {"NS": ["2", "1.0", "1"]}})
def test_canonical_rendering_from_the_wire_form_is_byte_for_byte_the_decode_encode_one(image):
    assert _from_raw(image) == _reference(image)


@pytest.mark.parametrize("image", [None, 5, "x", [], {1: {"S": "a"}}, {"a": None}])
def test_canonical_rendering_rejects_what_the_decoder_rejects(image):
    assert _from_raw(image) == _reference(image)


def test_canonical_values_are_reused_not_copied():
    image = {"s": {"S": "x"}, "n": {"N": "42"}, "m": {"M": {"l": {"L": [{"BOOL": True}, {"NULL": True}]}}},
             "ss": {"SS": ["a", "b"]}}
    canon = canonical_item(image)
    assert canon == image and canon is not image  # a new top level (callers add to it) …
    assert all(canon[k] is image[k] for k in image)  # … over the very objects parsed
    assert canonical_item({"n": {"N": "042"}}) == {"n": {"N": "42"}}


# -- lazy == eager, and the renderings, over the suite's records -----------------------------------

def test_lazy_and_eager_events_are_equal_for_every_record_of_the_suite_generator():
    for record in suite_records():
        a, b = lazy(record), eager(record)
        assert a.is_lazy or (a.before is None and a.after is None)
        assert a == b and b == a
        assert a.keys == b.keys and a.before == b.before and a.after == b.after
        assert a.key_id == b.key_id and a.version == b.version and a.source == b.source


def test_s3_lines_and_typed_documents_from_the_wire_form_match_the_old_renderings_on_the_suite():
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=["http://127.0.0.1:1"]))
    typed = MappingSpec.build("typed")
    for record in suite_records():
        a, b = lazy(record), eager(record)
        assert event_to_json_line(a) == old_line(b) == event_to_json_line(b)
        assert event_from_record_dict(orjson.loads(event_to_json_line(a))) == b  # lines rebuild the event
        if a.operation is not Operation.REMOVE:
            assert sink._render_source(a, typed) == sink._render_source(b, typed)
            assert sink._render_source(a, typed, overflow=True) == sink._render_source(b, typed, overflow=True)
        assert a.is_lazy or a.before is None  # the renderings did not decode the images
        assert a.raw_new_image is record["dynamodb"].get("NewImage")  # the wire form is kept as parsed


def test_a_keys_only_typed_document_from_the_wire_form_matches():
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=["http://127.0.0.1:1"]))
    rec = make_stream_record(event_name="INSERT", keys={"pk": "a.b", "_id": Decimal("7")},
                             view_type="KEYS_ONLY", new_image=None)
    rec["dynamodb"].pop("NewImage", None)
    assert sink._render_source(lazy(rec), MappingSpec.build("typed")) == \
        sink._render_source(eager(rec), MappingSpec.build("typed"))


@settings(max_examples=300, deadline=None)
@given(items, st.booleans(), st.sampled_from(["INSERT", "MODIFY", "REMOVE"]))
def test_generated_items_lazy_equals_eager_and_renders_the_same_in_both_b_encodings(item, b64, name):
    wire = {k: SER.serialize(v) for k, v in item.items()}  # boto3's shape: B as bytes
    if b64:
        wire = {k: _to_base64_form(v) for k, v in wire.items()}  # Lambda / JSON shape
    record = {"eventID": "e1", "eventName": name, "dynamodb": {
        "Keys": {"pk": {"S": "k"}}, "NewImage": {**wire, "pk": {"S": "k"}}, "OldImage": wire,
        "SequenceNumber": "300000000000000000042", "SizeBytes": 10, "StreamViewType": "NEW_AND_OLD_IMAGES",
        "ApproximateCreationDateTime": 1767225600.0}}
    a, b = lazy(record), eager(record)
    assert a == b
    assert event_to_json_line(lazy(record)) == old_line(b)
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=["http://127.0.0.1:1"]))
    assert sink._render_source(lazy(record), MappingSpec.build("typed")) == sink._render_source(b, MappingSpec.build("typed"))


@pytest.mark.parametrize("what,record", hostile_records(deep=40), ids=[w for w, _ in hostile_records(deep=40)])
def test_hostile_records_render_or_fail_alike(what, record):
    try:
        b = eager(record)
    except DecodeError:
        try:
            a = lazy(record)
        except DecodeError:
            return  # rejected at read time, as before
        with pytest.raises(DecodeError):
            event_to_json_line(a)
        with pytest.raises(DecodeError):
            a.typed_parts()
        return
    assert event_to_json_line(lazy(record)) == old_line(b)


# -- the event's own guarantees ---------------------------------------------------------------------

def test_pickle_copy_and_replace_keep_the_event():
    import copy

    record = inputs.make_records(3)[0]
    ev = lazy(record)
    back = pickle.loads(pickle.dumps(ev))
    assert back.is_lazy and back == eager(record) and back.raw_new_image == record["dynamodb"]["NewImage"]
    decoded = lazy(record)
    decoded.after
    assert pickle.loads(pickle.dumps(decoded)) == ev
    assert copy.deepcopy(ev) == ev and copy.copy(ev) is ev
    moved = dataclasses.replace(ev, version=5)
    assert moved.version == 5 and moved.after == ev.after
    assert dataclasses.is_dataclass(ev) and [f.name for f in dataclasses.fields(ev)][:3] == ["operation", "keys", "key_id"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.version = 1
    with pytest.raises(TypeError):
        hash(ev)


def test_concurrent_first_access_decodes_once_and_every_reader_gets_the_same_object():
    for record in inputs.make_records(20):
        ev = lazy(record)
        seen: list = []
        barrier = threading.Barrier(8)

        def read():
            barrier.wait()
            seen.append((ev.after, ev.before))

        threads = [threading.Thread(target=read) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(after) for after, _ in seen}) == 1 and len({id(before) for _, before in seen}) == 1


def test_read_time_checks_and_first_access_errors():
    rec = make_stream_record(event_name="MODIFY", keys={"pk": "k"}, new_image={"pk": "k"}, old_image={"pk": "k"})
    rec["dynamodb"]["NewImage"]["n"] = {"N": "not a number"}
    ev = lazy(rec)  # the keys, sequence number and the rest are fine: read
    assert ev.before == {"pk": "k"}
    for _ in range(3):
        with pytest.raises(DecodeError, match="not a DynamoDB number"):
            ev.after
    assert isinstance(ev.decode_error(), DecodeError)
    assert "<DecodeError" in repr(ev)
    with pytest.raises(DecodeError):
        decode_record(rec, table="t", stream_arn=ARN, shard_id="s", eager=True)
    bad_keys = make_stream_record(event_name="INSERT", keys={"pk": "k"}, new_image={"pk": "k"})
    bad_keys["dynamodb"]["Keys"] = {"pk": {"N": "x"}}
    with pytest.raises(DecodeError):  # keys are decoded at read time
        lazy(bad_keys)
    not_a_map = make_stream_record(event_name="INSERT", keys={"pk": "k"}, new_image={"pk": "k"})
    not_a_map["dynamodb"]["NewImage"] = ["x"]
    with pytest.raises(DecodeError, match="NewImage"):  # so is the images' outer shape
        lazy(not_a_map)


def test_the_raw_record_of_an_event_reads_back_into_an_equal_event():
    for record in inputs.make_records(200):
        ev = lazy(record)
        again = decode_record(ev.raw_record(), table="t", stream_arn=ARN, shard_id="shardId-1",
                              version_floor=ev.version >> 32)
        assert again == ev


def test_a_snapshot_event_from_a_scan_item():
    item = {"pk": {"S": "a"}, "sk": {"N": "1"}, "v": {"SS": ["y", "x"]}}
    src = Source(table="t", stream_arn="", shard_id="snapshot", sequence_number="1", event_id="",
                 approximate_creation_time=None, stream_view_type="", size_bytes=0)
    ev = event_from_item(item, ["pk", "sk"], source=src, version=1)
    assert ev.operation is Operation.SNAPSHOT and ev.op == "r" and ev.before is None and ev.raw_old_image is None
    assert ev.raw_keys == {"pk": {"S": "a"}, "sk": {"N": "1"}} and ev.key_id == "a|1"
    assert ev.after == {"pk": "a", "sk": Decimal(1), "v": {"x", "y"}}
    assert ev.raw_new_image is item
    with pytest.raises(DecodeError):
        event_from_item({"pk": {"S": "a"}}, ["pk", "sk"], source=src, version=1)


def test_an_eager_event_has_a_wire_form_too():
    ev = ChangeEvent(Operation.INSERT, {"pk": "a"}, "a", None, {"pk": "a", "n": Decimal("1.5")},
                     make_source(), 1)
    assert ev.raw_keys == {"pk": {"S": "a"}} and ev.raw_new_image == {"pk": {"S": "a"}, "n": {"N": "1.5"}}
    assert ev.raw_old_image is None and not ev.is_lazy and ev.decode_error() is None


def make_source():
    return Source(table="t", stream_arn=ARN, shard_id="s", sequence_number="1", event_id="",
                  approximate_creation_time=None, stream_view_type="NEW_IMAGE", size_bytes=0)


# -- the fan-out: a bad image found in a sink is a decode dead letter --------------------------------

class ImageReadingSink(RecordingSink):
    def write(self, batch):
        for event in batch.events:
            event.after
        super().write(batch)


@pytest.mark.parametrize("on_failure", ["block", "dead_letter"])
def test_an_image_that_fails_in_a_sink_is_dead_lettered_with_its_raw_record(tmp_path, on_failure):
    good = [make_stream_record(event_name="INSERT", keys={"pk": f"g{i}"}, new_image={"pk": f"g{i}"},
                               sequence_number=f"30000000000000000000{i}") for i in range(3)]
    bad = make_stream_record(event_name="INSERT", keys={"pk": "bad"}, new_image={"pk": "bad"},
                             sequence_number="300000000000000000005")
    bad["dynamodb"]["NewImage"]["deep"] = nested(40)
    events = tuple(lazy(r) for r in [good[0], bad, good[1], good[2]])
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    reader, plain = ImageReadingSink("reader"), RecordingSink("plain")
    policy = FailurePolicy(on_failure=on_failure, initial_backoff_s=0.01, max_backoff_s=0.02, retry_budget_s=30)
    fanout = FanOut([SinkRunner(reader, policy), SinkRunner(plain, policy)], dlq, stop_event=threading.Event(),
                    logger=structlog.get_logger("test_lazy_events"))
    fanout.deliver(Batch(table="t", stream_arn=ARN, shard_id="shardId-1", events=events,
                         checkpoint_sequence_number="300000000000000000005"))
    assert [e.key_id for e in reader.written] == ["g0", "g1", "g2"]
    assert [e.key_id for e in plain.written] == ["g0", "bad", "g1", "g2"]  # never read the image: delivered
    entries = list(dlq.list())
    assert len(entries) == 1 and entries[0].kind == "decode" and entries[0].sequence_number == "300000000000000000005"
    assert "nest deeper" in entries[0].error
    assert decode_record(entries[0].raw_record, table="t", stream_arn=ARN, shard_id="shardId-1") == events[1]
    assert entries[0].extra.get("version_floor") == events[1].version >> 32


# -- Redis decodes only what its templates name ---------------------------------------------------

def test_redis_keys_decode_only_the_named_attributes():
    sink = RedisCacheSink("cache", RedisCacheSink.Options(url="redis://127.0.0.1:1/0",
                                                          key_templates=["order:{pk}:{sk}", "tenant:{status}"]))
    for record in inputs.make_records(300):
        a, b = lazy(record), eager(record)
        assert sink.keys_for(a) == sink.keys_for(b)
        assert a.is_lazy or (a.before is None and a.after is None)  # the images were not decoded
    rec = make_stream_record(event_name="MODIFY", keys={"pk": "k"}, new_image={"pk": "k", "status": "new"},
                             old_image={"pk": "k", "status": "old"})
    rec["dynamodb"]["NewImage"]["junk"] = {"N": "not a number"}  # not named by any template
    assert sink.keys_for(lazy(rec)) == ["tenant:old", "tenant:new"]
