"""``ddb-cdc demo`` end to end, and proof that its closing checks can fail.

The first test runs the real command in a subprocess (embedded moto, osmem-server, Redis, the
worker in a thread) and reads what it prints. The others feed :mod:`connectors.embedded.verify`'s checks
deliberately wrong expectations against real servers, so a passing demo means something.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from connectors.embedded.demo import CHECK_NAMES
from connectors.opensearch.sink import OpenSearchSink
from connectors.embedded.verify import check_opensearch, check_redis, check_s3_audit
from pipeline.codec import decode_record, key_id
from pipeline.events import Batch
from pipeline.render import event_to_record_dict
from pipeline.sink import SinkContext
from pipeline.testing import make_stream_record

REPO_ROOT = Path(__file__).resolve().parents[1]
STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/demo-orders/stream/2026-01-01T00:00:00.000"
SHARD_ID = "shardId-00000001700000000000-00000001"
BIG = Decimal("12345678901234567890123456789012345678")  # 38 digits: a float cannot hold it
BIG_PLUS_1 = Decimal("12345678901234567890123456789012345679")  # spelled out: BIG + 1 would round (28-digit Decimal context)
BIG_PLUS_2 = Decimal("12345678901234567890123456789012345680")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_demo_command_runs_the_pipeline_and_every_check_passes() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONIOENCODING": "utf-8", "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-m", "connectors.app.cli", "demo", "--changes", "150"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=280)
    out = proc.stdout
    if proc.returncode != 0 and "ServiceNotInstalledError" in out:
        reason = f"demo stand-ins unavailable: {out.strip().splitlines()[-2:]}"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{reason} (CI=true: a missing service is a failure)", pytrace=False)
        pytest.skip(reason)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr}"
    rows = {line.split("│")[1].strip(): line for line in out.splitlines()
            if line.startswith("│") and line.split("│")[1].strip() in CHECK_NAMES}
    assert set(rows) == set(CHECK_NAMES), out
    for name, row in rows.items():
        assert "✓" in row and "✗" not in row, row
    assert "150 stream records, 0 dead-letter entries" in rows["worker"]
    assert "150 distinct sequence numbers in 150 lines for 150 changes" in rows["s3_audit"]
    assert f"all {len(CHECK_NAMES)} checks passed" in out
    assert "Next:" in out and "ddb-cdc run --config" in out
    assert "demo failed" not in out


def _events(*specs: tuple[str, dict, dict | None, dict | None]) -> list:
    """Decoded change events from (event name, keys, new image, old image), sequence numbers 1, 2, …"""
    return [decode_record(make_stream_record(event_name=name, keys=keys, new_image=new, old_image=old,
                                             sequence_number=f"{n:021d}", created=1_767_225_600 + n),
                          table="demo-orders", stream_arn=STREAM_ARN, shard_id=SHARD_ID)
            for n, (name, keys, new, old) in enumerate(specs, start=1)]


def _item_id(item: dict) -> str:
    return key_id({"pk": item["pk"], "sk": item["sk"]})


def test_check_opensearch_fails_on_wrong_missing_and_extra_documents(opensearch_url: str) -> None:
    a = {"pk": "user#1", "sk": Decimal(1), "big": BIG, "blob": b"\x00\xff", "tags": {"red", "🍕"},
         "profile": {"city": "Zürich", "visits": Decimal(3)}}
    b = {"pk": "user#2", "sk": Decimal(2), "big": Decimal(7), "blob": b"", "tags": {"blue"},
         "profile": {"city": "京都", "visits": Decimal(0)}}
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=[opensearch_url], index="demo-check"))
    sink.open(SinkContext(sink_name="search", worker_id="test", logger=logging.getLogger("test")))
    try:
        events = _events(("INSERT", {"pk": a["pk"], "sk": a["sk"]}, a, None),
                         ("INSERT", {"pk": b["pk"], "sk": b["sk"]}, b, None))
        sink.write(Batch(table="demo-orders", stream_arn=STREAM_ARN, shard_id=SHARD_ID, events=tuple(events),
                         checkpoint_sequence_number=events[-1].sequence_number))
        sink.flush()
    finally:
        sink.close()

    good = check_opensearch(opensearch_url, "demo-check", [a, b], _item_id)
    assert good.ok, good.problems

    off_by_one = {**a, "big": BIG_PLUS_1}  # differs in the 38th digit only
    wrong = check_opensearch(opensearch_url, "demo-check", [off_by_one, b], _item_id)
    assert not wrong.ok
    assert wrong.problems == ["document 'user#1|1' differs in ['big']"]

    c = {"pk": "user#3", "sk": Decimal(3)}
    missing_and_extra = check_opensearch(opensearch_url, "demo-check", [a, c], _item_id)
    assert not missing_and_extra.ok
    assert sorted(missing_and_extra.problems) == ["document 'user#2|2' is not in the table",
                                                  "missing document 'user#3|3'"]


def test_check_redis_fails_when_a_key_survives_or_the_sentinel_is_gone(redis_server) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    client.set("demo:sentinel", "x")
    client.set("item:user#1:1", "stale")
    result = check_redis(client, ["item:user#1:1", "user:user#2"], "demo:sentinel")
    assert not result.ok
    assert result.problems == ["cache key 'item:user#1:1' was not invalidated"]
    assert result.summary == "1 of 2 cache keys invalidated"

    client.delete("item:user#1:1", "demo:sentinel")
    result = check_redis(client, ["item:user#1:1", "user:user#2"], "demo:sentinel")
    assert not result.ok
    assert result.problems == ["unrelated key 'demo:sentinel' was deleted"]


def test_check_s3_audit_fails_on_missing_unknown_and_altered_lines() -> None:
    keys = {"pk": "user#1", "sk": Decimal(1)}
    events = _events(("INSERT", keys, {**keys, "big": BIG}, None),
                     ("MODIFY", keys, {**keys, "big": BIG_PLUS_1}, {**keys, "big": BIG}),
                     ("REMOVE", keys, None, {**keys, "big": BIG_PLUS_1}))
    lines = [event_to_record_dict(e) for e in events]
    assert check_s3_audit(lines + lines[:1], events).ok  # an identical repeat is allowed (at-least-once)

    missing = check_s3_audit(lines[:2], events)
    assert not missing.ok and missing.problems == [
        f"sequence number {events[2].sequence_number} missing from the audit log"]

    unknown = check_s3_audit(lines, events[:2])
    assert not unknown.ok and unknown.problems == [
        f"sequence number {events[2].sequence_number} in the audit log but not in the stream"]

    altered = [dict(line) for line in lines]
    altered[1] = {**altered[1], "after": {**altered[1]["after"], "big": {"N": str(BIG_PLUS_2)}}}
    result = check_s3_audit(altered, events)
    assert not result.ok
    assert result.problems == [f"audit line of {events[1].sequence_number} does not equal the stream record"]
