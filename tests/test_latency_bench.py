"""The latency benchmark (benchmarks/latency.py) end to end, short: 50 changes/s for 3 s.

Runs on the session's real servers (DynamoDB Local, moto S3, osmem-server, Redis — fixtures in
conftest.py: a missing one skips, or fails under CI=true). Checks that every written change reached
the last sink, that nothing was dead-lettered, that the worker stopped cleanly and that the
reported percentiles are positive and ordered.
"""

from __future__ import annotations

import pytest

from benchmarks.latency import Endpoints, run_latency

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_latency_benchmark_short_run(dynamodb_local, moto_server, opensearch_server, redis_server, aws_env):
    endpoints = Endpoints(dynamodb=dynamodb_local.endpoint, s3=moto_server.endpoint,
                          opensearch=opensearch_server.url, redis=redis_server.url)

    result = run_latency(rates=(50,), duration_s=3, warmup_s=1.0, endpoints=endpoints, drain_timeout_s=30.0)

    assert result["worker_exit_code"] == 0
    assert result["dead_lettered"] == 0
    [phase] = result["phases"]
    assert phase["target_rate"] == 50
    assert phase["written"] == phase["planned"] == 150
    assert phase["write_failures"] == 0
    assert phase["missing"] == 0 and phase["arrived"] == phase["written"], phase["missing_sample"]
    assert phase["all_arrived"] and result["all_arrived"]
    assert phase["achieved_rate"] > 0
    latency = phase["latency_ms"]
    assert latency["count"] == phase["written"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert phase["get_records"]["calls"] > 0
    assert set(phase["sink_write_ms"]) == {"search", "audit", "cache"}
    assert result["settings"]["idle_interval_ms"] == 250  # the user's default, not a tuned value
    assert result["settings"]["sinks"] == ["probe_first", "search", "audit", "cache", "probe"]
    assert result["targets"]["met"] is None  # no 200/s phase in this run
    # every sink drained; osmem's floor: the OpenSearch sink's bulk bodies of this phase posted again
    assert phase["per_sink_drained"] == {"search": True, "audit": True, "cache": True}
    assert phase["slower_than_offered"] == []
    floor = phase["opensearch_floor"]["search"]
    assert floor["refused"] == 0, "the copy of the sink's index accepted every action"
    assert floor["actions"] >= phase["written"] and floor["requests"] >= 1
    assert floor["docs_per_s"] > 0 and floor["sink_docs_per_s"] > 0
    alone = floor["alone"]  # bodies sent after the last write and the other sinks' last change
    assert alone is None or (0 < alone["actions"] <= floor["actions"] and alone["requests"] <= floor["requests"])
    assert result["targets"]["drain"]["50"]["met"] is True
