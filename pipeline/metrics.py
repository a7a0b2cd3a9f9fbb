"""Prometheus metrics (prometheus-client), named by Prometheus conventions: ``ddb_cdc_…_total`` for
counters, base units (seconds), labels ``table`` / ``shard`` / ``sink``.

The worker updates them as it runs; ``metrics.enabled: true`` serves them over HTTP (bound to
``metrics.host``, 127.0.0.1 by default). This first set covers failure visibility: retries,
dead-lettered events, how long a sink has been stalled, decode errors and recorded gaps.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

SINK_RETRIES = Counter("ddb_cdc_sink_retries_total", "Retried sink calls (write or flush)", ["sink"])
SINK_DEAD_LETTERED = Counter("ddb_cdc_sink_dead_lettered_total", "Events a sink could not deliver, dead-lettered",
                             ["sink"])
SINK_DELIVERED = Counter("ddb_cdc_sink_events_delivered_total", "Events delivered to a sink", ["sink"])
SINK_STALLED = Gauge("ddb_cdc_sink_stalled_seconds",
                     "How long the current batch of a shard has been failing for a sink (0 when flowing)",
                     ["sink", "shard"])
DECODE_ERRORS = Counter("ddb_cdc_decode_errors_total", "Stream records that could not be decoded", ["table"])
GAPS = Counter("ddb_cdc_gaps_total", "Recorded gaps: records lost behind the trim horizon", ["table", "shard"])
GET_RECORDS_THROTTLES = Counter("ddb_cdc_get_records_throttles_total",
                                "GetRecords calls throttled after botocore's retries (backed off and retried)",
                                ["table", "shard"])
RECORDS_READ = Counter("ddb_cdc_records_read_total", "Stream records read", ["table", "shard"])


def serve(host: str, port: int) -> None:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread (prometheus-client's server)."""
    start_http_server(port, addr=host)
