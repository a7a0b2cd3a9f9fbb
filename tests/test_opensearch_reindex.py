"""`ddb-cdc opensearch reindex` against DynamoDB Local, osmem-server, moto and redis-server: a zero-downtime
mapping change while the live worker keeps writing, the dry run, the "stream does not hold everything" stop
with --abort, and moving a legacy bare index behind the alias."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from connectors.opensearch.sink import document_id
from connectors.embedded.verify import check_opensearch, read_stream_events
from connectors.embedded.workload import Workload, apply_change, scan_items, write_changes
from pipeline.codec import encode_item, key_id
from tests.helpers import json_log_events, wait_until
from tests.process_stack import write_config
from tests.test_replay import ROOT, ReplayStack

pytestmark = pytest.mark.e2e

INDEX = "orders-rx"
#: The mapping the user switches to: explicit fields of the workload's items. ``big`` (36-38 digits) never
#: fits a long, so explicit mode moves it aside (``_ddmbig``, ``_cdc.malformed``) in every document.
EXPLICIT_FIELDS = {"email": "keyword", "name": "keyword", "count": "long", "price": "double",
                   "active": "boolean", "profile.city": "keyword", "big": "long"}


class ReindexStack(ReplayStack):
    """ReplayStack with the opensearch sink ``search`` alone (default typed mode, index ``orders-rx``) and
    a second config file that differs only in the sink's mapping (explicit fields)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        search = {"name": "search", "type": "opensearch", "options": {"hosts": [self.os_url], "index": INDEX}}
        self.config["sinks"] = [search]
        self.save_config()
        explicit = json.loads(json.dumps(self.config))
        explicit["sinks"][0]["options"].update({"mapping": "explicit", "fields": EXPLICIT_FIELDS})
        self.explicit_config_path = write_config(self.tmp / "config-explicit.yaml", explicit)

    def reindex_cmd(self, *args: str, config: Path | None = None) -> list[str]:
        return [sys.executable, "-m", "connectors.app.cli", "opensearch", "reindex", "--sink", "search", *args,
                "--config", str(config or self.config_path)]

    def reindex(self, *args: str, config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.reindex_cmd(*args, config=config), capture_output=True, text=True, env=self.env,
                              cwd=str(ROOT), timeout=timeout)

    def get(self, path: str) -> dict | None:
        """GET ``path``; None for a 404."""
        try:
            return self.os_request("GET", path)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def alias_targets(self) -> dict[str, Any]:
        return self.get(f"/_alias/{INDEX}") or {}

    def marker(self) -> dict | None:
        found = self.get(f"/_index_template/ddb-cdc-{INDEX}")
        assert found, "the sink's index template is missing"
        return found["index_templates"][0]["index_template"].get("_meta", {}).get("reindex")

    def index_check(self, index: str = INDEX):
        items = scan_items(self.ddb, self.table)
        return check_opensearch(self.os_url, index, items, lambda it: key_id({"pk": it["pk"], "sk": it["sk"]}))

    def write_with_sink(self, *, options: dict | None = None, pin: dict[str, str] | None = None) -> int:
        """Deliver the whole stream through an in-process ``search`` sink (``options`` merged into the
        configured ones; ``pin`` as for a reindex fill). Returns the number of events."""
        from pipeline.config import load_settings
        from pipeline.events import Batch
        from pipeline.logs import get_logger
        from pipeline.registry import build_sinks
        from pipeline.sink import SinkContext

        settings = load_settings(str(self.config_path))
        cfg = settings.sinks[0]
        if options:
            cfg = cfg.model_copy(update={"options": {**cfg.options, **options}})
        sink = build_sinks([cfg], "test")[0]
        if pin:
            sink.pin(pin)
        sink.open(SinkContext(sink_name="search", worker_id="test", logger=get_logger(test="reindex"),
                              aws=settings.aws))
        try:
            events = read_stream_events(self.streams, self.stream_arn, self.table)
            sink.write(Batch(self.table, self.stream_arn, events[0].source.shard_id, tuple(events),
                             events[-1].sequence_number))
        finally:
            sink.close()
        return len(events)

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.fixture
def stack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server):
    return ReindexStack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server, "reindex")


def _json_report(proc: subprocess.CompletedProcess) -> dict:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-3000:]}")


def test_reindex_to_explicit_mapping_while_the_worker_writes(stack: ReindexStack):
    """The user switches the sink to explicit fields and reindexes while the old (typed) worker keeps
    running under load: afterwards the alias points at v2 only, v2 is explicit and equal to the table, and
    every document carries the version of its item's last change (nothing written during the reindex was
    lost or overwritten by an older one)."""
    write_changes(stack.ddb, stack.table, Workload(seed=31, items=60), 300)
    live = stack.start_worker()
    try:
        stack.wait_caught_up(live)
        assert stack.index_check().ok
        assert set(stack.alias_targets()) == {f"{INDEX}-v1"}

        reindex = subprocess.Popen(stack.reindex_cmd("--json", "--wait", "6", config=stack.explicit_config_path),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.env,
                                   cwd=str(ROOT))
        out: dict[str, Any] = {"stdout": "", "stderr": [], "until": None}
        fill_started = threading.Event()

        def read_stderr() -> None:
            for line in reindex.stderr:
                out["stderr"].append(line)
                if '"replay_started"' in line and out["until"] is None:
                    out["until"] = datetime.fromisoformat(json.loads(line)["until"])
                    fill_started.set()

        def read_stdout() -> None:
            out["stdout"] = reindex.stdout.read()

        readers = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=read_stdout, daemon=True)]
        for reader in readers:
            reader.start()
        written = {"mixed": 0}
        after_boundary: list[datetime] = []  # when each update made after the fill's end was acknowledged

        def writer() -> None:
            """Puts, updates and deletes of the same 60 items through the marker wait and the fill, then
            updates only, without a pause (or the fill would end early, caught up), until the reindex
            exits or 3 s into the next minute. DynamoDB Local rounds a record's time down to the minute,
            so the fill (which stops at the first record after its --until, "now" when it starts) reads
            everything up to the next minute; the updates made from then until the swap reach v2 only
            through the live worker's writes to both indices. Updates keep the item count what it was
            when the fill ended, so the report's counts can be compared with the table. Bounded by 90 s
            and 4,000 changes."""
            deadline = time.monotonic() + 90
            workload = Workload(seed=32, items=60)
            boundary = None
            for change in workload.changes(4000):
                if time.monotonic() > deadline or reindex.poll() is not None:
                    return
                if out["until"] is not None:
                    boundary = out["until"].replace(second=0, microsecond=0) + timedelta(minutes=1)
                    if datetime.now(timezone.utc) > boundary - timedelta(seconds=0.2):
                        break
                apply_change(stack.ddb, stack.table, change)
                written["mixed"] += 1
                time.sleep(0.01)
            if boundary is None:
                return
            live_items = sorted(workload.live)
            n = 0
            while live_items and reindex.poll() is None and datetime.now(timezone.utc) < boundary + timedelta(seconds=3):
                index = live_items[n % len(live_items)]
                stack.ddb.update_item(TableName=stack.table, Key=encode_item(workload.key(index)),
                                      UpdateExpression="SET #c = :c",
                                      ExpressionAttributeNames={"#c": "count"},
                                      ExpressionAttributeValues={":c": {"N": str(n)}})
                n += 1
                done = datetime.now(timezone.utc)
                if done > boundary:
                    after_boundary.append(done)
                time.sleep(0.01)

        # The report counts each index right after the swap, while the live worker still writes: a
        # change made before the fill's end may still be on its way to the index then. What the report
        # promises is the index's real count at that moment — so the test samples both counts from the
        # fill's end until the reindex exits and checks the report's counts lie in the sampled range.
        samples: list[tuple[datetime, int, int]] = []

        def sampler() -> None:
            fill_started.wait(120)
            while reindex.poll() is None:
                try:
                    stack.os_request("POST", f"/{INDEX}-v1,{INDEX}-v2/_refresh")
                    counts = [stack.os_request("GET", f"/{name}/_count")["count"] for name in (f"{INDEX}-v1", f"{INDEX}-v2")]
                except Exception:  # noqa: BLE001 - v2 may not exist yet
                    counts = None
                if counts is not None:
                    samples.append((datetime.now(timezone.utc), counts[0], counts[1]))
                time.sleep(0.1)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        try:
            reindex.wait(timeout=180)
        finally:
            thread.join(100)
            sampling.join(30)
            for reader in readers:
                reader.join(5)
        stdout, stderr = out["stdout"], "".join(out["stderr"])
        assert reindex.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert fill_started.is_set(), stderr[-3000:]
        report = json.loads(stdout)
        # the fill stopped at the first record of the minute after its --until (not earlier, caught up),
        # and updates were made between that and the swap: those reached v2 only through the live worker
        assert {s["ended"] for s in report["fill"]["shards"]} == {"until"}, report["fill"]["shards"]
        [swapped] = [json.loads(line) for line in out["stderr"] if '"reindex_swapped"' in line]
        swapped_at = datetime.fromisoformat(swapped["timestamp"].replace("Z", "+00:00"))
        before_swap = [t for t in after_boundary if t < swapped_at - timedelta(seconds=0.05)]
        assert written["mixed"] > 100 and len(before_swap) >= 2, (written, len(after_boundary), len(before_swap))
        stack.wait_caught_up(live)
        assert live.poll() is None, "the live worker stopped during the reindex"
        # After the swap: the worker goes on writing; until it re-reads the marker (reindex_check_s = 5 s)
        # it still writes v2 directly (first) and through the alias (a 409), then through the moved alias
        # only, rendering for v2's explicit spec in both cases.
        write_changes(stack.ddb, stack.table, Workload(seed=33, items=60), 120, rate_per_s=15)
        stack.wait_caught_up(live)

        # the alias points at v2 only; the marker is gone; v2 records the explicit spec
        aliases = stack.alias_targets()
        assert set(aliases) == {f"{INDEX}-v2"}, aliases
        assert aliases[f"{INDEX}-v2"]["aliases"][INDEX].get("is_write_index") is True, aliases
        assert stack.marker() is None
        mapping = stack.os_request("GET", f"/{INDEX}-v2/_mapping")[f"{INDEX}-v2"]["mappings"]
        assert mapping["_meta"]["ddb_cdc"]["mode"] == "explicit", mapping["_meta"]
        assert mapping["properties"]["count"]["type"] == "long"
        assert stack.os_request("GET", f"/{INDEX}-v1/_mapping")[f"{INDEX}-v1"]["mappings"]["_meta"]["ddb_cdc"][
            "mode"] == "typed"

        # the live (typed) worker noticed the reindex and wrote the new index too
        targets = json_log_events(stack.worker_log, "opensearch_reindex_target")
        assert any(e.get("also_writing_to") == f"{INDEX}-v2" for e in targets), targets
        moved = json_log_events(stack.worker_log, "opensearch_alias_moved")
        assert any(e.get("write_index") == f"{INDEX}-v2" for e in moved), moved

        # v2 = the table, content-equal
        result = stack.index_check()
        assert result.ok, result.problems
        items = scan_items(stack.ddb, stack.table)
        assert len(items) > 0

        # every document of v2 is rendered for explicit mode (plain values, not AttributeValue JSON)
        stack.os_request("POST", f"/{INDEX}-v2/_refresh")
        hits = stack.os_request("POST", f"/{INDEX}/_search",
                                {"size": 10000, "version": True, "query": {"match_all": {}}})["hits"]["hits"]
        assert {h["_index"] for h in hits} == {f"{INDEX}-v2"}
        for hit in hits:
            source = hit["_source"]
            assert source["_cdc"].get("mapping") != "typed", hit
            assert isinstance(source["pk"], str), hit
            assert isinstance(source["email"], str), hit  # every workload item has an email
            if "big" in source or "_ddmbig" in source:
                assert "_ddmbig" in source and "big" not in source, hit  # 36-38 digits never fit a long
                assert source["_cdc"].get("malformed") == ["big"], hit

        # every document has the version of its item's last change in the stream
        last: dict[str, Any] = {}
        for event in read_stream_events(stack.streams, stack.stream_arn, stack.table):
            last[document_id(event.key_id)] = event
        versions = {h["_id"]: h["_version"] for h in hits}
        stale = {doc_id: (versions.get(doc_id), event.version) for doc_id, event in last.items()
                 if event.operation.value != "REMOVE" and versions.get(doc_id) != event.version}
        assert not stale, f"{len(stale)} document(s) not at their last change's version: {list(stale.items())[:5]}"
        assert set(versions) == {d for d, e in last.items() if e.operation.value != "REMOVE"}

        # the report's counts agree with the table
        assert report["ok"] is True and not report["problems"] and not report["dry_run"], report
        [plan] = report["plans"]
        assert (plan["current"], plan["new_index"], plan["kind"], plan["resume"]) == (
            f"{INDEX}-v1", f"{INDEX}-v2", "alias", False), plan
        assert plan["new_mapping"].startswith("explicit (7 fields"), plan
        [res] = report["results"]
        assert (res["old_index"], res["new_index"], res["swapped"], res["missing_ids"], res["deleted_old"]) == (
            f"{INDEX}-v1", f"{INDEX}-v2", True, 0, False), res
        around = [(v1, v2) for at, v1, v2 in samples if at >= swapped_at - timedelta(seconds=2)]
        assert around, (len(samples), swapped_at)
        assert min(v2 for _, v2 in around) <= res["new_docs"] <= max(v2 for _, v2 in around), (res, around)
        assert min(v1 for v1, _ in around) <= res["old_docs"] <= max(v1 for v1, _ in around), (res, around)
        # v1 got none of the puts and deletes after the swap (the alias moved): its count then stays
        assert stack.os_request("GET", f"/{INDEX}-v1/_count")["count"] == res["old_docs"]
        assert report["fill"]["delivered"] >= 300, report["fill"]
    finally:
        stack.stop(live)
    assert live.returncode == 0, stack.worker_log.read_text()[-3000:]


def test_dry_run_changes_nothing_and_reports_the_plan(stack: ReindexStack):
    write_changes(stack.ddb, stack.table, Workload(seed=41, items=20), 40)
    stack.write_with_sink()
    before = stack.os_request("GET", f"/_index_template/ddb-cdc-{INDEX}")
    docs = stack.os_request("GET", f"/{INDEX}/_count")["count"]
    assert docs > 0

    run = stack.reindex("--dry-run", "--json", config=stack.explicit_config_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = _json_report(run)
    assert report["dry_run"] is True and report["ok"] is True and report["results"] == [] and report["fill"] is None
    [plan] = report["plans"]
    assert plan["alias"] == INDEX and plan["kind"] == "alias"
    assert plan["current"] == f"{INDEX}-v1" and plan["new_index"] == f"{INDEX}-v2" and plan["resume"] is False
    assert plan["current_docs"] == docs
    assert plan["current_mapping"].startswith("typed") and plan["new_mapping"].startswith("explicit"), plan

    assert stack.get(f"/{INDEX}-v2") is None, "the dry run created the new index"
    assert stack.marker() is None
    assert stack.os_request("GET", f"/_index_template/ddb-cdc-{INDEX}") == before, "the dry run changed the template"
    assert set(stack.alias_targets()) == {f"{INDEX}-v1"}

    # the human-readable plan names both indices and says nothing was changed
    text = stack.reindex("--dry-run", config=stack.explicit_config_path)
    assert text.returncode == 0, text.stderr[-2000:]
    assert f"{INDEX}-v2" in text.stdout and "--dry-run" in text.stdout, text.stdout


def test_ids_missing_from_the_stream_stop_before_the_swap_then_abort(stack: ReindexStack):
    """A document of v1 whose item is not in the stream (older than 24 h, or written by hand) makes the
    reindex stop before the swap, pointing at --from-archive; --abort removes the marker and v2."""
    write_changes(stack.ddb, stack.table, Workload(seed=51, items=20), 40)
    stack.write_with_sink()
    stack.os_request("PUT", f"/{INDEX}-v1/_doc/stranger?version=1&version_type=external",
                     {"pk": {"S": "stranger"}, "_cdc": {"mapping": "typed", "version": 1}})
    v1_docs = stack.os_request("GET", f"/{INDEX}/_count")["count"]

    run = stack.reindex("--json", "--wait", "0.2")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    report = _json_report(run)
    assert report["ok"] is False
    [res] = report["results"]
    assert res["missing_ids"] == 1 and res["swapped"] is False, res
    assert any("--from-archive" in p and "--force" in p for p in report["problems"]), report["problems"]
    assert set(stack.alias_targets()) == {f"{INDEX}-v1"}, "the alias moved although ids are missing"
    assert stack.marker() == {"into": f"{INDEX}-v2", "from": f"{INDEX}-v1",
                              "started_at": stack.marker()["started_at"]}
    assert stack.get(f"/{INDEX}-v2") is not None

    # the human-readable form says it too (and the run resumes into the same v2)
    text = stack.reindex("--wait", "0.2")
    assert text.returncode == 1, text.stdout[-2000:] + text.stderr[-2000:]
    assert "--from-archive" in text.stdout and "resume" in text.stdout, text.stdout

    abort = stack.reindex("--abort")
    assert abort.returncode == 0, abort.stderr[-2000:]
    assert f"{INDEX}-v2 deleted" in abort.stdout, abort.stdout
    assert stack.marker() is None
    assert stack.get(f"/{INDEX}-v2") is None
    assert set(stack.alias_targets()) == {f"{INDEX}-v1"}
    assert stack.os_request("GET", f"/{INDEX}/_count")["count"] == v1_docs

    # --force swaps anyway (the stranger stays behind in v1)
    forced = stack.reindex("--json", "--wait", "0.2", "--force")
    assert forced.returncode == 0, forced.stdout[-2000:] + forced.stderr[-2000:]
    [res] = _json_report(forced)["results"]
    assert res["swapped"] is True and res["missing_ids"] == 1 and res["new_index"] == f"{INDEX}-v2", res
    assert set(stack.alias_targets()) == {f"{INDEX}-v2"}
    assert stack.marker() is None
    result = stack.index_check()
    assert result.ok, result.problems


def test_legacy_bare_index_is_moved_behind_the_alias(stack: ReindexStack):
    """An index named like the alias (written by an older version, without alias) stops the live sink
    with a one-line error naming the command; the reindex fills v1 and replaces the bare index by the
    alias in one _aliases request; the worker then runs."""
    write_changes(stack.ddb, stack.table, Workload(seed=61, items=20), 40)
    stack.os_request("PUT", f"/{INDEX}", {"settings": {"index.mapping.total_fields.limit": 2000}})
    stack.write_with_sink(options={"mapping": "dynamic"}, pin={INDEX: INDEX})  # plain docs, as before aliases
    legacy_docs = stack.os_request("GET", f"/{INDEX}/_count")["count"]
    assert legacy_docs > 0 and stack.alias_targets() == {}

    live = stack.start_worker()
    try:
        def failure() -> list[str]:
            return [str(e.get("error")) for e in json_log_events(stack.worker_log)
                    if e.get("level") == "error" and "opensearch reindex" in str(e.get("error"))]

        wait_until(lambda: bool(failure()), "the live sink's error about the plain index", timeout=60, interval=0.3)
        [message, *_] = failure()
        assert "\n" not in message and "ddb-cdc opensearch reindex --sink search" in message, message
        assert "plain index" in message, message
    finally:
        stack.stop(live)
    assert stack.get(f"/{INDEX}-v1") is None

    run = stack.reindex("--json", "--wait", "0.2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = _json_report(run)
    [plan] = report["plans"]
    assert (plan["kind"], plan["current"], plan["new_index"]) == ("index", INDEX, f"{INDEX}-v1"), plan
    [res] = report["results"]
    assert res["swapped"] is True and res["missing_ids"] == 0 and res["new_docs"] == legacy_docs, res
    aliases = stack.alias_targets()
    assert set(aliases) == {f"{INDEX}-v1"}, aliases
    indices = stack.os_request("GET", "/_cat/indices?format=json")
    assert INDEX not in {i["index"] for i in indices}, indices  # the bare index is gone
    assert stack.marker() is None
    result = stack.index_check()
    assert result.ok, result.problems

    # the worker now writes through the alias
    write_changes(stack.ddb, stack.table, Workload(seed=62, items=20), 30)
    live = stack.start_worker()
    try:
        stack.wait_caught_up(live)
        result = stack.index_check()
        assert result.ok, result.problems
    finally:
        stack.stop(live)
