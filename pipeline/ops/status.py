"""``ddb-cdc status``: what the lease table says — leases, checkpoints, lag, workers.

Read-only: it lists leases and worker announcements and (optionally) describes the streams;
it never writes to the store and never takes a lease, so it is safe to run next to live workers.

Three parts, each a plain function so tests need no CLI:

- :func:`gather_status` reads a :class:`pipeline.checkpoint.LeaseStore` (and describes the
  streams of ``sources`` when given) into a :class:`StatusReport`;
- :func:`status_to_dict` turns it into JSON-ready data with stable keys (``--json``);
- :func:`render_status` prints it with rich: a lease table, a worker table and a summary line.

Columns and their meaning:

- *checkpoint*: a sequence number (shortened to ``head…tail`` in the table; ``--json`` has the
  full text) or a sentinel TRIM_HORIZON / LATEST / SHARD_END;
- *behind*: the owner's last reported lag (``Lease.behind_ms``: now − ApproximateCreationDateTime
  of the last record read, 0 when caught up), ``-`` when never reported, ``done`` at SHARD_END;
- *in stream*: whether DescribeStream still lists the shard (``yes``/``no``), ``?`` when the
  stream was not described (no sources given, or DescribeStream failed — status still works
  while the stream is unreachable, as long as the lease store is reachable);
- a worker is *live* while its last heartbeat is at most ``3 × failover_time_s`` old, else
  *stale*. This compares the worker host's clock (``heartbeat_at`` is written by the worker)
  with this host's UTC clock, so host clocks must be roughly in sync — for this column only:
  the lease protocol itself never compares clocks of different hosts. A lease owner that has no
  announcement is shown as *unannounced*.

Per-sink lanes (issue 15; :mod:`pipeline.runtime.lanes`), from each live worker's last heartbeat
(so up to ``failover_time_s / 3`` old): per sink and shard, *behind* = now − creation time of the
oldest change in the sink's lane not yet written to it (0 when the sink has everything read so
far), *waiting* = the lane's fill (records / bytes), *not durable* = records given to the sink and
not yet flushed by it (the shard's checkpoint waits for them), *durable* = the sequence number of
the last change the sink made durable. The shard's checkpoint is the lowest *durable* of its sinks.

Shard counts partition the leases: *finished* (checkpoint SHARD_END), *owned* (unfinished, with
an owner) and *free* (unfinished, no owner). *max behind* is over unfinished leases with a
reported lag.

This module never imports boto3: it talks to the store and the sources through their protocols.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence, Union

from pipeline.checkpoint import Lease, LeaseStore, WorkerInfo
from pipeline.events import SENTINELS, SHARD_END
from pipeline.runtime.lanes import decode_lane_status
from pipeline.source import StreamSource

#: a worker is stale when its heartbeat is older than this many failover times
STALE_AFTER_FAILOVER_TIMES = 3


@dataclass(frozen=True)
class SourceUnavailable:
    """A configured stream that could not even be resolved (e.g. DescribeTable failed):
    ``name`` is the table or stream ARN as configured, ``error`` one line."""

    name: str
    error: str


SourceLike = Union[StreamSource, SourceUnavailable]
Sources = Union[Sequence[SourceLike], Callable[[], Sequence[SourceLike]], None]


@dataclass(frozen=True)
class LeaseRow:
    """One lease as status shows it. ``in_stream`` is None when the stream was not described;
    ``owner_state`` is the owner's worker state (live / stale / unannounced), None when free."""

    lease_key: str
    table: str
    stream_arn: str
    shard_id: str
    owner: str | None
    owner_state: str | None
    checkpoint: str
    sub_sequence_number: int
    parent_shard_ids: list[str]
    counter: int
    owner_switches_since_checkpoint: int
    behind_ms: int | None
    finished: bool
    in_stream: bool | None


@dataclass(frozen=True)
class WorkerRow:
    """One worker: its announcement (None fields for an owner that never announced itself),
    ``leases_held`` counted in the lease table, ``leases_announced`` from its last heartbeat."""

    worker_id: str
    host: str | None
    pid: int | None
    started_at: str | None
    heartbeat_at: str | None
    heartbeat_age_s: float | None
    leases_held: int
    leases_announced: int | None
    state: str  # live | stale | unannounced
    live: bool


@dataclass(frozen=True)
class SinkLaneRow:
    """One sink's lane of one shard as a live worker last reported it (see the module doc)."""

    worker_id: str
    sink: str
    table: str
    shard_id: str
    behind_ms: int
    records: int
    bytes: int
    undurable_records: int
    durable_position: str | None
    error: str | None


@dataclass(frozen=True)
class StreamRow:
    """One stream: configured (``described`` True when DescribeStream answered) or only known
    from leases. ``shards_without_lease``: shards DescribeStream lists that have no lease yet."""

    name: str
    table: str | None
    stream_arn: str | None
    described: bool
    shards_in_stream: int | None
    shards_without_lease: list[str]
    error: str | None


@dataclass(frozen=True)
class Summary:
    streams: int
    shards: int
    finished: int
    free: int
    owned: int
    workers: int
    live_workers: int
    max_behind_ms: int | None
    gaps: int = 0


@dataclass(frozen=True)
class StatusReport:
    """Everything ``ddb-cdc status`` shows."""

    generated_at: str
    failover_time_s: float
    stale_after_s: float
    leases: list[LeaseRow]
    workers: list[WorkerRow]
    streams: list[StreamRow]
    summary: Summary = field(compare=False)
    gaps: list[dict] = field(default_factory=list)
    sink_lanes: list[SinkLaneRow] = field(default_factory=list)


# -- gathering ----------------------------------------------------------------------------------


def parse_time(text: str | None) -> datetime | None:
    """ISO 8601 text → aware UTC datetime (naive text is taken as UTC); None if unparseable."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def gather_status(store: LeaseStore, sources: Sources = None, *, failover_time_s: float = 10.0,
                  now: datetime | None = None) -> StatusReport:
    """Read ``store`` (and describe ``sources``) into a :class:`StatusReport`.

    - ``store``: any LeaseStore; only ``list_leases`` and ``list_workers`` are called. Their
      errors (:class:`pipeline.errors.CheckpointStoreError`) propagate: without the lease table
      there is no status.
    - ``sources``: stream sources (``list_shards`` is called once per stream, read-only), or
      :class:`SourceUnavailable` entries for streams that could not be resolved, or a zero-argument
      callable returning them (called only after the store was read, so an unreadable store fails
      fast), or None. A failing DescribeStream is recorded on the stream and its leases show
      ``in_stream`` None; it never fails the status.
    - ``failover_time_s``: ``checkpoints.failover_time_s``; workers whose heartbeat is older than
      3 × this are stale.
    - ``now``: the time to compare heartbeats with (default: UTC now).
    """
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stale_after_s = STALE_AFTER_FAILOVER_TIMES * failover_time_s
    leases: list[Lease] = list(store.list_leases())
    infos: list[WorkerInfo] = list(store.list_workers())
    list_gaps = getattr(store, "list_gaps", None)
    gaps = [dict(g.__dict__) for g in list_gaps()] if list_gaps else []

    # -- streams ------------------------------------------------------------------------------
    shards_by_arn: dict[str, set[str] | None] = {}
    described: list[StreamRow] = []
    unresolved: list[SourceUnavailable] = []
    leased_by_arn: dict[str, set[str]] = {}
    table_of_arn: dict[str, str] = {}
    for lease in leases:
        leased_by_arn.setdefault(lease.stream_arn, set()).add(lease.shard_id)
        table_of_arn.setdefault(lease.stream_arn, lease.table)
    build_error = None
    if callable(sources):
        try:
            sources = list(sources())
        except Exception as exc:  # a source that cannot be built must not hide the lease table
            build_error, sources = _one_line(exc), []
    for source in sources or []:
        if isinstance(source, SourceUnavailable):
            unresolved.append(source)
            continue
        arn = source.stream_arn
        if arn in shards_by_arn:
            continue  # the same stream named twice (by table and by ARN)
        try:
            ids = {shard.shard_id for shard in source.list_shards()}
        except Exception as exc:
            shards_by_arn[arn] = None
            described.append(StreamRow(name=source.table, table=source.table, stream_arn=arn, described=False,
                                       shards_in_stream=None, shards_without_lease=[], error=_one_line(exc)))
            continue
        shards_by_arn[arn] = ids
        described.append(StreamRow(name=source.table, table=source.table, stream_arn=arn, described=True,
                                   shards_in_stream=len(ids),
                                   shards_without_lease=sorted(ids - leased_by_arn.get(arn, set())), error=None))
    streams = list(described)
    for arn in sorted(set(leased_by_arn) - set(shards_by_arn)):
        # known from the lease table only: not configured, an old stream, or not resolved (then
        # the resolution error is shown on it)
        table = table_of_arn[arn]
        match = next((u for u in unresolved if u.name in (table, arn)), None)
        streams.append(StreamRow(name=table, table=table, stream_arn=arn, described=False, shards_in_stream=None,
                                 shards_without_lease=[], error=match.error if match else build_error))
    matched = {row.table for row in streams} | {row.stream_arn for row in streams}
    for u in unresolved:
        if u.name not in matched:
            streams.append(StreamRow(name=u.name, table=None, stream_arn=None, described=False,
                                     shards_in_stream=None, shards_without_lease=[], error=u.error))
    if build_error and not leased_by_arn:
        streams.append(StreamRow(name="(configured streams)", table=None, stream_arn=None, described=False,
                                 shards_in_stream=None, shards_without_lease=[], error=build_error))

    # -- workers ------------------------------------------------------------------------------
    held: dict[str, int] = {}
    for lease in leases:
        if lease.owner:
            held[lease.owner] = held.get(lease.owner, 0) + 1
    workers: list[WorkerRow] = []
    for info in infos:
        beat = parse_time(info.heartbeat_at)
        age = None if beat is None else (now - beat).total_seconds()
        live = age is not None and age <= stale_after_s
        workers.append(WorkerRow(worker_id=info.worker_id, host=info.host, pid=info.pid,
                                 started_at=info.started_at, heartbeat_at=info.heartbeat_at,
                                 heartbeat_age_s=None if age is None else round(age, 3),
                                 leases_held=held.get(info.worker_id, 0), leases_announced=info.leases,
                                 state="live" if live else "stale", live=live))
    announced = {info.worker_id for info in infos}
    for owner in sorted(set(held) - announced):
        workers.append(WorkerRow(worker_id=owner, host=None, pid=None, started_at=None, heartbeat_at=None,
                                 heartbeat_age_s=None, leases_held=held[owner], leases_announced=None,
                                 state="unannounced", live=False))
    state_of = {w.worker_id: w.state for w in workers}
    sink_lanes = []
    for info in infos:
        if state_of.get(info.worker_id) != "live":
            continue
        for lane in decode_lane_status(getattr(info, "sink_lanes", None)):
            sink_lanes.append(SinkLaneRow(worker_id=info.worker_id, sink=lane.sink, table=lane.table,
                                          shard_id=lane.shard_id, behind_ms=int(lane.age_s * 1000),
                                          records=lane.records, bytes=lane.bytes,
                                          undurable_records=lane.undurable_records,
                                          durable_position=lane.durable_position, error=lane.error))
    sink_lanes.sort(key=lambda r: (r.sink, r.table, r.shard_id))

    # -- leases -------------------------------------------------------------------------------
    rows = []
    for lease in sorted(leases, key=lambda le: (le.table, le.stream_arn, le.shard_id)):
        known = shards_by_arn.get(lease.stream_arn)
        rows.append(LeaseRow(
            lease_key=lease.lease_key, table=lease.table, stream_arn=lease.stream_arn, shard_id=lease.shard_id,
            owner=lease.owner, owner_state=state_of.get(lease.owner) if lease.owner else None,
            checkpoint=lease.checkpoint, sub_sequence_number=lease.sub_sequence_number,
            parent_shard_ids=list(lease.parent_shard_ids), counter=lease.counter,
            owner_switches_since_checkpoint=lease.owner_switches_since_checkpoint,
            behind_ms=lease.behind_ms, finished=lease.finished,
            in_stream=None if known is None else lease.shard_id in known))

    finished = sum(1 for r in rows if r.finished)
    owned = sum(1 for r in rows if not r.finished and r.owner)
    lags = [r.behind_ms for r in rows if not r.finished and r.behind_ms is not None]
    # streams: every stream ARN known (leases, described sources) plus configured ones that could
    # not be resolved to an ARN and have no leases
    n_streams = len(set(leased_by_arn) | set(shards_by_arn)) + sum(
        1 for row in streams if row.stream_arn is None and row.name != "(configured streams)")
    summary = Summary(streams=n_streams, shards=len(rows), finished=finished,
                      free=len(rows) - finished - owned, owned=owned, workers=len(workers),
                      live_workers=sum(1 for w in workers if w.live),
                      max_behind_ms=max(lags) if lags else None, gaps=len(gaps))
    return StatusReport(generated_at=now.isoformat(), failover_time_s=failover_time_s,
                        stale_after_s=stale_after_s, leases=rows, workers=workers, streams=streams,
                        summary=summary, gaps=gaps, sink_lanes=sink_lanes)


def status_to_dict(report: StatusReport) -> dict[str, Any]:
    """The report as JSON-ready data. Keys are stable: ``generated_at``, ``failover_time_s``,
    ``stale_after_s``, ``leases``, ``workers``, ``streams``, ``summary``, ``gaps``, ``sink_lanes``
    (each row's keys are the fields of :class:`LeaseRow`, :class:`WorkerRow`, :class:`StreamRow`,
    :class:`Summary`, :class:`SinkLaneRow`)."""
    return asdict(report)


# -- formatting ---------------------------------------------------------------------------------


def format_duration_ms(ms: float | None) -> str:
    """Human-readable duration: ``-`` (unknown), ``0 s``, ``3.2 s``, ``45 s``, ``12 min 5 s``,
    ``1 h 5 min``, ``2 d 3 h``. Negative values (clock skew) show as ``0 s``."""
    if ms is None:
        return "-"
    seconds = max(0.0, ms / 1000.0)
    if seconds < 10:
        text = f"{seconds:.1f}".rstrip("0").rstrip(".")
        return f"{text} s"
    total = int(seconds)
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def short_checkpoint(checkpoint: str, head: int = 4, tail: int = 10) -> str:
    """A sentinel as is; a sequence number longer than ``head + tail + 2`` digits as
    ``head…tail`` (the tail is where successive sequence numbers differ)."""
    if checkpoint in SENTINELS or len(checkpoint) <= head + tail + 2:
        return checkpoint
    return f"{checkpoint[:head]}…{checkpoint[-tail:]}"


def behind_text(row: LeaseRow) -> str:
    """The *behind* column: ``done`` at SHARD_END, else :func:`format_duration_ms`."""
    return "done" if row.checkpoint == SHARD_END else format_duration_ms(row.behind_ms)


def in_stream_text(row: LeaseRow) -> str:
    return "?" if row.in_stream is None else "yes" if row.in_stream else "no"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary_text(summary: Summary) -> str:
    """E.g. ``2 streams, 4 shards (1 finished, 1 free, 2 owned), 1 live worker, max behind 3.2 s``."""
    return (f"{_plural(summary.streams, 'stream')}, {_plural(summary.shards, 'shard')} "
            f"({summary.finished} finished, {summary.free} free, {summary.owned} owned), "
            f"{_plural(summary.live_workers, 'live worker')}, max behind {format_duration_ms(summary.max_behind_ms)}"
            + (f", {_plural(summary.gaps, 'recorded gap')}" if summary.gaps else ""))


def _bytes_text(n: int) -> str:
    """``512 B``, ``3.4 KiB``, ``12.0 MiB``."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def _utc_text(iso: str | None) -> str:
    value = parse_time(iso)
    return "?" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def render_status(report: StatusReport, console: Any = None) -> None:
    """Print ``report`` with rich: leases, workers, summary line, then notes on streams that
    could not be described. ``console``: a ``rich.console.Console`` (default: stdout; wide when
    not a terminal so piped output is not wrapped)."""
    import os

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(highlight=False, width=250)

    labels: dict[str, set[str]] = {}
    for row in report.leases:
        labels.setdefault(row.table, set()).add(row.stream_arn)

    def table_text(row: LeaseRow) -> str:
        if len(labels.get(row.table, ())) > 1:  # a re-created stream: tell the streams apart
            return f"{row.table} ({row.stream_arn.rsplit('/', 1)[-1]})"
        return row.table

    if report.leases:
        leases = Table(title="Leases", box=box.SIMPLE_HEAD, title_justify="left")
        for name, justify in (("table", "left"), ("shard", "left"), ("owner", "left"), ("checkpoint", "left"),
                              ("parent", "left"), ("counter", "right"), ("behind", "right"),
                              ("in stream", "center")):
            leases.add_column(name, justify=justify, no_wrap=True)
        for row in report.leases:
            owner = row.owner or "free"
            if row.owner and row.owner_state in ("stale", "unannounced"):
                owner = f"{row.owner} ({row.owner_state})"
            leases.add_row(*(Text(cell) for cell in (
                table_text(row), row.shard_id, owner, short_checkpoint(row.checkpoint),
                ", ".join(row.parent_shard_ids) or "-", str(row.counter), behind_text(row), in_stream_text(row))))
        console.print(leases)
    else:
        console.print("no leases in the store (has a worker started with this configuration?)")

    if report.workers:
        workers = Table(title="Workers", box=box.SIMPLE_HEAD, title_justify="left",
                        caption=f"stale = no heartbeat for {format_duration_ms(report.stale_after_s * 1000)} "
                                f"(3 × failover_time_s), judged by this host's clock",
                        caption_justify="left")
        for name, justify in (("worker", "left"), ("host", "left"), ("pid", "right"), ("started", "left"),
                              ("heartbeat", "right"), ("leases", "right"), ("state", "left")):
            workers.add_column(name, justify=justify, no_wrap=True)
        for w in report.workers:
            age = "-" if w.heartbeat_age_s is None else f"{format_duration_ms(w.heartbeat_age_s * 1000)} ago"
            announced = "-" if w.leases_announced is None else str(w.leases_announced)
            workers.add_row(*(Text(cell) for cell in (
                w.worker_id, w.host or "-", "-" if w.pid is None else str(w.pid),
                "-" if w.started_at is None else _utc_text(w.started_at), age,
                f"{w.leases_held} (announced {announced})", w.state)))
        console.print(workers)
    else:
        console.print("no workers announced")

    if report.sink_lanes:
        lanes = Table(title="Sink lanes (per sink and shard, at each live worker's last heartbeat)",
                      box=box.SIMPLE_HEAD, title_justify="left",
                      caption="behind = oldest change not yet written to the sink; not durable = given to the "
                              "sink, not flushed yet; a shard's checkpoint is the lowest durable of its sinks",
                      caption_justify="left")
        for name, justify in (("sink", "left"), ("table", "left"), ("shard", "left"), ("behind", "right"),
                              ("waiting", "right"), ("not durable", "right"), ("durable", "left"),
                              ("worker", "left"), ("error", "left")):
            lanes.add_column(name, justify=justify, no_wrap=name != "error")
        for r in report.sink_lanes:
            lanes.add_row(*(Text(cell) for cell in (
                r.sink, r.table, r.shard_id, format_duration_ms(r.behind_ms),
                f"{r.records} rec / {_bytes_text(r.bytes)}", str(r.undurable_records),
                short_checkpoint(r.durable_position) if r.durable_position else "-", r.worker_id, r.error or "")))
        console.print(lanes)

    if report.gaps:
        gaps = Table(title="Recorded gaps (records lost before they were read)", box=box.SIMPLE_HEAD,
                     title_justify="left")
        for name in ("table", "shard", "last checkpoint", "first position after", "detected", "policy", "error"):
            gaps.add_column(name, no_wrap=name != "error")
        for g in report.gaps:
            gaps.add_row(*(Text(str(cell)) for cell in (
                g["table"], g["shard_id"], g["last_checkpoint"], g["first_position_after"] or "-",
                _utc_text(g["detected_at"]), g["policy"], (g["error"] or "")[:120])))
        console.print(gaps)
    console.print(Text(summary_text(report.summary)))
    for stream in report.streams:
        if stream.error:
            console.print(Text(f"note: stream {stream.name} not described ({stream.error}); "
                               "its shards show in stream '?'"))
        elif stream.shards_without_lease:
            console.print(Text(f"note: stream {stream.name} has {_plural(len(stream.shards_without_lease), 'shard')} "
                               f"without a lease yet: {', '.join(stream.shards_without_lease)}"))
