"""Prometheus metrics (prometheus-client) and the worker's HTTP endpoints.

Names follow Prometheus conventions: ``ddb_cdc_…_total`` for counters, base units (seconds),
labels ``table`` / ``shard`` / ``sink``. Counters and the delivery histogram are updated as the
worker runs; the gauges that depend on "now" (iterator age, time left before the trim horizon,
sink age, leases held) are computed at scrape time by :class:`WorkerCollector` from the live
shard readers, so they grow while a reader or a sink is stuck instead of freezing at their last
value.

``metrics.enabled: true`` serves, on one HTTP server bound to ``metrics.host`` (127.0.0.1 by
default) and ``metrics.port`` (9108):

- ``/metrics`` — Prometheus text format;
- ``/healthz`` — 200 while the process is alive and its run loop ticks (503 when the loop has not
  ticked for ``metrics.health_stall_s``);
- ``/readyz`` — 200 once the configuration is loaded, the lease table is reachable and every sink
  opened, and while no AWS dependency has been failing (transiently, retried) for longer than
  ``metrics.aws_unready_after_s``; 503 with the reasons (JSON) otherwise.

DynamoDB Streams keeps records for 24 hours (DynamoDB developer guide, "Change data capture for
DynamoDB Streams"): a shard whose oldest unprocessed record nears that age is about to lose data.
"""

from __future__ import annotations

import socketserver
import threading
import time
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

from pipeline.source import STREAM_RETENTION_S  # noqa: E402,F401 - DynamoDB Streams' 24 h, defined once

# -- per shard ----------------------------------------------------------------------------------
RECORDS_READ = Counter("ddb_cdc_records_read_total", "Stream records read", ["table", "shard"])
GET_RECORDS_CALLS = Counter("ddb_cdc_get_records_calls_total", "GetRecords calls that returned", ["table", "shard"])
GET_RECORDS_ERRORS = Counter("ddb_cdc_get_records_errors_total",
                             "GetRecords calls that failed (expired iterator, trimmed data, vanished shard, "
                             "throttled after retries, other)", ["table", "shard", "error"])
GET_RECORDS_THROTTLES = Counter("ddb_cdc_get_records_throttles_total",
                                "GetRecords calls throttled after botocore's retries (backed off and retried)",
                                ["table", "shard"])
DECODE_ERRORS = Counter("ddb_cdc_decode_errors_total", "Stream records that could not be decoded", ["table"])
GAPS = Counter("ddb_cdc_gaps_total", "Recorded gaps: records lost behind the trim horizon", ["table", "shard"])
CHECKPOINT_WRITES = Counter("ddb_cdc_checkpoint_writes_total", "Checkpoints written", ["table", "shard"])
CHECKPOINT_FAILURES = Counter("ddb_cdc_checkpoint_failures_total",
                              "Checkpoint writes that failed (lease lost or lease table unreachable)",
                              ["table", "shard"])
# -- AWS dependencies -----------------------------------------------------------------------------
AWS_TRANSIENT_ERRORS = Counter("ddb_cdc_aws_transient_errors_total",
                               "AWS calls that failed in a way that passes (HTTP 5xx, throttling, timeout, reset "
                               "connection) after botocore's own attempts; the worker retried them with backoff",
                               ["operation"])
# -- leases -------------------------------------------------------------------------------------
LEASE_TAKEOVERS = Counter("ddb_cdc_lease_takeovers_total",
                          "Leases this worker took from another worker (expired or for balance)", ["table"])
# -- followed table streams (issue 13, 6b) -------------------------------------------------------
STREAM_ENABLED = Gauge("ddb_cdc_stream_enabled",
                       "1 while a followed table's stream is enabled, 0 once DescribeTable shows it disabled "
                       "(the worker then only finishes the old stream's shards)", ["table"])
STREAM_CHANGES = Counter("ddb_cdc_stream_changes_total",
                         "Table stream changes seen by discovery: change=new_stream (a new LatestStreamArn "
                         "followed), disabled, adopted (an older stream's unfinished leases taken up)",
                         ["table", "change"])
# -- per sink -----------------------------------------------------------------------------------
SINK_DELIVERED = Counter("ddb_cdc_sink_events_delivered_total", "Events delivered to a sink", ["sink"])
SINK_BATCHES = Counter("ddb_cdc_sink_batches_total", "Batches given to a sink", ["sink"])
SINK_RETRIES = Counter("ddb_cdc_sink_retries_total", "Retried sink calls (write or flush)", ["sink"])
SINK_DEAD_LETTERED = Counter("ddb_cdc_sink_dead_lettered_total", "Events a sink could not deliver, dead-lettered",
                             ["sink"])
SINK_DELIVERY_SECONDS = Histogram("ddb_cdc_sink_delivery_seconds",
                                  "Time to deliver one batch to a sink, retries included", ["sink"],
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                           60.0, 300.0))
SINK_STALLED = Gauge("ddb_cdc_sink_stalled_seconds",
                     "How long the current batch of a shard has been failing for a sink (0 when flowing)",
                     ["sink", "shard"])
# -- per-sink lanes (issue 15) --------------------------------------------------------------------
LANE_WAIT_SECONDS = Counter("ddb_cdc_lane_wait_seconds_total",
                            "Seconds a shard's reader waited because a sink's lane was full (backpressure)",
                            ["table", "shard"])

#: the ``error`` label values of ``ddb_cdc_get_records_errors_total`` (pipeline.runtime.shard_consumer)
GET_RECORDS_ERROR_KINDS = ("expired_iterator", "trimmed", "vanished", "throttled", "transient", "other")
#: every counter with a ``(table, shard)`` label pair
_PER_SHARD_COUNTERS = (RECORDS_READ, GET_RECORDS_CALLS, GET_RECORDS_THROTTLES, GAPS, CHECKPOINT_WRITES,
                       CHECKPOINT_FAILURES)

# -- the build ------------------------------------------------------------------------------------
BUILD_INFO = Gauge("ddb_cdc_build_info", "Always 1; the labels say which ddb-cdc and Python run here",
                   ["version", "python"])


def _set_build_info() -> None:
    import importlib.metadata
    import platform

    try:
        version = importlib.metadata.version("ddb-cdc")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        version = "unknown"
    BUILD_INFO.labels(version=version, python=platform.python_version()).set(1)


_set_build_info()


def forget_shard(table: str, shard: str, sinks: Iterable[str] = ()) -> None:
    """Remove every series labelled with ``(table, shard)`` — the per-shard counters, each
    ``error`` kind of ``ddb_cdc_get_records_errors_total`` — and ``ddb_cdc_sink_stalled_seconds``
    of ``(sink, shard)`` for each of ``sinks``. Shards roll over every few hours, so without this
    the series grow without bound. Never raises (a series never created is skipped).

    The worker calls it some time after the shard ended here (``metrics.shard_series_ttl_s``), so
    that scrapes see the last values first (an ``increase()`` over a removed series sees nothing).
    """
    def remove(metric: Any, *labels: str) -> None:
        try:
            metric.remove(*labels)
        except KeyError:  # older prometheus-client versions raise for a series never created
            pass

    for counter in _PER_SHARD_COUNTERS:
        remove(counter, table, shard)
    for kind in GET_RECORDS_ERROR_KINDS:
        remove(GET_RECORDS_ERRORS, table, shard, kind)
    for sink in sinks:
        remove(SINK_STALLED, sink, shard)


class WorkerCollector:
    """Scrape-time gauges of the live workers (``workers()`` returns them):

    - ``ddb_cdc_shard_iterator_age_seconds{table,shard}``: now − ApproximateCreationDateTime of
      the last record read; 0 once a read came back empty (caught up) — Lambda's IteratorAge,
      KCL's MillisBehindLatest, in seconds;
    - ``ddb_cdc_shard_trim_horizon_remaining_seconds{table,shard}``: 24 h − the age of the oldest
      record not yet checkpointed (86,400 when nothing is pending): how long until it is trimmed;
    - ``ddb_cdc_sink_age_seconds{sink}``: how far the sink's delivered position is behind — now −
      creation time of the oldest change handed to it and not yet delivered (0 when it has
      everything it was given);
    - ``ddb_cdc_lane_age_seconds{sink,table,shard}``: per-sink lag of one shard — now − creation
      time of the oldest change in that sink's lane not yet written to it (0 when the lane is empty;
      :mod:`pipeline.runtime.lanes`); ``ddb_cdc_sink_age_seconds{sink}`` is its largest value over
      the sink's lanes;
    - ``ddb_cdc_lane_records{sink,table,shard}`` / ``ddb_cdc_lane_bytes{...}``: the lane's fill
      (records / SizeBytes waiting or being written); ``ddb_cdc_lane_undurable_records{...}``:
      records given to the lane and not yet flushed by the sink (the checkpoint waits for them);
    - ``ddb_cdc_leases_held{table}``: leases this worker holds;
    - ``ddb_cdc_aws_failing_seconds{dependency}``: how long ``dynamodb_streams`` / ``lease_table``
      calls have been failing transiently (0 when the last call succeeded; see
      :mod:`pipeline.runtime.aws_health`);
    - ``ddb_cdc_aws_degraded``: 1 while one of them has been failing for longer than
      ``metrics.aws_unready_after_s`` (``/readyz`` is then 503), else 0.
    """

    def __init__(self, workers: Callable[[], Iterable[Any]]):
        self.workers = workers

    def collect(self):
        now = time.time()
        age = GaugeMetricFamily("ddb_cdc_shard_iterator_age_seconds",
                                "Now minus the creation time of the last record read (0 when caught up)",
                                labels=["table", "shard"])
        remaining = GaugeMetricFamily("ddb_cdc_shard_trim_horizon_remaining_seconds",
                                      "Seconds until the oldest unprocessed record passes the 24 h trim horizon",
                                      labels=["table", "shard"])
        sink_age = GaugeMetricFamily("ddb_cdc_sink_age_seconds",
                                     "Now minus the creation time of the oldest change given to the sink and "
                                     "not yet delivered (0 when current)", labels=["sink"])
        lane_labels = ["sink", "table", "shard"]
        lane_age = GaugeMetricFamily("ddb_cdc_lane_age_seconds",
                                     "Now minus the creation time of the oldest change in a sink's lane of a "
                                     "shard not yet written to the sink (0 when empty)", labels=lane_labels)
        lane_records = GaugeMetricFamily("ddb_cdc_lane_records", "Records waiting in a sink's lane of a shard",
                                         labels=lane_labels)
        lane_bytes = GaugeMetricFamily("ddb_cdc_lane_bytes", "Bytes (SizeBytes) waiting in a sink's lane of a shard",
                                       labels=lane_labels)
        lane_undurable = GaugeMetricFamily("ddb_cdc_lane_undurable_records",
                                           "Records given to a sink's lane of a shard and not yet flushed by it",
                                           labels=lane_labels)
        held = GaugeMetricFamily("ddb_cdc_leases_held", "Leases held by this worker", labels=["table"])
        failing = GaugeMetricFamily("ddb_cdc_aws_failing_seconds",
                                    "How long calls of an AWS dependency have been failing transiently (0: working)",
                                    labels=["dependency"])
        degraded = GaugeMetricFamily("ddb_cdc_aws_degraded",
                                     "1 while an AWS dependency has been failing for longer than "
                                     "metrics.aws_unready_after_s (then /readyz is 503)")
        any_degraded = 0
        for worker in self.workers():
            health = getattr(worker, "health", None)
            if health is not None:
                seconds = health.failing_for()
                for dep in ("dynamodb_streams", "lease_table"):
                    failing.add_metric([dep], seconds.get(dep, 0.0))
                any_degraded = max(any_degraded, int(health.degraded()))
            for consumer in list(worker.consumers.values()):
                table, shard = consumer.source.table, consumer.shard_id
                age.add_metric([table, shard], consumer.iterator_age_s(now))
                remaining.add_metric([table, shard], consumer.trim_horizon_remaining_s(now))
            lanes = getattr(worker, "lanes", None)
            ages = lanes.sink_ages(now) if lanes is not None else worker.fanout.sink_ages(now)
            for name, seconds in ages.items():
                sink_age.add_metric([name], seconds)
            for row in (lanes.status(now) if lanes is not None else []):
                labels = [row.sink, row.table, row.shard_id]
                lane_age.add_metric(labels, row.age_s)
                lane_records.add_metric(labels, row.records)
                lane_bytes.add_metric(labels, row.bytes)
                lane_undurable.add_metric(labels, row.undurable_records)
            counts: dict[str, int] = {}
            for lease in worker.coordinator.held():
                counts[lease.table] = counts.get(lease.table, 0) + 1
            for table in {s.table for s in worker.sources}:
                held.add_metric([table], counts.get(table, 0))
        degraded.add_metric([], any_degraded)
        yield from (age, remaining, sink_age, lane_age, lane_records, lane_bytes, lane_undurable, held, failing,
                    degraded)

    def describe(self):
        return []  # computed at scrape time; no fixed samples to describe


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: no access log
        pass


_workers: list[Any] = []
_collector_registered = False
_lock = threading.Lock()


def track_worker(worker: Any) -> None:
    """Include ``worker`` in the scrape-time gauges (idempotent)."""
    global _collector_registered
    with _lock:
        if worker not in _workers:
            _workers.append(worker)
        if not _collector_registered:
            REGISTRY.register(WorkerCollector(lambda: list(_workers)))
            _collector_registered = True


def health_app(probe: Callable[[], Any]) -> Callable:
    """A WSGI app: ``/metrics`` (prometheus-client's), ``/healthz`` and ``/readyz`` from ``probe()``
    — an object with ``healthy() -> (bool, str)`` and ``ready() -> (bool, list[str])``."""
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            target = probe()
            if target is None:
                ok, body = False, {"status": "starting"}
            elif path == "/healthz":
                ok, why = target.healthy()
                body = {"status": "ok" if ok else "unhealthy", "detail": why}
            else:
                ok, reasons = target.ready()
                body = {"status": "ready" if ok else "not ready", "reasons": reasons}
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
            return [orjson.dumps(body)]
        return metrics_app(environ, start_response)

    return app


def serve(host: str, port: int, probe: Callable[[], Any] = lambda: None) -> WSGIServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a daemon thread;
    returns the server (``shutdown()`` stops it). Raises OSError when the port is taken."""
    server = make_server(host, port, health_app(probe), server_class=_ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
