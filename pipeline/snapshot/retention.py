"""The stream must never age out while a snapshot runs (data-prepper#7150, redpanda-data/connect#4722).

A snapshot of a large table can take longer than the stream keeps records (24 hours —
DynamoDB developer guide, "DynamoDB Streams"). ddb-cdc consumes the stream *during* the
snapshot, and this watchdog compares how far the stream consumer is behind (the largest
``millisBehindLatest`` of the table's leases, written by every renewal) with the retention:

=========================  ==========================================================  ===========
behind / retention          what happens                                                 snapshot rate
=========================  ==========================================================  ===========
< ``warn_ratio`` (0.25)     nothing                                                      100 %
≥ ``warn_ratio``            ``snapshot_stream_behind`` warning, metric                   50 %
≥ ``alarm_ratio`` (0.5)     ``snapshot_stream_near_trim_horizon`` error, metric,         10 %
                            ``/readyz`` not ready ("stream consumer … behind")
=========================  ==========================================================  ===========

The snapshot is throttled first — it is the part that can wait; the stream is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.source import STREAM_RETENTION_S  # noqa: E402 - DynamoDB Streams' 24 h, defined once
WARN_RATIO = 0.25
ALARM_RATIO = 0.5


@dataclass(frozen=True)
class RetentionAssessment:
    """``level``: ok | warn | alarm; ``ratio``: behind / retention; ``factor``: the snapshot's
    rate factor (:meth:`pipeline.snapshot.ratelimit.RcuLimiter.slow_down`); ``behind_s``."""

    level: str
    ratio: float
    factor: float
    behind_s: float

    @property
    def reason(self) -> str | None:
        """The ``/readyz`` reason while alarmed, else None."""
        if self.level != "alarm":
            return None
        return (f"stream consumer {self.behind_s:.0f} s behind ({self.ratio:.0%} of the stream's retention) "
                "while a snapshot runs: the snapshot is throttled so the stream catches up")


def assess(behind_ms: int | None, retention_s: float = STREAM_RETENTION_S, *, warn_ratio: float = WARN_RATIO,
           alarm_ratio: float = ALARM_RATIO) -> RetentionAssessment:
    """Assess ``behind_ms`` (None = unknown, taken as 0) against ``retention_s`` (see the module doc)."""
    behind_s = max(0, behind_ms or 0) / 1000.0
    ratio = behind_s / retention_s if retention_s > 0 else 0.0
    if ratio >= alarm_ratio:
        return RetentionAssessment("alarm", ratio, 0.1, behind_s)
    if ratio >= warn_ratio:
        return RetentionAssessment("warn", ratio, 0.5, behind_s)
    return RetentionAssessment("ok", ratio, 1.0, behind_s)
