"""Builds the worker's connectors from :class:`pipeline.config.Settings` (the composition root).

Kept in ``connectors`` so that ``pipeline`` never imports boto3; the CLI calls
:func:`build_worker`.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config import Settings
from pipeline.deadletter import DirectoryDeadLetterQueue
from pipeline.runtime.fanout import FailurePolicy
from pipeline.runtime.lanes import lane_settings_from
from pipeline.registry import build_sinks
from pipeline.runtime.shard_consumer import ShardSettings
from pipeline.runtime.worker import Worker


def resolve_read_path(read_path: str, sinks: list | None) -> str:
    """``source.read_path`` with ``auto`` resolved for ``sinks``: ``typed`` when there are sinks
    and every one renders from the wire form (``Sink.renders_wire_form``), else ``fast``; any other
    value as it is."""
    if read_path != "auto":
        return read_path
    wire = bool(sinks) and all(getattr(sink, "renders_wire_form", False) for sink in sinks)
    return "typed" if wire else "fast"


def build_sources(settings: Settings, *, describe_retry_s: float | None = None, sinks: list | None = None) -> list[Any]:
    """One DynamoDB Streams source per configured table / stream ARN. Raises SourceError.
    ``describe_retry_s``: how long DescribeTable's transient errors are retried (default
    :data:`connectors.dynamodb_streams.source.DESCRIBE_TABLE_RETRY_S`; 0 for one attempt).
    ``sinks``: the worker's sinks, which decide ``read_path: auto`` (:func:`resolve_read_path`;
    without them ``auto`` is ``fast``)."""
    from connectors.aws import make_client
    from connectors.dynamodb_streams.source import DESCRIBE_TABLE_RETRY_S, DynamoDBStreamSource

    streams = make_client("dynamodbstreams", settings.aws, max_pool_connections=50)
    dynamodb = make_client("dynamodb", settings.aws)
    sources = []
    for kind, value in settings.source.stream_specs():
        kwargs = {kind: value}
        sources.append(DynamoDBStreamSource(settings.aws, dynamodb=dynamodb, streams=streams,
                                            read_path=resolve_read_path(settings.source.read_path, sinks),
                                            describe_retry_s=(DESCRIBE_TABLE_RETRY_S if describe_retry_s is None
                                                              else describe_retry_s), **kwargs))
    return sources


def build_lease_store(settings: Settings, namespace: str = "") -> Any:
    """The configured lease / checkpoint store (DynamoDB table or SQLite file); with ``namespace``
    (a replay), that namespace of it."""
    cfg = settings.checkpoints
    if cfg.store == "sqlite":
        from connectors.sqlite_store import SQLiteLeaseStore

        return SQLiteLeaseStore(cfg.sqlite_path, namespace=namespace)
    from connectors.dynamodb_streams.lease_table import DynamoDBLeaseStore

    return DynamoDBLeaseStore(settings.aws, cfg.table_name, namespace=namespace)


def build_dead_letter(settings: Settings) -> Any:
    """The dead-letter destination: S3 when ``dead_letter.s3_uri`` is set, else the directory."""
    if settings.dead_letter.s3_uri:
        from connectors.s3.deadletter import S3DeadLetterQueue

        return S3DeadLetterQueue(settings.aws, settings.dead_letter.s3_uri, encryption=settings.dead_letter)
    return DirectoryDeadLetterQueue(settings.dead_letter.directory or "dead-letter")


def build_worker(settings: Settings, *, logger: Any, where: str = "config", sinks: list | None = None,
                 exit_when_idle: bool = False, sources: list | None = None, lease_store: Any = None,
                 worker_id: str | None = None, **worker_kwargs: Any) -> Worker:
    """A ready-to-run :class:`Worker`. Raises ConfigError (sinks) or SourceError (stream).

    ``sources`` / ``lease_store`` / ``worker_id`` replace the configured ones (a replay passes its
    namespaced store); ``worker_kwargs`` go to :class:`Worker` as they are (``read_window`` …).
    """
    sinks = sinks if sinks is not None else build_sinks(settings.sinks, where)
    policies = {c.name: FailurePolicy.from_config(c) for c in settings.sinks}
    src = settings.source
    return Worker(
        sources=sources if sources is not None else build_sources(settings, sinks=sinks),
        lease_store=lease_store if lease_store is not None else build_lease_store(settings),
        sinks=sinks,
        dead_letter=build_dead_letter(settings),
        worker_id=worker_id or settings.worker.lease_owner,  # unique per process (issue 13, 6a)
        logger=logger,
        start_position=src.start_position,
        shard_settings=ShardSettings(max_records_per_call=src.max_records_per_call,
                                     idle_interval_ms=src.idle_interval_ms,
                                     max_idle_interval_ms=max(src.idle_interval_ms, src.max_idle_interval_ms),
                                     checkpoint_interval_s=src.checkpoint_interval_s,
                                     on_trimmed=src.on_trimmed),
        discovery_interval_s=src.discovery_interval_s,
        failover_time_s=settings.checkpoints.failover_time_s,
        max_leases_to_steal=settings.checkpoints.max_leases_to_steal,
        shutdown_grace_s=settings.worker.shutdown_grace_s,
        policies=policies,
        aws=settings.aws,
        exit_when_idle=exit_when_idle,
        **{"sink_open_timeout_s": settings.worker.sink_open_timeout_s,
           "iterator_age_warning_s": settings.worker.iterator_age_warning_s,
           "iterator_age_error_s": settings.worker.iterator_age_error_s,
           "iterator_age_log_interval_s": settings.worker.iterator_age_log_interval_s,
           "health_stall_s": settings.metrics.health_stall_s,
           "aws_unready_after_s": settings.metrics.aws_unready_after_s,
           "shard_series_ttl_s": settings.metrics.shard_series_ttl_s,
           "max_pages_in_flight": settings.worker.max_pages_in_flight,
           "lane_settings": lane_settings_from(settings.sinks),
           # a configured id: leases of a dead earlier process of it are re-taken at once
           "worker_name": settings.worker.id if "id" in settings.worker.model_fields_set else None,
           **worker_kwargs},
    )


def existing_lease_store(settings) -> object:
    """The configured lease store, without creating a SQLite file that is not there (opening a
    missing file would create it). Raises CheckpointStoreError with the fix."""
    from pipeline.errors import CheckpointStoreError

    cfg = settings.checkpoints
    if cfg.store == "sqlite" and not os.path.isfile(cfg.sqlite_path):
        raise CheckpointStoreError(f"no checkpoint file at {cfg.sqlite_path}: check checkpoints.sqlite_path "
                                   "(a worker creates it on its first start)")
    return build_lease_store(settings)
