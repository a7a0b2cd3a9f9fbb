"""Prometheus metrics of snapshots (registered on the default registry, served by ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Gauge

SNAPSHOT_ITEMS = Gauge("ddb_cdc_snapshot_items", "Items a running snapshot has delivered so far", ["table"])
SNAPSHOT_STREAM_BEHIND_RATIO = Gauge(
    "ddb_cdc_snapshot_stream_behind_ratio",
    "While a snapshot runs: the stream consumer's lag / the stream's retention (alarm at 0.5)", ["table"])
SNAPSHOT_RATE_FACTOR = Gauge("ddb_cdc_snapshot_rate_factor",
                             "Share of --max-rcu the snapshot may use (lowered while the stream falls behind)",
                             ["table"])


def observe_retention(table: str, assessment) -> None:
    """Record a :class:`pipeline.snapshot.retention.RetentionAssessment`."""
    SNAPSHOT_STREAM_BEHIND_RATIO.labels(table=table).set(assessment.ratio)
    SNAPSHOT_RATE_FACTOR.labels(table=table).set(assessment.factor)


def observe_items(table: str, items: int) -> None:
    """Record a running snapshot's item count."""
    SNAPSHOT_ITEMS.labels(table=table).set(items)
