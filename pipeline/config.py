"""Configuration: one pydantic-settings model from a YAML file, overridable by ``DDB_CDC_*`` env vars.

Environment variables use ``__`` for nesting: ``DDB_CDC_SOURCE__TABLE=orders``,
``DDB_CDC_AWS__ENDPOINT_URL=http://127.0.0.1:8000``, ``DDB_CDC_CHECKPOINTS__STORE=sqlite``.
Lists and objects take JSON: ``DDB_CDC_SINKS='[{"name": "search", "type": "opensearch", ...}]'``.
An environment variable wins over the file.

:func:`load_settings` raises :class:`pipeline.errors.ConfigError` with one line per problem
(where, what, how to fix); the CLI prints them and exits with code 2.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.awsconfig import AwsConfig
from pipeline.errors import ConfigError
from pipeline.runtime.lanes import DEFAULT_LANE_MAX_BYTES, DEFAULT_LANE_MAX_RECORDS
from pipeline.runtime.read_budget import DEFAULT_MAX_PAGES_IN_FLIGHT
from pipeline.runtime.shard_consumer import DEFAULT_MAX_IDLE_INTERVAL_MS
from pipeline.s3_sse import S3Encryption

ENV_PREFIX = "DDB_CDC_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """The streams to read: by ``table`` (its LatestStreamArn) or by ``stream_arn``; several with
    the lists ``tables`` / ``stream_arns`` (every shard of every stream is a lease in one lease
    table; events carry their table, so index names and key templates can depend on it).

    - ``start_position``: where a shard with no checkpoint starts, TRIM_HORIZON (oldest record
      still in the stream, default) or LATEST (only new records). Shards that appear later
      (children of a split) always start at TRIM_HORIZON so nothing is missed. A LATEST start is
      made concrete by its first reader before it delivers anything (``AT_TIMESTAMP:`` then
      ``AT_SEQUENCE_NUMBER:`` checkpoints), so a hand-off loses nothing written after it.
      A table's stream that is disabled and enabled again is followed (see
      :mod:`pipeline.runtime.worker`): the new stream starts at TRIM_HORIZON after the old one ended.
    - ``max_records_per_call``: GetRecords ``Limit``, 1–1,000 (DynamoDB Streams API reference).
    - ``idle_interval_ms``: wait after an empty GetRecords before the next (default 250 ms);
      while records flow there is no wait.
    - ``max_idle_interval_ms``: adaptive idle polling — after 2 empty GetRecords calls in a row
      the wait doubles per further empty call, up to this (default 2,000 ms; set it equal to
      ``idle_interval_ms`` for a fixed wait); the first page with records resets it. The first
      change after a quiet spell therefore waits at most this long to be read.
    - ``discovery_interval_s``: how often DescribeStream is re-run to find new shards (default 30 s).
    - ``checkpoint_interval_s``: how often a shard flushes every sink and checkpoints while
      records flow (default 5 s); also at SHARD_END and at shutdown.
    - ``on_trimmed``: when a checkpoint lies behind the 24-hour trim horizon (or the shard left
      the stream unread): ``fail`` (default) stops the shard, ``skip`` goes on from TRIM_HORIZON;
      either way a gap is recorded in the lease table, logged as an error and shown by status.
    - ``read_path``: how GetRecords responses are parsed: ``auto`` (default): ``typed`` when every
      sink renders from the wire form (``Sink.renders_wire_form``: the S3 audit sink, OpenSearch's
      ``typed`` mapping, the Redis cache sink, unshaped), else ``fast``; ``fast``: orjson into plain
      dicts (``connectors.dynamodb_streams.fastpath``); ``typed``: msgspec into checked
      AttributeValue structs (``pipeline.avwire``: rendering the S3 line and the typed OpenSearch
      document costs least, decoding whole images more than from dicts); ``boto3``: botocore's
      shape-driven parser, for comparison. All give identical change events.
    """

    table: str | None = None
    stream_arn: str | None = None
    tables: list[str] = Field(default_factory=list)
    stream_arns: list[str] = Field(default_factory=list)
    start_position: Literal["TRIM_HORIZON", "LATEST"] = "TRIM_HORIZON"
    read_path: Literal["auto", "fast", "typed", "boto3"] = "auto"
    max_records_per_call: int = Field(1000, ge=1, le=1000)
    idle_interval_ms: int = Field(250, ge=0, le=60_000)
    max_idle_interval_ms: int = Field(DEFAULT_MAX_IDLE_INTERVAL_MS, ge=0, le=300_000)
    discovery_interval_s: float = Field(30.0, gt=0)
    checkpoint_interval_s: float = Field(5.0, ge=0)
    on_trimmed: Literal["fail", "skip"] = "fail"
    #: issue 17: on a group's first start, take the stream position, then snapshot the table
    #: (connectors.snapshot.initial); ``snapshot_max_rcu`` (RCU/s, 0 = unlimited) and
    #: ``snapshot_segments`` (None = from the table's size) shape that snapshot
    initial_snapshot: bool = False
    snapshot_max_rcu: float = Field(1000.0, ge=0)
    snapshot_segments: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_stream(self) -> "SourceConfig":
        specs = self.stream_specs()
        if not specs:
            raise ValueError("set source.table (the table name), source.stream_arn, "
                             "or the lists source.tables / source.stream_arns")
        if len(set(specs)) != len(specs):
            raise ValueError("a table or stream ARN is named twice in source")
        return self

    def stream_specs(self) -> list[tuple[str, str]]:
        """Every configured stream as ``("table", name)`` or ``("stream_arn", arn)``, in order."""
        specs = [("table", t) for t in ([self.table] if self.table else []) + list(self.tables)]
        specs += [("stream_arn", a) for a in ([self.stream_arn] if self.stream_arn else []) + list(self.stream_arns)]
        return specs


class CheckpointConfig(_Strict):
    """Where leases and checkpoints live.

    ``store: dynamodb`` (default) uses the DynamoDB table ``table_name`` (created on first start,
    on-demand billing, KCL's attribute names); ``store: sqlite`` uses the file ``sqlite_path`` for
    single-machine runs without AWS. ``failover_time_s``: a lease not renewed for this long is
    taken over by another worker (renewal every failover_time_s / 3). ``max_leases_to_steal``
    (default 1, KCL's ``maxLeasesToStealAtOneTime`` default — KCL configuration reference): a
    worker below its fair share takes at most this many leases per renewal from the most loaded
    worker, so a newcomer reaches its share ⌈N/P⌉ after about ⌈N/P⌉ / max_leases_to_steal
    renewals. Larger values balance faster; with several newcomers stealing from one worker in the
    same renewal, that worker can drop up to (newcomers × this) below its share for a renewal or
    two before it takes leases back (each steal stops a reader; its uncheckpointed records are
    delivered again by the new owner).
    """

    store: Literal["dynamodb", "sqlite"] = "dynamodb"
    table_name: str = "ddb-cdc-leases"
    sqlite_path: str = "ddb-cdc-checkpoints.sqlite"
    failover_time_s: float = Field(10.0, gt=0)
    max_leases_to_steal: int = Field(1, ge=1, le=10_000)


class DeadLetterConfig(_Strict, S3Encryption):
    """Dead-letter destination: a local ``directory`` (default ``./dead-letter``) or ``s3_uri``
    (``s3://bucket/prefix``, uses the ``aws`` settings). With ``s3_uri``, ``sse`` /
    ``kms_key_id`` encrypt each entry object exactly as the S3 audit sink's options of the same
    names (:class:`pipeline.s3_sse.S3Encryption`); without it they are an error."""

    directory: str | None = "dead-letter"
    s3_uri: str | None = None

    @field_validator("s3_uri")
    @classmethod
    def _s3(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("s3://"):
            raise ValueError("must look like s3://bucket/prefix")
        return value

    @model_validator(mode="after")
    def _sse_needs_s3(self) -> "DeadLetterConfig":
        if self.sse is not None and not self.s3_uri:
            raise ValueError("sse/kms_key_id apply to an S3 dead-letter destination: set dead_letter.s3_uri "
                             "or remove them (a local directory is not encrypted by ddb-cdc)")
        return self


class SinkConfig(_Strict):
    """One sink: a unique ``name``, its ``type`` (built-in or a plugin's entry-point name),
    its ``options`` (validated by the sink's own model), and its failure policy: ``on_failure``,
    ``retry_budget_s`` (s, for ``dead_letter``) and ``max_backoff_s`` (s, the longest wait between
    retries; backoff starts at 0.2 s and doubles, with jitter).

    Shaping (:mod:`pipeline.shaping`, README "Filters, routing and transforms"): ``tables`` (table
    names or globs; empty = every table), ``filter`` (an AWS event filter pattern, a list of them,
    or Lambda's ``FilterCriteria``), ``transforms`` (applied in order, each ``{"type": ..., options}``).
    They are compiled and validated when the sinks are built (``config check``).
    ``lane_max_records`` (default 10,000) / ``lane_max_bytes`` (default 16 MiB) bound the sink's
    lane of each shard: the changes read for this sink and not yet written to it (see
    :mod:`pipeline.runtime.lanes`)."""

    name: str = Field(min_length=1)
    type: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    on_failure: Literal["block", "dead_letter"] = "block"
    retry_budget_s: float = Field(300.0, gt=0)
    max_backoff_s: float = Field(20.0, gt=0)
    tables: list[str] = Field(default_factory=list)
    filter: Any = None
    transforms: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("tables")
    @classmethod
    def _tables(cls, value: list[str]) -> list[str]:
        if any(not t.strip() for t in value):
            raise ValueError("table names / globs must not be empty")
        return value
    #: bounds of this sink's lane of each shard (:mod:`pipeline.runtime.lanes`): records, and bytes
    #: (sum of the events' SizeBytes); a full lane makes the shard's reader wait
    lane_max_records: int = Field(DEFAULT_LANE_MAX_RECORDS, ge=1, le=10_000_000)
    lane_max_bytes: int = Field(DEFAULT_LANE_MAX_BYTES, ge=1024)


class WorkerConfig(_Strict):
    """The worker process.

    - ``id``: this worker's name (default ``host:pid:random``). The lease owner is
      :attr:`lease_owner`: the default id as it is, a configured id with ``:{pid}:{8 hex}`` appended
      per process (``orders-a`` → ``orders-a:4242:9f1c2d3e``), so two processes given the same id
      (two containers from one config, ``--processes N`` with an id set) are two lease owners, not
      one that takes its leases back from itself on every renewal. A restarted process still
      re-takes at once the leases of an earlier process of the same id that is provably dead
      (same host, pid gone, last heartbeat before the restart); otherwise after failover_time_s;
    - ``shutdown_grace_s``: SIGTERM/SIGINT → flush, checkpoint, exit within this (s);
    - ``sink_open_timeout_s``: a sink that cannot open (its service not up yet) is retried with
      backoff for this long (s) — not ready meanwhile — before the worker exits 1;
    - ``iterator_age_warning_s`` / ``iterator_age_error_s``: log a warning / an error when a
      shard's iterator age passes these (s; default 1 h and 20 h — DynamoDB Streams trims records
      after 24 h), at most once per ``iterator_age_log_interval_s`` per shard.
    - ``max_pages_in_flight``: at most this many GetRecords pages (of ``source.max_records_per_call``
      records each) fetched and not yet delivered to every sink at once, across all shards of the
      worker process (default 4; 0 = no bound). Counted in records: a shard reserves its
      GetRecords ``Limit`` before the call (a full page, or 100 records while it is caught up) and
      keeps only what arrived until the page is delivered, so empty polls and small pages hold
      little; a worker behind on many shards holds at most this many full pages in memory
      (:mod:`pipeline.runtime.read_budget`).
    """

    id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    shutdown_grace_s: float = Field(30.0, gt=0)
    sink_open_timeout_s: float = Field(60.0, ge=0)
    iterator_age_warning_s: float = Field(3600.0, gt=0)
    iterator_age_error_s: float = Field(72000.0, gt=0)
    iterator_age_log_interval_s: float = Field(300.0, gt=0)
    max_pages_in_flight: int = Field(DEFAULT_MAX_PAGES_IN_FLIGHT, ge=0, le=10_000)
    _lease_owner: str | None = PrivateAttr(default=None)

    @property
    def lease_owner(self) -> str:
        """The lease owner name of this process (see ``id``): unique per process and per loaded
        configuration even when ``id`` is configured, fixed once computed. Lease owners compare
        as strings: with one shared owner name, each process would count the other's leases as
        its own ("own" leases are taken back at once) and both would lose them on every renewal."""
        if self._lease_owner is None:
            configured = "id" in self.model_fields_set
            self._lease_owner = f"{self.id}:{os.getpid()}:{uuid.uuid4().hex[:8]}" if configured else self.id
        return self._lease_owner


class MetricsConfig(_Strict):
    """Prometheus metrics and the health endpoints over HTTP (``/metrics``, ``/healthz``,
    ``/readyz``): off unless ``enabled``; bound to ``host`` (127.0.0.1 by default, so nothing is
    exposed beyond the machine unless asked) on ``port``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=1, le=65535)
    #: ``/healthz`` answers 503 when the run loop has not ticked for this long (s)
    health_stall_s: float = Field(60.0, gt=0)
    #: ``/readyz`` answers 503 while an AWS dependency (streams, lease table) has been failing
    #: transiently (5xx, timeouts; retried with backoff) for longer than this (s)
    aws_unready_after_s: float = Field(30.0, gt=0)
    #: a shard's series (``shard`` label) are removed this long after the shard ended here
    #: (SHARD_END, released, lease lost) — several scrape intervals, so its last values are seen (s)
    shard_series_ttl_s: float = Field(600.0, ge=0)


class LogConfig(_Strict):
    """Logging: level, and format ``auto`` (JSON unless stderr is a TTY), ``json`` or ``console``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    """The whole configuration (see README, "Configuration")."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    source: SourceConfig
    aws: AwsConfig = Field(default_factory=AwsConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    dead_letter: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    sinks: list[SinkConfig] = Field(min_length=1)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _unique_sink_names(self) -> "Settings":
        seen: set[str] = set()
        for sink in self.sinks:
            if sink.name in seen:
                raise ValueError(f"sink name {sink.name!r} is used twice; give each sink its own name")
            seen.add(sink.name)
        self._sink_tables_match_sources()
        return self

    def _sink_tables_match_sources(self) -> None:
        """Each sink's ``tables`` must match a configured source table (when every source is
        given by table name; a stream ARN's table is known only once it is described)."""
        import fnmatch

        specs = self.source.stream_specs()
        if any(kind != "table" for kind, _ in specs):
            return
        names = [value for _, value in specs]
        for index, sink in enumerate(self.sinks):
            if sink.tables and not any(fnmatch.fnmatchcase(n, g) for n in names for g in sink.tables):
                raise ValueError(f"sinks[{index}] ({sink.name}): tables {sink.tables} match none of the source "
                                 f"tables ({', '.join(names)}); fix the names or globs")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: it overrides what the YAML file (passed as init values) says.
        return (env_settings, init_settings)


def load_settings(path: str | os.PathLike | None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the YAML file at ``path`` (optional), apply ``DDB_CDC_*`` env vars, validate.

    Raises ConfigError with one line per problem, e.g.
    ``config.yaml: sinks.0.options: Input should be a valid dictionary``.
    """
    where = str(path) if path else "environment"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{where}: file not found; pass an existing YAML file with --config"])
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError([f"{where}:{line}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{where}: the top level must be a mapping of sections (source, sinks, ...)"])
        data = loaded
    if overrides:
        data = {**data, **overrides}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(validation_lines(exc, where)) from None


def validation_lines(exc: ValidationError, where: str, prefix: str = "") -> list[str]:
    """One ``where: field.path: message`` line per pydantic error."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "__root__")
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        msg = err.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{where}: {loc or '(top level)'}: {msg}")
    return lines
