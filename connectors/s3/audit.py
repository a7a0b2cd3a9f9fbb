"""S3 audit log sink: every change event as one typed JSON line, in gzip objects with deterministic keys.

Object layout (one object per upload of one shard's buffer)::

    {prefix}/{table}/dt=YYYY-MM-DD/{shard_id}/{first_seq}-{last_seq}.jsonl.gz

- ``dt`` is the UTC date of the *first* event's ``approximate_creation_time`` (``dt=unknown`` when
  the record carried no ApproximateCreationDateTime); an object whose events cross midnight stays
  under the first event's date.
- ``first_seq`` / ``last_seq`` are the stream sequence numbers of the first and last event in the
  object (decimal strings as DynamoDB gives them, 21–40 digits; compare them as integers, not as
  text).
- The body is ``gzip.compress(lines, compresslevel, mtime=0)``: no timestamp in the gzip header, so
  the same lines give the same bytes (with the same zlib build).
- Each line is :func:`pipeline.render.event_to_json_line`: the whole change event with keys and
  images as DynamoDB AttributeValue JSON — numbers as ``{"N": "<exact decimal text>"}`` strings
  (38 digits survive), string / number / binary sets as ``SS`` / ``NS`` / ``BS`` lists, binary as
  base64 text in ``{"B": ...}``; ``approximate_creation_time`` in ISO 8601 UTC. Lossless:
  :func:`pipeline.render.event_from_record_dict` rebuilds an equal :class:`~pipeline.events.ChangeEvent`.
  When the sink has ``transforms`` (:mod:`pipeline.shaping`), each line also holds
  ``"transforms": [{"type": "redact", "paths": [...], "mode": "hmac", ...}, ...]`` — the
  transforms applied to that line's event, in order (secret-free), so an archive replay knows the
  images are not the stream's own; lines without the field hold the change as the stream gave it.

Idempotency and replays. A retried batch (the fan-out calls ``write`` again after a
``RetriableSinkError``) is not appended twice: events whose sequence number is not above the last
one already buffered for that shard are skipped. Re-uploading the same buffer writes the same key
with the same bytes, so a retried or repeated upload overwrites rather than duplicates. After a
restart, the worker replays from the last checkpoint, and its batches may be cut differently from
the earlier run, so the replayed events can land in objects with *different* keys than before.
The archive is therefore at-least-once: one sequence number can appear in more than one object,
always with identical content (the event is decoded from the same stream record). Readers that
need each change once should deduplicate by ``(source.shard_id, source.sequence_number)``.

Snapshot objects (``ddb-cdc snapshot``, ``source.initial_snapshot``) have their own layout::

    {prefix}/{table}/snapshot={snapshot_id}/seg{NNNNN}/{first_ordinal}-{last_ordinal}.jsonl.gz

one folder per snapshot, one per segment; the numbers are the items' 20-digit ordinals in their
segment (:mod:`pipeline.snapshot.items`), the lines SNAPSHOT events (``op`` ``r``) in the same
typed JSON. A snapshot that is not resumed writes each item it read once.

Object metadata (S3 user metadata, ``x-amz-meta-*``): ``records`` (number of lines),
``first-sequence-number``, ``last-sequence-number``, and ``parent-shard-ids`` — the shard's parent
shard ids, comma-joined, taken from ``batch.extra["parent_shard_ids"]`` of the batches written to
that shard (empty when the batches did not carry it). The archive replay
(:mod:`connectors.s3.archive`) reads it to deliver parents before children.

Ownership periods. Each object holds the events of *one* reader of the shard, so its range
``first_seq``..``last_seq`` holds every record that reader read in between (nothing in between was
skipped, except records a recorded trimmed-data gap lost or, in a windowed replay, records outside
the window). When a new reader of the shard starts (this worker took the shard's lease, took it back
after losing it, applied a checkpoint move, restarted the shard), the worker calls
:meth:`S3AuditSink.reset_shard` first, and the shard's unflushed buffer is dropped: those events lie
after the checkpoint, so they are re-read, or were archived by the worker whose checkpoint passed
them. Still, the archive replay does not rely on ranges: it de-duplicates per event (see
:mod:`pipeline.replay.archive`), so objects may overlap, nest, repeat or have holes — e.g. a redriven
dead letter is its own one-event object ``103-103`` inside ``100-105``.

Durability: nothing is durable until uploaded. The worker calls :meth:`S3AuditSink.flush` before
every checkpoint, and ``flush`` uploads every non-empty buffer; a crash before that loses only
events whose checkpoint has not moved, which the next run replays.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

import orjson
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from pydantic import Field, field_validator

from connectors.aws import make_client
from pipeline.awsconfig import AwsConfig
from pipeline.errors import FatalSinkError, RetriableSinkError, SinkError
from pipeline.events import Batch, ChangeEvent, sequence_key
from pipeline.render import event_to_json_line, event_to_record_dict
from pipeline.s3_sse import S3Encryption
from pipeline.snapshot.items import parse_snapshot_shard_id
from pipeline.sink import Sink, SinkContext, SinkOptions

#: Content type of the uploaded objects (the body is gzip bytes; no Content-Encoding is set, so
#: HTTP clients hand back the compressed bytes as stored).
CONTENT_TYPE = "application/gzip"
OBJECT_SUFFIX = ".jsonl.gz"

#: S3 error codes worth retrying (S3 API reference, "Error responses": SlowDown / 503,
#: InternalError / 500, ServiceUnavailable / 503, RequestTimeout / 400, OperationAborted / 409
#: "a conflicting conditional operation is in progress … try again"). Any 5xx or 429 also counts.
_RETRIABLE_CODES = frozenset({
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
})


class S3AuditOptions(SinkOptions, S3Encryption):
    """Options of the ``s3_audit`` sink (``sinks[].options``).

    - ``bucket``: bucket name (required; just the name — put any path in ``prefix``).
    - ``prefix``: key prefix, default ``"ddb-cdc"``; leading/trailing ``/`` are dropped, ``""``
      puts objects at ``{table}/...``.
    - ``endpoint_url``: S3 endpoint (LocalStack, moto, MinIO); overrides the worker's ``aws``
      settings (``s3_endpoint_url`` / ``endpoint_url``).
    - ``region``: overrides the worker's ``aws.region`` for this sink only.
    - ``max_buffer_bytes``: upload a shard's buffer once it holds this many *uncompressed* bytes
      of JSON lines (default 8 MiB = 8,388,608). Checked after each batch, so an object can be
      larger by up to one batch.
    - ``max_buffer_age_s``: upload a shard's buffer once its first line is this many seconds old
      (default 60). Checked when that shard's next batch arrives (there is no timer thread);
      the worker's flush before every checkpoint bounds the age anyway.
    - ``sse`` / ``kms_key_id``: server-side encryption of each object, the model shared with the
      S3 dead-letter destination (:class:`pipeline.s3_sse.S3Encryption`: ``None``/``"none"``,
      ``"AES256"`` or ``"aws:kms"``, a key only with ``aws:kms``).
    - ``compress_level``: gzip level 0–9 (default 1: on the benchmark's audit lines level 1 costs
      a third of level 6's CPU for objects 19 % larger — 26.6 % of the JSON instead of 22.3 %; see
      BENCHMARKS.md, issue 16. Use 6 to trade CPU for storage).
    """

    bucket: str = Field(min_length=1)
    prefix: str = "ddb-cdc"
    endpoint_url: str | None = None
    region: str | None = None
    max_buffer_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_buffer_age_s: float = Field(default=60.0, gt=0)
    compress_level: int = Field(default=1, ge=0, le=9)

    @field_validator("bucket")
    @classmethod
    def _plain_bucket_name(cls, value: str) -> str:
        if value.startswith("s3://") or "/" in value:
            raise ValueError(
                f"bucket must be a bucket name only, got {value!r}: put the path part in 'prefix'"
            )
        return value

    @field_validator("prefix")
    @classmethod
    def _strip_slashes(cls, value: str) -> str:
        return value.strip("/")



def audit_object_key(prefix: str, table: str, shard_id: str, first_seq: str, last_seq: str,
                     first_created: datetime | None) -> str:
    """The deterministic object key for one shard's events ``first_seq``..``last_seq``.

    ``{prefix}/{table}/dt=YYYY-MM-DD/{shard_id}/{first_seq}-{last_seq}.jsonl.gz``, the date being
    ``first_created`` in UTC, or ``unknown`` when it is None. An empty ``prefix`` leaves out the
    leading part. Snapshot events (shard id ``snapshot-{id}-seg{NNNNN}``) go to
    ``{prefix}/{table}/snapshot={id}/seg{NNNNN}/{first_ordinal}-{last_ordinal}.jsonl.gz``.
    """
    snapshot = parse_snapshot_shard_id(shard_id)
    if snapshot is not None:  # a snapshot segment: its own objects (see the module doc)
        name = f"{table}/snapshot={snapshot[0]}/seg{snapshot[1]:05d}/{first_seq}-{last_seq}{OBJECT_SUFFIX}"
        prefix = prefix.strip("/")
        return f"{prefix}/{name}" if prefix else name
    if first_created is None:
        day = "unknown"
    else:
        created = first_created if first_created.tzinfo else first_created.replace(tzinfo=timezone.utc)
        day = created.astimezone(timezone.utc).strftime("%Y-%m-%d")
    name = f"{table}/dt={day}/{shard_id}/{first_seq}-{last_seq}{OBJECT_SUFFIX}"
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def read_audit_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Yield every audit line under ``prefix`` as a dict (see :func:`pipeline.render.event_to_record_dict`).

    ``client`` is a boto3 S3 client. Objects are read in S3's listing order (keys in UTF-8
    binary order — ListObjectsV2), lines in their order inside each object; only keys ending in
    ``.jsonl.gz`` are read. ``prefix`` is passed to S3 as is (``"ddb-cdc/"`` to stay inside one
    folder). Lines are not deduplicated: after a replay one sequence number can appear in two
    objects (see the module doc). Rebuild events with
    :func:`pipeline.render.event_from_record_dict`.

    Raises botocore's ClientError / BotoCoreError as boto3 does (this is a reading helper, not
    part of the sink's delivery path).
    """
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", ()):
            key = entry["Key"]
            if not key.endswith(OBJECT_SUFFIX):
                continue
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for line in gzip.decompress(body).splitlines():
                if line.strip():
                    yield orjson.loads(line)


@dataclass
class _ShardBuffer:
    """Lines waiting for upload for one (table, shard). Guarded by ``lock``."""

    table: str
    shard_id: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    first_seq: str | None = None
    last_seq: str | None = None
    first_created: datetime | None = None
    started_at: float = 0.0  # time.monotonic() of the first line
    parent_shard_ids: tuple[str, ...] = ()  # from batch.extra; kept across uploads (a shard's parents never change)
    retired: bool = False  # removed from the sink's map; writers must fetch a fresh buffer

    def append(self, event: ChangeEvent, transforms: Any = None) -> None:
        if transforms:  # the sink's shaping transformed it: say how, so a replay knows what it holds
            line = orjson.dumps({**event_to_record_dict(event), "transforms": transforms},
                                option=orjson.OPT_APPEND_NEWLINE)
        else:
            line = event_to_json_line(event)
        if not self.lines:
            self.first_seq = event.sequence_number
            self.first_created = event.source.approximate_creation_time
            self.started_at = time.monotonic()
        self.lines.append(line)
        self.size += len(line)
        self.last_seq = event.sequence_number

    def clear(self) -> None:
        self.lines = []
        self.size = 0
        self.first_seq = self.last_seq = None
        self.first_created = None
        self.started_at = 0.0


class S3AuditSink(Sink):
    """Archive every change event as a typed JSON line in gzip objects on S3 (see the module doc).

    Per shard (``batch.shard_id``, together with ``batch.table``) the sink keeps one in-memory
    buffer of lines. ``write`` appends a batch and uploads the buffer when it reaches
    ``max_buffer_bytes`` (uncompressed) or is older than ``max_buffer_age_s``; ``flush`` uploads
    every non-empty buffer and returns only when all are stored. ``write`` and ``flush`` may run
    on different shard threads; a lock per buffer (and one for the buffer map) keeps them apart.

    Errors:

    - ``open``: ``FatalSinkError`` when HeadBucket fails (missing bucket, no access, endpoint not
      reachable). HeadBucket needs the ``s3:ListBucket`` permission (S3 API reference,
      HeadBucket); uploads need ``s3:PutObject`` (plus ``kms:GenerateDataKey`` for SSE-KMS).
    - upload (``write`` / ``flush``): ``RetriableSinkError`` for throttling (SlowDown, 429), 5xx,
      timeouts and connection errors — the buffer is kept, so the retry uploads it again;
      ``FatalSinkError`` for every other S3 error (AccessDenied, NoSuchBucket, KMS key problems,
      invalid arguments) and for missing credentials. botocore already retries throttling and 5xx
      inside each call (``standard`` retry mode, see :mod:`connectors.aws`).
    """

    Options = S3AuditOptions
    renders_wire_form = True  # lines from ChangeEvent.typed_json_parts: nothing decoded
    options: S3AuditOptions

    def __init__(self, name: str, options: S3AuditOptions | None = None):
        super().__init__(name, options)  # options=None → S3AuditOptions() → "bucket: Field required"
        self._client: Any = None
        self._lock = threading.Lock()
        self._buffers: dict[tuple[str, str], _ShardBuffer] = {}
        self.uploads = 0  # objects put so far (for metrics and tests)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self, context: SinkContext) -> None:
        """Build the S3 client and check the bucket with HeadBucket.

        Credentials, retries and timeouts come from ``context.aws`` (an AwsConfig; defaults when
        None) with ``options.region`` / ``options.endpoint_url`` taking precedence.
        Raises FatalSinkError (one line) when the bucket cannot be used.
        """
        super().open(context)
        aws = context.aws if context is not None and context.aws is not None else AwsConfig()
        if self.options.region:
            aws = aws.model_copy(update={"region": self.options.region})
        try:
            self._client = make_client("s3", aws, endpoint_url=self.options.endpoint_url)
        except (BotoCoreError, ValueError) as exc:
            raise FatalSinkError(
                f"sink {self.name!r}: cannot create an S3 client ({type(exc).__name__}: {exc}): "
                "fix the aws settings or sinks[].options.endpoint_url/region"
            ) from None
        bucket = self.options.bucket
        try:
            self._client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            raise FatalSinkError(
                f"S3 bucket {bucket!r} not found or not accessible at endpoint {self._endpoint()} "
                f"({_client_error_text(exc)}): create it or fix sinks[].options.bucket"
            ) from None
        except BotoCoreError as exc:
            raise FatalSinkError(
                f"S3 bucket {bucket!r} cannot be checked at endpoint {self._endpoint()} "
                f"({type(exc).__name__}: {exc}): start S3 or fix sinks[].options.endpoint_url "
                "and the aws credentials"
            ) from None

    def close(self) -> None:
        """Close the client. Buffers not flushed are dropped (their checkpoint has not moved)."""
        with self._lock:
            pending = sum(len(b.lines) for b in self._buffers.values())
        if pending and self.context is not None and self.context.logger is not None:
            try:
                self.context.logger.warning("s3_audit.close_with_unflushed_events", sink=self.name,
                                            events=pending)
            except TypeError:  # a stdlib logger does not take keyword fields
                self.context.logger.warning("s3_audit: closing with %d unflushed events", pending)
        if self._client is not None and hasattr(self._client, "close"):
            self._client.close()
        self._client = None

    # -- delivery --------------------------------------------------------------------------

    def write(self, batch: Batch) -> None:
        """Append the batch's events to the shard's buffer; upload it when it is big or old enough.

        Events at or below the buffer's last sequence number are skipped (a retried batch).
        Raises RetriableSinkError / FatalSinkError from an upload (the buffer is kept).
        """
        if not batch.events:
            return
        key = (batch.table, batch.shard_id)
        buf = self._locked_buffer(key)
        try:
            parents = batch.extra.get("parent_shard_ids") if batch.extra else None
            transforms = batch.extra.get("transforms") if batch.extra else None
            if parents:
                buf.parent_shard_ids = tuple(str(p) for p in parents)
            for event in batch.events:
                if buf.last_seq is not None and sequence_key(event.sequence_number) <= sequence_key(buf.last_seq):
                    continue
                buf.append(event, transforms)
            if buf.lines and (
                buf.size >= self.options.max_buffer_bytes
                or time.monotonic() - buf.started_at >= self.options.max_buffer_age_s
            ):
                self._upload(buf)
        finally:
            buf.lock.release()

    def flush(self) -> None:
        """Upload every non-empty buffer; return only when all are stored.

        Every buffer is tried even if one fails; then the most severe error is raised
        (FatalSinkError before RetriableSinkError), and the failed buffers are kept for the retry.
        """
        with self._lock:
            items = list(self._buffers.items())
        errors: list[SinkError] = []
        for key, buf in items:
            with buf.lock:
                if buf.retired:
                    continue
                if buf.lines:
                    try:
                        self._upload(buf)
                    except SinkError as exc:
                        errors.append(exc)
                        continue
                with self._lock:  # drop empty buffers so finished shards do not pile up
                    if self._buffers.get(key) is buf:
                        del self._buffers[key]
                    buf.retired = True
        if errors:
            fatal = [e for e in errors if isinstance(e, FatalSinkError)]
            raise (fatal or errors)[0]

    def discard_unflushed(self) -> None:
        """Drop every buffer not uploaded yet, all shards (the sink contract's optional hook,
        :mod:`pipeline.sink`): the fan-out calls it after it dead-lettered those events because
        flushes kept failing (``on_failure: dead_letter``). The buffers are retired as after an
        upload, so nothing of them is uploaded later and a redriven or re-read event starts a
        fresh buffer instead of being skipped as already buffered. Never raises."""
        with self._lock:
            items = list(self._buffers.items())
        dropped = 0
        for key, buf in items:
            with buf.lock:
                if buf.retired:
                    continue
                dropped += len(buf.lines)
                buf.clear()
                with self._lock:
                    if self._buffers.get(key) is buf:
                        del self._buffers[key]
                    buf.retired = True
        if dropped and self.context is not None and self.context.logger is not None:
            try:
                self.context.logger.warning("s3_audit.buffers_discarded", sink=self.name, events=dropped)
            except TypeError:  # a stdlib logger does not take keyword fields
                self.context.logger.warning("s3_audit: discarded %d unflushed events", dropped)

    def reset_shard(self, table: str, shard_id: str) -> None:
        """A new reader of the shard starts from its checkpoint (lease taken or taken back, a
        checkpoint move, a restart), or this worker's reader of it ended (lease lost, SHARD_END,
        shutdown; :mod:`pipeline.sink`): drop the shard's buffered, not yet uploaded events, and
        log how many (``s3_audit.shard_reset``; nothing is left after a clean end).

        Why dropping is safe: the worker checkpoints only after ``flush`` uploaded every buffer,
        so no checkpoint of this worker passed a buffered event; if another worker's checkpoint
        passed it, that worker uploaded it first (the archive holds it); otherwise the new reader
        reads it again. Why it is needed: the buffer would otherwise join the events of the earlier
        ownership period with those read after the new checkpoint — one object spanning a hole
        (e.g. ``100-120`` without ``106``..``110``, which another worker archived). The shard's
        parents are kept (they never change).
        """
        with self._lock:
            buf = self._buffers.get((table, shard_id))
        if buf is None:
            return
        with buf.lock:
            dropped = len(buf.lines)
            first, last = buf.first_seq, buf.last_seq
            buf.clear()
        if dropped and self.context is not None and self.context.logger is not None:
            try:
                self.context.logger.info("s3_audit.shard_reset", sink=self.name, table=table, shard_id=shard_id,
                                         dropped_events=dropped, first_sequence_number=first,
                                         last_sequence_number=last)
            except TypeError:  # a stdlib logger does not take keyword fields
                self.context.logger.info("s3_audit: shard %s reset, %d unflushed events dropped", shard_id, dropped)

    def pending_events(self) -> int:
        """Number of events buffered and not yet uploaded (all shards)."""
        with self._lock:
            return sum(len(b.lines) for b in self._buffers.values())

    # -- internals -------------------------------------------------------------------------

    def _locked_buffer(self, key: tuple[str, str]) -> _ShardBuffer:
        """The shard's live buffer, with its lock held by the caller."""
        while True:
            with self._lock:
                buf = self._buffers.get(key)
                if buf is None:
                    buf = self._buffers[key] = _ShardBuffer(table=key[0], shard_id=key[1])
            buf.lock.acquire()
            if not buf.retired:
                return buf
            buf.lock.release()

    def _upload(self, buf: _ShardBuffer) -> None:
        """Put one buffer as one object (caller holds ``buf.lock``); clear it on success."""
        if self._client is None:
            raise FatalSinkError(f"sink {self.name!r}: write/flush before open()")
        assert buf.first_seq is not None and buf.last_seq is not None
        key = audit_object_key(self.options.prefix, buf.table, buf.shard_id, buf.first_seq,
                               buf.last_seq, buf.first_created)
        body = gzip.compress(b"".join(buf.lines), compresslevel=self.options.compress_level, mtime=0)
        params: dict[str, Any] = {
            "Bucket": self.options.bucket,
            "Key": key,
            "Body": body,
            "ContentType": CONTENT_TYPE,
            "Metadata": {
                "records": str(len(buf.lines)),
                "first-sequence-number": buf.first_seq,
                "last-sequence-number": buf.last_seq,
                "parent-shard-ids": ",".join(buf.parent_shard_ids),
            },
        }
        params.update(self.options.sse_put_params())
        try:
            self._client.put_object(**params)
        except ClientError as exc:
            raise self._classify(exc, key) from exc
        except BotoCoreError as exc:
            raise self._classify(exc, key) from exc
        buf.clear()
        self.uploads += 1

    def _classify(self, exc: Exception, key: str) -> SinkError:
        where = f"s3://{self.options.bucket}/{key} at {self._endpoint()}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            text = _client_error_text(exc)
            if code in _RETRIABLE_CODES or status == 429 or status >= 500:
                return RetriableSinkError(f"upload of {where} failed, will retry: {text}")
            return FatalSinkError(
                f"upload of {where} refused ({text}): check the bucket, its permissions "
                "(s3:PutObject) and sinks[].options.sse/kms_key_id"
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError,
                            NoRegionError)):
            return FatalSinkError(f"upload of {where} impossible ({type(exc).__name__}: {exc}): "
                                  "fix the aws credentials/region")
        # connection errors, timeouts (BotoConnectionError, HTTPClientError) and anything else
        # botocore raises on the way are transient as far as we can tell
        return RetriableSinkError(f"upload of {where} failed, will retry: {type(exc).__name__}: {exc}")

    def _endpoint(self) -> str:
        client = self._client
        return getattr(getattr(client, "meta", None), "endpoint_url", None) or "(AWS default)"


def _client_error_text(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = error.get("Code") or "?"
    message = error.get("Message") or ""
    text = f"{code}" + (f" / HTTP {status}" if status else "")
    return f"{text}: {message}" if message and message != code else text
