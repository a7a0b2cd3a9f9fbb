"""Hostile stream records never crash a shard: each is dead-lettered with its raw form and
position, every other record is delivered and checkpointed, and ``dlq redrive`` keeps them.

The records arrive as the fast read path gives them (raw JSON: ApproximateCreationDateTime as a
number), through the DynamoDB Streams API double, since DynamoDB cannot store them.
"""

from __future__ import annotations

import sys

import pytest
import structlog

from connectors.sqlite_store import SQLiteLeaseStore
from pipeline.codec import decode_record
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.errors import DecodeError
from pipeline.events import SHARD_END
from pipeline.ops.redrive import redrive
from pipeline.testing import RecordingSink, make_stream_record
from tests.stacks import Running, make_worker
from tests.helpers import wait_until
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq


#: plain key=value lines: the dev console renderer would pretty-print the deep locals of a traceback
LOG = structlog.wrap_logger(structlog.PrintLogger(), processors=[structlog.processors.format_exc_info,
                                                                 structlog.processors.KeyValueRenderer()])


def nested(levels: int, kind: str = "M") -> dict:
    value: dict = {"S": "bottom"}
    for _ in range(levels):
        value = {"M": {"a": value}} if kind == "M" else {"L": [value]}
    return value


def hostile_records(deep: int = 2000) -> list[tuple[str, dict]]:
    """(what, raw record) pairs; each has a valid sequence number unless that is what is hostile.
    ``deep``: levels of the deeply nested ones (the worker test uses 300: more than orjson writes
    (254) but fewer than the double's ``copy.deepcopy`` of a GetRecords page can copy)."""
    out = []
    for i, created in enumerate([1e20, float("inf"), float("nan"), -1e12, "1e400", True]):
        rec = make_stream_record(event_name="INSERT", keys={"pk": f"t{i}"}, new_image={"pk": f"t{i}"})
        rec["dynamodb"]["ApproximateCreationDateTime"] = created
        out.append((f"ApproximateCreationDateTime {created!r}", rec))
    for bad in ["²", "1" * 5000, "١٢٣", "", "12a"]:
        rec = make_stream_record(event_name="INSERT", keys={"pk": f"s{len(out)}"}, new_image={"pk": "x"})
        rec["dynamodb"]["SequenceNumber"] = bad
        out.append((f"SequenceNumber {bad[:10]!r}", rec))
    for kind, levels in [("M", deep), ("L", deep), ("M", 34)]:
        rec = make_stream_record(event_name="INSERT", keys={"pk": f"d{kind}{levels}"},
                                 new_image={"pk": f"d{kind}{levels}"})
        rec["dynamodb"]["NewImage"]["deep"] = nested(levels, kind)
        out.append((f"{kind} nested {levels} levels", rec))
    return out


@pytest.mark.parametrize("what,record", hostile_records(), ids=[w for w, _ in hostile_records()])
def test_the_decoder_rejects_each_hostile_record_with_a_decode_error(what, record):
    with pytest.raises(DecodeError):
        decode_record(record, table="orders", stream_arn=STREAM_ARN, shard_id="shardId-1", eager=True)
    if "nested" in what:  # an image problem: found on first access of the image (issue 16)
        event = decode_record(record, table="orders", stream_arn=STREAM_ARN, shard_id="shardId-1")
        for _ in range(2):  # every access raises, not only the first
            with pytest.raises(DecodeError):
                event.after
        assert isinstance(event.decode_error(), DecodeError)
    else:  # the parts every event needs: found when the record is read
        with pytest.raises(DecodeError):
            decode_record(record, table="orders", stream_arn=STREAM_ARN, shard_id="shardId-1")


def test_32_levels_of_nesting_still_decode():
    rec = make_stream_record(event_name="INSERT", keys={"pk": "ok"}, new_image={"pk": "ok"})
    rec["dynamodb"]["NewImage"]["deep"] = nested(33)  # the attribute's own map and 32 below it
    assert decode_record(rec, table="orders", stream_arn=STREAM_ARN, shard_id="s").after["deep"]["a"]


class ImageReadingSink(RecordingSink):
    """A RecordingSink that reads ``after`` of every event before keeping the batch (as the
    built-in sinks do), so an image that cannot be decoded raises inside ``write``."""

    def write(self, batch):
        for event in batch.events:
            event.after
        super().write(batch)


def test_hostile_records_are_dead_lettered_and_the_shard_goes_on(tmp_path):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(4000)  # the double deep-copies each page: 4 frames per level of nesting
    try:
        _run_hostile(tmp_path)
    finally:
        sys.setrecursionlimit(limit)


def _run_hostile(tmp_path):
    hostile = hostile_records(deep=300)
    records = []
    good = []
    for i, (_, rec) in enumerate(hostile):
        if rec["dynamodb"]["SequenceNumber"] == "000000000000000000001":
            rec["dynamodb"]["SequenceNumber"] = seq(1, 2 * i)
        records.append(rec)
        ok = make_stream_record(event_name="INSERT", keys={"pk": f"good{i}"}, new_image={"pk": f"good{i}"},
                                sequence_number=seq(1, 2 * i + 1))
        records.append(ok)
        good.append(f"good{i}")
    fake = FakeStreams()
    shard = fake.add_shard("shardId-hostile", [], closed=True)
    shard.records.extend(records)  # raw JSON shape, as the fast read path gives it
    path = tmp_path / "leases.sqlite"
    sink = ImageReadingSink()  # reads every image: a lazily found bad image is dead-lettered too
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    running = Running(make_worker(fake, tmp_path, sink, store_path=path, dead_letter=dlq, logger=LOG, max_records=3))
    store = SQLiteLeaseStore(path)
    try:
        wait_until(lambda: any(lease.checkpoint == SHARD_END for lease in store.list_leases()), "shard end")
    finally:
        code = running.stop(15)
    assert code == 0
    assert [e.key_id for e in sink.written] == good
    entries = list(dlq.list())
    assert len(entries) == len(hostile)
    assert all(e.kind == "decode" and e.raw_record for e in entries)
    # their positions: the sequence number where it is a valid one, else None (never a checkpoint)
    valid = {r["dynamodb"]["SequenceNumber"] for r in records[::2] if r["dynamodb"]["SequenceNumber"].isdecimal()
             and r["dynamodb"]["SequenceNumber"].isascii() and len(r["dynamodb"]["SequenceNumber"]) <= 40}
    assert {e.sequence_number for e in entries} - {None} == valid
    # the 300-level records are stored whole: their bottom value is in the entry
    deep = [e for e in entries if "bottom" in str(e.raw_record)]
    assert len(deep) == 3

    report = redrive(dlq, {"recording": RecordingSink()}, logger=LOG)
    assert {r.status for r in report.results} == {"kept"}
    assert len(list(dlq.list())) == len(hostile)
