"""The README's replay recipes that touch OpenSearch, end to end under deletes: `ddb-cdc replay`
(in process, the real CLI code) into the real OpenSearch sink and osmem-server.

osmem honours ``index.gc_deletes`` per index, evaluated when a versioned write arrives (probed:
a tombstone of 1 s is forgotten 1 s after the delete; raising the setting before that keeps it).
The index template of every test sets ``index.gc_deletes: 1s``, so "a tombstone expired" takes a
second instead of OpenSearch's default 60 s; tests wait for it on a probe document, not a sleep.

The stream is the API double (:mod:`connectors.dynamodb_streams.testing`): recipes with ``--until`` need
creation times to the second, which DynamoDB Local (rounding to the minute) cannot give.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from opensearchpy import OpenSearch

from connectors.dynamodb_streams.source import DynamoDBStreamSource
from connectors.opensearch.sink import OpenSearchSink
from pipeline.awsconfig import AwsConfig
from pipeline.codec import decode_record
from pipeline.events import Batch
from pipeline.sink import SinkContext
from pipeline.testing import make_stream_record
from connectors.dynamodb_streams.testing import STREAM_ARN, FakeStreams, seq

T0 = datetime(2026, 11, 20, 12, 0, 0, tzinfo=timezone.utc)
TABLE = "orders"  # from STREAM_ARN
SHARD = "shardId-1"


def rec(i: int, event: str, pk: str, n: int | None = None, at_s: int = 0) -> dict:
    image = {"pk": pk, "n": n} if event != "REMOVE" else None
    return make_stream_record(event_name=event, keys={"pk": pk}, new_image=image, old_image=None,
                              sequence_number=seq(1, i), created=T0 + timedelta(seconds=at_s))


class Recipe:
    """One test's OpenSearch index (template with gc_deletes 1 s), config file and fake stream."""

    def __init__(self, tmp_path, url: str, monkeypatch, records: list[dict]):
        self.url, self.tmp = url, tmp_path
        self.index = f"rc-{tmp_path.name[-12:].lower().replace('_', '-')}"
        self.client = OpenSearch(hosts=[url])
        self.options = {"hosts": [url], "index": self.index, "mapping": "dynamic", "refresh": True,
                        "index_settings": {"index.gc_deletes": "1s"}}
        self.config = tmp_path / "cfg.yaml"
        self.config.write_text(yaml.safe_dump({
            "source": {"stream_arn": STREAM_ARN, "idle_interval_ms": 5, "checkpoint_interval_s": 0},
            "aws": {"region": "us-east-1", "s3_endpoint_url": "http://127.0.0.1:9"},  # never reached
            "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "leases.sqlite"),
                            "failover_time_s": 1},
            "dead_letter": {"directory": str(tmp_path / "dlq")},
            "log": {"format": "json"},
            "sinks": [{"name": "search", "type": "opensearch", "options": self.options}],
        }))
        self.fake = FakeStreams(page_size=100)
        self.fake.add_shard(SHARD, records, closed=False)
        self.source = DynamoDBStreamSource(AwsConfig(), stream_arn=STREAM_ARN, streams=self.fake)
        monkeypatch.setattr("connectors.app.wiring.build_sources", lambda settings: [self.source])

    def live(self, records: list[dict]) -> None:
        """Deliver ``records`` as the live worker does: through a sink of its own."""
        sink = OpenSearchSink("search", OpenSearchSink.Options(**self.options))
        sink.open(SinkContext(sink_name="search", worker_id="live", logger=None))
        try:
            events = [decode_record(r, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD) for r in records]
            sink.write(Batch(table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD, events=tuple(events),
                             checkpoint_sequence_number=events[-1].sequence_number))
        finally:
            sink.close()

    def replay(self, *args: str) -> tuple[int, dict]:
        from connectors.app.cli import main

        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["replay", "--config", str(self.config), "--json", "--idle-reads", "2", *args])
        text = buf.getvalue()
        return code, (json.loads(text) if text.strip().startswith("{") else {})

    def doc(self, pk: str) -> dict | None:
        found = self.client.get(index=self.index, id=pk, ignore=404)
        return found if found.get("found") else None

    def gc_deletes(self) -> set[str]:
        found = self.client.indices.get_settings(index=self.index, name="index.gc_deletes")
        return {info["settings"]["index"]["gc_deletes"] for info in found.values()}

    def wait_tombstones_forgotten(self, timeout: float = 10.0) -> None:
        """Delete a probe document now and wait until its tombstone is forgotten (an older
        versioned write creates it again): every delete made before this call is forgotten too."""
        probe = f"{self.index}-probe"
        if not self.client.indices.exists(index=probe):
            self.client.indices.create(index=probe, body={"settings": {"index.gc_deletes": "1s"}})
        self.client.delete(index=probe, id="p", params={"version": 10, "version_type": "external"}, ignore=404)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.client.index(index=probe, id="p", body={}, params={"version": 1, "version_type": "external"},
                                  ignore=409)
            if r.get("result") == "created":
                self.client.delete(index=probe, id="p", params={"version": 11, "version_type": "external"})
                return
            time.sleep(0.05)
        pytest.fail("the probe's tombstone was never forgotten (gc_deletes 1s)")


@pytest.fixture
def recipe_factory(tmp_path, opensearch_url, monkeypatch):
    return lambda records: Recipe(tmp_path, opensearch_url, monkeypatch, records)


def test_rerun_time_window_leaves_items_deleted_after_the_window_deleted(recipe_factory):
    """`replay --from time T --until U --sink search`: an item created in the window and deleted
    after it — long enough ago that OpenSearch forgot the delete — stays deleted; an item
    changed after the window keeps its newer document; one changed only in the window is
    re-sent. (Old code: the deleted item came back.)"""
    window = [rec(0, "INSERT", "a", 1, 0), rec(1, "INSERT", "b", 1, 1), rec(2, "INSERT", "c", 1, 2)]
    later = [rec(3, "REMOVE", "a", at_s=20), rec(4, "MODIFY", "c", 2, 21)]
    r = recipe_factory(window + later)
    r.live(window + later)
    r.wait_tombstones_forgotten()
    code, report = r.replay("--from", "time", T0.isoformat(), "--until", (T0 + timedelta(seconds=10)).isoformat(),
                            "--sink", "search")
    assert code == 0, report
    assert report["delivered"] == 3
    assert r.doc("a") is None, "the window's INSERT re-created an item deleted after the window"
    assert r.doc("c")["_source"]["n"] == 2 and r.doc("b")["_source"]["n"] == 1
    assert r.gc_deletes() == {"1s"}, "index.gc_deletes was not put back after the replay"


def test_rebuild_keeps_a_delete_made_while_the_replay_runs(recipe_factory):
    """`replay --from trim-horizon --sink search` (rebuild an index): the live worker deletes
    an item while the replay runs, and the replay's older INSERT of it arrives after the index's
    own gc_deletes (1 s) has passed: the replay held index.gc_deletes raised, so the delete's
    tombstone refused the INSERT (409), and the setting is back to 1 s afterwards."""
    history = [rec(0, "INSERT", "a", 1, 0), rec(1, "INSERT", "b", 1, 1)]
    r = recipe_factory(history)
    r.live(history)
    seen: dict = {}
    real_get_records = r.fake.get_records

    def get_records(**kw):
        if not seen:  # the replay's first read: its sink is open, nothing is written yet
            seen["held"] = r.gc_deletes()
            r.live([rec(9, "REMOVE", "a", at_s=50)])  # the live worker's delete
            r.wait_tombstones_forgotten()  # > 1 s later, the replay sends a's INSERT
        return real_get_records(**kw)

    r.fake.get_records = get_records
    code, report = r.replay("--from", "trim-horizon", "--sink", "search")
    assert code == 0, report
    assert r.doc("a") is None, "the replay's older INSERT undid the live delete"
    assert seen["held"] == {"12h"}, seen
    assert r.doc("b")["_source"]["n"] == 1
    assert r.gc_deletes() == {"1s"}


def test_rollback_repair_rewrites_documents_a_bad_deploy_wrote_with_the_same_versions(recipe_factory, tmp_path):
    """Roll back after a bad deploy: the live worker wrote wrong documents with the right
    versions. `replay --from checkpoint-file F --sink search` changes nothing (the same version
    is a 409); with `--repair` (external_gte) the documents are rewritten; a deleted item
    stays deleted, an older change still never overwrites a newer one."""
    good = [rec(0, "INSERT", "a", 1, 0), rec(1, "INSERT", "b", 1, 1), rec(2, "INSERT", "d", 1, 2),
            rec(3, "REMOVE", "d", at_s=3)]
    r = recipe_factory(good)
    bad = [rec(0, "INSERT", "a", 666, 0), rec(1, "INSERT", "b", 666, 1), rec(2, "INSERT", "d", 666, 2),
           rec(3, "REMOVE", "d", at_s=3)]
    r.live(bad)  # the bad deploy: same changes, same versions, wrong content
    r.wait_tombstones_forgotten()
    snapshot = tmp_path / "before-deploy.json"
    snapshot.write_text(json.dumps({"format": "ddb-cdc/checkpoints/v1", "leases": [{
        "lease_key": f"{TABLE}#{STREAM_ARN}#{SHARD}", "table": TABLE, "stream_arn": STREAM_ARN, "shard_id": SHARD,
        "checkpoint": "TRIM_HORIZON", "parent_shard_ids": []}]}))

    code, report = r.replay("--from", "checkpoint-file", str(snapshot), "--sink", "search")
    assert code == 0, report
    assert r.doc("a")["_source"]["n"] == 666, "without --repair the same version must be a no-op (409)"

    code, report = r.replay("--from", "checkpoint-file", str(snapshot), "--sink", "search", "--repair")
    assert code == 0, report
    assert r.doc("a")["_source"]["n"] == 1 and r.doc("b")["_source"]["n"] == 1
    assert r.doc("a")["_version"] == decode_record(good[0], table=TABLE, stream_arn=STREAM_ARN,
                                                   shard_id=SHARD).version
    assert r.doc("d") is None  # re-created by its INSERT, deleted again by its REMOVE, in order
    r.live([rec(7, "MODIFY", "b", 7, 30)])  # newer live change: --repair never goes back past it
    code, report = r.replay("--from", "checkpoint-file", str(snapshot), "--sink", "search", "--repair")
    assert code == 0 and r.doc("b")["_source"]["n"] == 7


def test_repair_window_rewrites_only_items_whose_last_change_is_in_the_window(recipe_factory):
    """Re-run a time window with --repair: the window's items are rewritten, items changed after
    the window (deleted or modified) are left alone."""
    good = [rec(0, "INSERT", "a", 1, 0), rec(1, "INSERT", "b", 1, 1), rec(2, "REMOVE", "b", at_s=30)]
    r = recipe_factory(good)
    r.live([rec(0, "INSERT", "a", 666, 0), rec(1, "INSERT", "b", 666, 1), rec(2, "REMOVE", "b", at_s=30)])
    r.wait_tombstones_forgotten()
    code, report = r.replay("--from", "time", T0.isoformat(), "--until", (T0 + timedelta(seconds=10)).isoformat(),
                            "--sink", "search", "--repair")
    assert code == 0, report
    assert r.doc("a")["_source"]["n"] == 1
    assert r.doc("b") is None


def test_archive_replay_with_until_into_opensearch_is_refused(recipe_factory, capsys):
    """`--from-archive … --until U --sink search` cannot know which items changed after U:
    refused with one line, exit 2, before anything is read."""
    r = recipe_factory([])
    from connectors.app.cli import main

    code = main(["replay", "--config", str(r.config), "--from-archive", "s3://b/p", "--until",
                 T0.isoformat(), "--sink", "search"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "re-create items deleted after the window" in err[0], err
