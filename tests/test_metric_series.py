"""Per-shard metric series do not grow without bound (issue 13 item 15): a shard that ended here
(SHARD_END, released, lease lost) has its ``shard``-labelled series removed after
``metrics.shard_series_ttl_s``; a shard still being read keeps them; ``ddb_cdc_build_info`` says
what runs. Real Worker + DynamoDBStreamSource + SQLite lease store over the streams API double."""

from __future__ import annotations

import importlib.metadata
import platform

import pytest
import structlog
from prometheus_client import REGISTRY

from pipeline.runtime.shard_consumer import ShardSettings
from pipeline.testing import RecordingSink, make_stream_record
from connectors.dynamodb_streams.testing import FakeStreams, seq
from tests.helpers import wait_until
from tests.stacks import Running, make_worker



def _records(shard_no, n):
    return [make_stream_record(keys={"pk": f"i-{shard_no}-{i}"}, new_image={"pk": f"i-{shard_no}-{i}"},
                               sequence_number=seq(shard_no, i)) for i in range(n)]


def _read(shard):
    return REGISTRY.get_sample_value("ddb_cdc_records_read_total", {"table": "orders", "shard": shard})


@pytest.mark.parametrize("ttl_s, removed", [(0.0, True), (3600.0, False)])
def test_a_finished_shards_series_go_after_the_ttl(tmp_path, ttl_s, removed):
    tag = "r" if removed else "k"  # the registry is process-wide: own shard ids per case
    CLOSED, OPEN = f"shardId-00000001700000000000-000000m{tag}", f"shardId-00000001700000000000-000000n{tag}"
    fake = FakeStreams()
    fake.add_shard(CLOSED, _records(41, 3), closed=True)
    fake.add_shard(OPEN, _records(42, 2), closed=False)
    sink = RecordingSink()
    worker = make_worker(fake, tmp_path, sink, worker_id=f"w-{ttl_s}", logger=structlog.get_logger("test_metric_series"),
                         start_position="TRIM_HORIZON", max_records=ShardSettings.max_records_per_call,
                         failover_time_s=3, shard_series_ttl_s=ttl_s)
    running = Running(worker)
    try:
        wait_until(lambda: len(sink.flushed) >= 5, "every record flushed", timeout=30)
        if removed:
            wait_until(lambda: _read(CLOSED) is None, "the finished shard's series removed", timeout=30)
        else:
            wait_until(lambda: ("orders", CLOSED) in worker._forget_series_at,
                       "the finished shard is due for removal later", timeout=30)
            assert _read(CLOSED) == 3
        assert _read(OPEN) == 2  # still read here: kept
    finally:
        worker.stop()
        running.thread.join(15)
    if not removed:
        assert _read(CLOSED) == 3


def test_build_info_names_the_version_and_python():
    value = REGISTRY.get_sample_value("ddb_cdc_build_info", {"version": importlib.metadata.version("ddb-cdc"),
                                                              "python": platform.python_version()})
    assert value == 1.0
