"""Replay from the S3 audit archive, the S3 side: parse ``s3://bucket/prefix``, list the audit
objects, read shard parents from object metadata, stream objects, deliver through the fan-out.

The ordering, de-duplication, window and counting rules are in :mod:`pipeline.replay.archive`;
the object layout in :mod:`connectors.s3.audit`.

Listing is by ``/``-delimited levels, so skipped tables and day partitions are never listed key
by key: ``{prefix}/`` → tables (or only the ``--table`` ones), ``{prefix}/{table}/`` → ``dt=…``
partitions (skipped when they cannot hold events of the window, see
:func:`pipeline.replay.archive.day_may_hold`), then every key of each kept partition. Objects are
streamed (a gzip stream over the GetObject body), one shard at a time, and merged by sequence
number: an object is opened only when the merge reaches its first sequence number and closed at its
end, so memory holds the decompression buffers of the objects whose ranges overlap at the current
position (usually one) and one batch, never the archive. De-duplication is per event; see
:mod:`pipeline.replay.archive`.

Permissions: ``s3:ListBucket`` on the bucket and ``s3:GetObject`` on the objects (plus
``kms:Decrypt`` for SSE-KMS objects).
"""

from __future__ import annotations

import gzip
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Iterator, Sequence

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws import make_client
from connectors.app.wiring import build_dead_letter
from pipeline.config import Settings
from pipeline.replay.archive import (
    ArchiveError,
    ArchiveObject,
    ArchiveShard,
    day_may_hold,
    group_objects,
    normalize_window,
    order_shards,
    parse_object_key,
    partition_day,
    replay_archive,
)
from pipeline.errors import ConfigError
from pipeline.runtime.fanout import FailurePolicy, FanOut, SinkRunner
from pipeline.replay.report import ReplayReport
from pipeline.runtime.sink_lifecycle import opened_sinks

#: Object metadata key (``x-amz-meta-parent-shard-ids``) written by the s3_audit sink.
PARENTS_METADATA_KEY = "parent-shard-ids"


def parse_archive_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → ``(bucket, prefix)``, the prefix without leading/trailing ``/``
    (``""`` for ``s3://bucket``). Raises ConfigError (one line) for anything else."""
    text = (uri or "").strip()
    if not text.startswith("s3://"):
        raise ConfigError([f"--from-archive {uri!r} is not an S3 URI: use s3://bucket/prefix"])
    bucket, _, prefix = text[5:].partition("/")
    if not bucket or any(c.isspace() or c in "?#\\" for c in bucket):
        raise ConfigError([f"--from-archive {uri!r} has no valid bucket name: use s3://bucket/prefix"])
    return bucket, prefix.strip("/")


def archive_client(settings: Settings, bucket: str) -> Any:
    """An S3 client for the archive: the ``aws`` settings' S3 endpoint (``aws.s3_endpoint_url``,
    else ``aws.endpoint_url``) and region, as the s3_audit sink picks them; when an ``s3_audit``
    sink in ``settings`` writes to the same bucket, its ``endpoint_url`` / ``region`` options win,
    as they do for that sink."""
    aws = settings.aws
    endpoint = None
    for cfg in settings.sinks:
        if cfg.type == "s3_audit" and cfg.options.get("bucket") == bucket:
            endpoint = cfg.options.get("endpoint_url") or None
            if cfg.options.get("region"):
                aws = aws.model_copy(update={"region": cfg.options["region"]})
            break
    try:
        return make_client("s3", aws, endpoint_url=endpoint)
    except (BotoCoreError, ValueError) as exc:
        raise ArchiveError(f"cannot create an S3 client ({type(exc).__name__}: {exc}): fix the aws settings") from None


def _endpoint(client: Any) -> str:
    return getattr(getattr(client, "meta", None), "endpoint_url", None) or "(AWS default)"


def _s3_error(exc: Exception, what: str, client: Any) -> ArchiveError:
    """One-line ArchiveError for a botocore error during ``what``."""
    where = f"at endpoint {_endpoint(client)}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or "?"
        message = error.get("Message") or ""
        hint = {"NoSuchBucket": "check the bucket in --from-archive",
                "AccessDenied": "the credentials need s3:ListBucket and s3:GetObject",
                "NoSuchKey": "the object vanished while replaying; run the replay again"}.get(
            code, "check the URI, aws.s3_endpoint_url and the credentials")
        return ArchiveError(f"{what} {where} failed ({code}{': ' + message if message and message != code else ''}): "
                            f"{hint}")
    return ArchiveError(f"{what} {where} failed ({type(exc).__name__}: {exc}): "
                        "check aws.s3_endpoint_url / the network and the credentials")


def _common_prefixes(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for entry in page.get("CommonPrefixes", ()):
            yield entry["Prefix"]


@dataclass
class ArchiveListing:
    """What :func:`list_archive` found: ``objects`` (audit objects in kept partitions),
    ``skipped_partitions`` (``table/dt=…`` names left out by the window), ``ignored_keys``
    (keys in kept partitions that are not audit objects) and ``problems`` (one line each, e.g. a
    ``--table`` with nothing archived)."""

    objects: list[ArchiveObject] = field(default_factory=list)
    skipped_partitions: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def list_archive(client: Any, bucket: str, prefix: str, *, tables: Sequence[str] | None = None,
                 since: datetime | None = None, until: datetime | None = None) -> ArchiveListing:
    """List the audit objects under ``s3://bucket/prefix`` (see the module doc).

    ``tables``: only these (default: every table folder under the prefix). ``since`` / ``until``:
    day partitions that cannot hold events of the window are skipped. Raises ArchiveError when S3
    cannot be listed.
    """
    base = f"{prefix}/" if prefix else ""
    uri = f"s3://{bucket}/{prefix}"
    listing = ArchiveListing()
    try:
        names = list(dict.fromkeys(tables)) if tables else [
            p[len(base):].rstrip("/") for p in _common_prefixes(client, bucket, base)]
        if not names:
            listing.problems.append(f"no table folders under {uri}: is this the s3_audit sink's bucket and prefix?")
        for table in names:
            partitions = list(_common_prefixes(client, bucket, f"{base}{table}/"))
            if not partitions:
                listing.problems.append(f"nothing archived for table {table!r} under {uri}")
                continue
            for partition in partitions:
                name = partition[len(base) + len(table) + 1:].rstrip("/")
                try:
                    day = None if name.startswith("snapshot=") else partition_day(name)  # snapshot: always read
                except ValueError:
                    listing.ignored_keys.append(partition)
                    continue
                if not day_may_hold(day, since, until):
                    listing.skipped_partitions.append(f"{table}/{name}")
                    continue
                paginator = client.get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=bucket, Prefix=partition):
                    for entry in page.get("Contents", ()):
                        obj = parse_object_key(entry["Key"], prefix)
                        if obj is None or obj.table != table:
                            listing.ignored_keys.append(entry["Key"])
                            continue
                        listing.objects.append(replace(obj, size=int(entry.get("Size", 0))))
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(exc, f"listing {uri}", client) from None
    return listing


def read_shard_parents(client: Any, bucket: str, shard: ArchiveShard) -> tuple[str, ...]:
    """The shard's parent shard ids from the ``parent-shard-ids`` metadata of its first object
    (HeadObject), or of its last one when the first has none (objects written before the
    consumer passed parents). Raises ArchiveError when HeadObject fails."""
    candidates = [shard.objects[0]] + ([shard.objects[-1]] if len(shard.objects) > 1 else [])
    for obj in candidates:
        try:
            head = client.head_object(Bucket=bucket, Key=obj.key)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, f"reading the metadata of s3://{bucket}/{obj.key}", client) from None
        value = (head.get("Metadata") or {}).get(PARENTS_METADATA_KEY, "")
        parents = tuple(p.strip() for p in value.split(",") if p.strip())
        if parents:
            return parents
    return ()


def iter_object_records(client: Any, bucket: str, obj: ArchiveObject) -> Iterator[dict[str, Any]]:
    """The object's JSON lines as dicts, decompressed as they stream in (GetObject).

    Raises ArchiveError when S3 fails or the object is not gzip JSON lines.
    """
    where = f"s3://{bucket}/{obj.key}"
    try:
        body = client.get_object(Bucket=bucket, Key=obj.key)["Body"]
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(exc, f"reading {where}", client) from None
    lines = 0  # lines parsed so far
    try:
        with gzip.GzipFile(fileobj=body, mode="rb") as stream:
            for line in stream:
                if line.strip():
                    record = orjson.loads(line)
                    lines += 1
                    yield record
    except (OSError, EOFError, zlib.error, orjson.JSONDecodeError) as exc:
        raise ArchiveError(f"{where}: not a gzip JSON-lines audit object after {lines} line(s) "
                           f"({type(exc).__name__}: {exc})") from None
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(exc, f"reading {where}", client) from None
    finally:
        body.close()


def run_archive_replay(settings: Settings, uri: str, *, sinks: Sequence[Any], since: datetime | None = None,
                       until: datetime | None = None, tables: Sequence[str] | None = None,
                       dry_run: bool = False, logger: Any, console: Any = None, progress: bool = True,
                       stop_event: threading.Event | None = None) -> ReplayReport:
    """Re-deliver the archived changes under ``uri`` (``s3://bucket/prefix``, the s3_audit sink's
    bucket and prefix) to ``sinks``, in per-item order, and return the report.

    - ``sinks``: sink instances, not yet opened (e.g. from :func:`pipeline.registry.build_sinks`);
      opened here with a :class:`SinkContext` (``settings.aws``, the dead-letter destination of
      ``settings``), delivered to through :class:`FanOut` with each sink's failure policy from
      ``settings.sinks`` (defaults for a sink not named there), flushed, closed at the end.
    - ``since`` / ``until``: inclusive window on the events' creation time (naive = UTC); None = open.
    - ``tables``: only these tables' folders (default all).
    - ``dry_run``: list, read and count; open and send nothing.
    - ``logger``: structlog logger; ``console``: rich console for the progress bar (default stderr);
      ``progress``: show it; ``stop_event``: set it to stop between batches.

    The report (``mode="archive"``) has a row per archived shard (``ended="archive_end"`` when all
    its objects were read and delivered durably), ``dead_lettered`` = events the fan-out
    dead-lettered during this replay, ``problems`` (e.g. a ``--table`` with nothing archived).

    Raises ConfigError (bad URI, ``since`` after ``until``), ArchiveError (the archive cannot be
    listed, or a shard's metadata read), FatalSinkError (a sink cannot open). Errors while
    replaying do not raise: they end shards ``failed`` in the report.
    """
    started = time.monotonic()
    bucket, prefix = parse_archive_uri(uri)
    since, until = normalize_window(since, until)
    replay_id = uuid.uuid4().hex[:12]
    log = logger.bind(replay_id=replay_id, archive=f"s3://{bucket}/{prefix}")
    client = archive_client(settings, bucket)
    try:
        listing = list_archive(client, bucket, prefix, tables=tables, since=since, until=until)
        shards = group_objects(listing.objects)
        for shard in shards:
            shard.parent_shard_ids = read_shard_parents(client, bucket, shard)
        ordered = order_shards(shards)
        log.info("archive_replay_started", shards=len(ordered), objects=len(listing.objects),
                 skipped_partitions=len(listing.skipped_partitions), ignored_keys=len(listing.ignored_keys),
                 since=since.isoformat() if since else None, until=until.isoformat() if until else None,
                 sinks=[s.name for s in sinks], dry_run=dry_run)

        def read(obj: ArchiveObject) -> Iterator[dict[str, Any]]:
            return iter_object_records(client, bucket, obj)

        common = dict(read_object=read, since=since, until=until, dry_run=dry_run,
                      sink_names=[s.name for s in sinks], logger=log, console=console, progress=progress,
                      stop_event=stop_event)
        if dry_run:
            report = replay_archive(ordered, deliver=None, flush=None, **common)
        else:
            dead_letter = build_dead_letter(settings)
            configs = {c.name: c for c in settings.sinks}
            with opened_sinks(sinks, worker_id=f"archive-replay:{replay_id}", logger=log, aws=settings.aws,
                              dead_letter=dead_letter) as opened:
                runners = [SinkRunner(sink, FailurePolicy.from_config(configs.get(sink.name))) for sink in opened]
                fanout = FanOut(runners, dead_letter, stop_event=stop_event or threading.Event(), logger=log)
                report = replay_archive(ordered, deliver=fanout.deliver, flush=fanout.flush, **common)
            report.dead_lettered = sum(r.stats.dead_lettered for r in runners)
    finally:
        if hasattr(client, "close"):
            client.close()
    report.replay_id = replay_id
    report.problems[:0] = listing.problems
    report.elapsed_s = time.monotonic() - started
    log.info("archive_replay_finished", delivered=report.delivered, dead_lettered=report.dead_lettered,
             ok=report.ok, elapsed_s=round(report.elapsed_s, 3))
    return report
