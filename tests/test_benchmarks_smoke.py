"""The benchmark suite runs (``python -m benchmarks --quick``) and its inputs are deterministic and
realistic (10–40 attributes, nested maps and lists, sets, binary, 38-digit numbers, 1–4 KB images)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import inputs  # noqa: E402


def _digest(records) -> str:
    return hashlib.sha256(orjson.dumps(records)).hexdigest()


def _walk(value, depth=0):
    """Yield (type tag, value, depth) for every AttributeValue inside ``value``."""
    ((tag, inner),) = value.items()
    yield tag, inner, depth
    if tag == "M":
        for v in inner.values():
            yield from _walk(v, depth + 1)
    elif tag == "L":
        for v in inner:
            yield from _walk(v, depth + 1)


def test_inputs_are_deterministic():
    assert _digest(inputs.make_records(300)) == _digest(inputs.make_records(300))
    assert _digest(inputs.make_records(300)) != _digest(inputs.make_records(300, seed=inputs.SEED + 1))
    a = inputs.recorded_stream("t", shards=2, records_per_shard=300, pool_size=200)
    b = inputs.recorded_stream("t", shards=2, records_per_shard=300, pool_size=200)
    assert [s.bodies for s in a.shards] == [s.bodies for s in b.shards]
    assert inputs.decode_bodies(1) == inputs.decode_bodies(1)


def test_inputs_are_realistic():
    records = inputs.make_records(1000)
    tags: set[str] = set()
    max_depth = 0
    long_numbers = 0
    events = set()
    for record in records:
        events.add(record["eventName"])
        body = record["dynamodb"]
        assert isinstance(body["ApproximateCreationDateTime"], float)
        assert body["StreamViewType"] == "NEW_AND_OLD_IMAGES" and body["SequenceNumber"].isdigit()
        images = [body[k] for k in ("NewImage", "OldImage") if k in body]
        assert images
        for image in images:
            assert 10 <= len(image) <= 40, len(image)
            assert 1024 <= len(orjson.dumps(image)) <= 4096
            assert image["pk"] == body["Keys"]["pk"]
            found = set()
            for value in image.values():
                for tag, inner, depth in _walk(value):
                    found.add(tag)
                    max_depth = max(max_depth, depth)
                    if tag == "N" and len(inner.replace("-", "").replace(".", "").lstrip("0")) == 38:
                        long_numbers += 1
            assert {"M", "L", "B"} <= found and found & {"SS", "NS", "BS"}, found
            tags |= found
    assert {"S", "N", "B", "BOOL", "NULL", "M", "L", "SS", "NS", "BS"} <= tags
    assert max_depth >= 3  # maps in lists in maps
    assert long_numbers > 0
    assert events == {"INSERT", "MODIFY", "REMOVE"}


def test_recorded_bodies_decode_on_both_paths():
    """Every generated record is valid: botocore's parser + TypeDeserializer and decode_record accept it."""
    import botocore.parsers
    import botocore.session
    from boto3.dynamodb.types import TypeDeserializer

    from pipeline.codec import decode_record

    stream = inputs.recorded_stream("t", shards=1, records_per_shard=2500, pool_size=1000)
    bodies = stream.shards[0].bodies
    assert [b"NextShardIterator" in body for body in bodies] == [True, True, False]
    shape = botocore.session.get_session().get_service_model("dynamodbstreams").operation_model("GetRecords").output_shape
    parsed = botocore.parsers.create_parser("json").parse({"body": bodies[0], "headers": {}, "status_code": 200}, shape)
    deserializer = TypeDeserializer()
    for record in parsed["Records"]:
        for part in ("Keys", "NewImage", "OldImage"):
            for value in (record["dynamodb"].get(part) or {}).values():
                deserializer.deserialize(value)
    seqs = []
    for body in bodies:
        for record in orjson.loads(body)["Records"]:
            event = decode_record(record, table="t", stream_arn=stream.stream_arn, shard_id=stream.shards[0].shard_id)
            seqs.append(event.sequence_number)
    assert len(seqs) == 2500 and seqs == sorted(seqs) and len(set(seqs)) == 2500


@pytest.mark.timeout(600)
def test_quick_benchmark_runs_and_prints_ratios(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--repetitions", "1", "--sections", "decode,pipeline",
                           "--json", str(out_json)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "Machine: CPU " in text
    for label in ("boto3 path", "event construction", "full decode", "ours: render", "bare orjson.loads",
                  "pipeline / fast decode", "pipeline with render sinks / render"):
        assert label in text
    assert re.search(r"\| full decode / boto3 +\| \d+\.\d\dx", text)
    assert re.search(r"\| orjson / event construction .*\| \d+\.\d\dx", text)
    assert re.search(r"\| orjson / render .*\| \d+\.\d\dx", text)
    assert re.search(r"\| pipeline / fast decode +\| \d+\.\d\d", text)
    assert re.search(r"\| pipeline with render sinks / render +\| \d+\.\d\d", text)
    data = orjson.loads(out_json.read_bytes())
    assert data["sections"]["decode"]["fast_vs_boto3"] > 0
    assert data["sections"]["pipeline"]["pipeline_vs_decode"] > 0
    assert "filter of 3 conditions" in text and "redact (HMAC-SHA-256" in text  # issue 19 item 5
    shaping = data["sections"]["pipeline"]["shaping"]
    # Figures only, no timing verdict here: the machine is shared and noisy (a loaded run measured the
    # filter at 1.5x decode); the comparison belongs to `python -m benchmarks`, not to a unit test.
    assert shaping["filter_3_us"] > 0 and shaping["decode_us"] > 0
    assert 0 < shaping["filter_pass_share"] < 1  # the pattern both passes and drops changes of the suite
