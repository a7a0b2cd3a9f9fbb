"""Stream replay (``ddb-cdc replay --from …``) against DynamoDB Local, osmem-server, moto S3 and
redis-server, with the live worker running beside it; plus replay rules on the API double
(time windows to the second, lineage, sequence starts, dry runs, throttling)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from connectors.embedded.verify import check_opensearch, read_stream_events
from connectors.embedded.workload import Workload, scan_items, write_changes
from tests.process_stack import SinksStack, worker_env
from pipeline.codec import key_id

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
INDEX = "orders-replay"


class ReplayStack(SinksStack):
    """A table with a stream, the three built-in sinks, a config file, and the live worker."""

    def __init__(self, tmp_path: Path, dynamodb_local, moto_server, opensearch_url, redis_server, name: str):
        super().__init__(tmp_path, dynamodb_endpoint=dynamodb_local.endpoint, s3_endpoint=moto_server.endpoint,
                         os_url=opensearch_url, redis_url=redis_server.url, table=f"{name}-{os.urandom(4).hex()}",
                         bucket=f"replay-{os.urandom(3).hex()}", index=INDEX)
        self.env = worker_env(faulthandler=False)
        self.worker_log = tmp_path / "worker.log"

    def start_worker(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "connectors.app.cli", "run", "--config", str(self.config_path)],
                                stdout=open(self.worker_log, "ab"), stderr=subprocess.STDOUT, env=self.env,
                                cwd=str(ROOT))

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "connectors.app.cli", *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, env=self.env, cwd=str(ROOT), timeout=timeout)

    def wait_caught_up(self, proc: subprocess.Popen, timeout: float = 120) -> None:
        last = self.last_seq()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"worker exited early: {self.worker_log.read_text()[-3000:]}"
            if self.checkpoint() == last:
                return
            time.sleep(0.3)
        pytest.fail(f"worker did not reach {last}; log: {self.worker_log.read_text()[-3000:]}")

    def os_request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.os_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def index_check(self):
        items = scan_items(self.ddb, self.table)
        return check_opensearch(self.os_url, INDEX, items, lambda it: key_id({"pk": it["pk"], "sk": it["sk"]}))


@pytest.fixture
def stack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server):
    return ReplayStack(tmp_path, dynamodb_local, moto_server, opensearch_url, redis_server, "replay")


def test_rebuild_dropped_index_while_live_worker_writes(stack: ReplayStack):
    """Drop the index; `replay --from trim-horizon --sink search` rebuilds it equal to the table
    while the live worker keeps writing newer changes of the same items — which the replay's
    older events never overwrite (external versions)."""
    write_changes(stack.ddb, stack.table, Workload(seed=11, items=60), 900)
    live = stack.start_worker()
    try:
        stack.wait_caught_up(live)
        assert stack.index_check().ok
        live_checkpoint_before = stack.checkpoint()
        stack.os_request("DELETE", f"/{INDEX}-v1")  # the index behind the sink's alias

        stop_writer = threading.Event()
        written = {"n": 0}

        def writer() -> None:  # newer changes of the same 60 items while the replay runs
            for change in Workload(seed=12, items=60).changes(10_000):
                if stop_writer.is_set():
                    return
                from connectors.embedded.workload import apply_change

                apply_change(stack.ddb, stack.table, change)
                written["n"] += 1
                time.sleep(0.01)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            replay = stack.cli("replay", "--from", "trim-horizon", "--sink", "search", "--json")
        finally:
            stop_writer.set()
            thread.join(10)
        assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-3000:]
        report = json.loads(replay.stdout)
        assert report["ok"] and report["sinks"] == ["search"]
        assert report["delivered"] >= 900, report
        assert all(s["ended"] in ("caught_up", "until", "shard_end") for s in report["shards"]), report
        assert written["n"] > 0, "the writer made no change while the replay ran"

        stack.wait_caught_up(live)
        result = stack.index_check()
        assert result.ok, result.problems
        # the replay kept to its own namespace: the live checkpoint only moved forwards, and the
        # replay's leases are gone after a complete replay
        assert int(stack.checkpoint()) >= int(live_checkpoint_before)
        assert stack.store(report["replay_id"]).list_leases() == []
        assert live.poll() is None, "the live worker stopped during the replay"
    finally:
        live.send_signal(signal.SIGTERM)
        assert live.wait(45) == 0, stack.worker_log.read_text()[-3000:]


def _minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def test_time_window_replays_exactly_the_changes_in_the_window(stack: ReplayStack, aws_env):
    """`--from time T --until U` into a recording plugin sink delivers exactly the changes whose
    ApproximateCreationDateTime lies in [T, U]. DynamoDB Local rounds that time down to the
    minute, so the test writes two groups of changes on either side of a minute boundary."""
    write_changes(stack.ddb, stack.table, Workload(seed=21, items=30), 40)
    first = read_stream_events(stack.streams, stack.stream_arn, stack.table)
    minute_a = _minute(first[-1].source.approximate_creation_time)
    while _minute(datetime.now(timezone.utc)) <= minute_a:  # up to one minute
        time.sleep(0.5)
    write_changes(stack.ddb, stack.table, Workload(seed=22, items=30), 50)
    events = read_stream_events(stack.streams, stack.stream_arn, stack.table)
    times = sorted({e.source.approximate_creation_time for e in events})
    assert len(times) >= 2, times

    def replay_window(since: datetime | None, until: datetime) -> list[str]:
        from connectors.app.wiring import build_sources
        from connectors.app.wiring import build_worker
        from pipeline.config import load_settings
        from pipeline.logs import get_logger
        from pipeline.replay.stream import StartSpec, StreamReplay, new_replay_id
        from pipeline.testing import RecordingSink

        settings = load_settings(str(stack.config_path))
        sink = RecordingSink("recording")
        replay_id = new_replay_id()
        sources = build_sources(settings)
        log = get_logger(test="window")
        spec = StartSpec("time", since=since) if since else StartSpec("trim-horizon")
        replay = StreamReplay(
            sources=sources, store=stack.store(replay_id), spec=spec, until=until, sink_names=["recording"],
            replay_id=replay_id, logger=log, idle_reads=3,
            make_worker=lambda **kw: build_worker(settings, logger=log, sinks=[sink], exit_when_idle=True,
                                                  sources=sources, **kw))
        replay.prepare()
        report = replay.run()
        assert report.ok, report
        assert report.delivered == len(sink.flushed)
        return [e.sequence_number for e in sink.flushed]

    t0, t1 = times[0], times[-1]
    # window = the later minute only: exactly the second group
    got = replay_window(t1, t1 + timedelta(seconds=59))
    assert got == [e.sequence_number for e in events if t1 <= e.source.approximate_creation_time], got
    # window up to just before the later minute: exactly the first group (a record past --until ends the shard)
    got = replay_window(None, t1 - timedelta(seconds=1))
    assert got == [e.sequence_number for e in events if e.source.approximate_creation_time <= t1 - timedelta(seconds=1)]
    assert len(got) == len([e for e in events if e.source.approximate_creation_time == t0])

    # the dry run counts the same, sends nothing
    dry = stack.cli("replay", "--from", "time", t1.isoformat(), "--until", (t1 + timedelta(seconds=59)).isoformat(),
                    "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and report["delivered"] == len([e for e in events
                                                            if t1 <= e.source.approximate_creation_time])
    assert report["shards"][0]["first_time"] is not None
