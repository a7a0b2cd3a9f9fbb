"""The export reader of a snapshot: a DynamoDB table export to S3 in the DYNAMODB_JSON format.

Layout (DynamoDB developer guide, "DynamoDB table export output format")::

    s3://bucket/export-prefix/AWSDynamoDB/ExportId/manifest-summary.json
    s3://bucket/export-prefix/AWSDynamoDB/ExportId/manifest-files.json
    s3://bucket/export-prefix/AWSDynamoDB/ExportId/data/<name>.json.gz

- ``manifest-summary.json``: one JSON object; used here: ``exportTime`` (the point in time the
  export reflects — it sets the snapshot's T0 and so its version), ``tableArn`` (the table
  name), ``itemCount``, ``outputFormat`` (must be ``DYNAMODB_JSON``), ``manifestFilesS3Key``;
- ``manifest-files.json``: JSON lines, one per data file, with ``dataFileS3Key`` (the key in the
  bucket) and ``itemCount``;
- each data file: gzip, one ``{"Item": {<AttributeValue map>}}`` per line (B as base64 text).

Each data file is one segment; a segment's position is ``{"line": n}`` (lines read so far), so a
resumed snapshot skips what the sinks already have. A data file is read as a stream (one gzip
window in memory), kept open between pages. Permissions: ``s3:GetObject`` on the export's
objects, ``dynamodb:DescribeTable`` for the key schema (or the table must exist).
"""

from __future__ import annotations

import gzip
import threading
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws import make_client
from connectors.snapshot.scan import describe_table
from pipeline.errors import ConfigError, SnapshotError, SnapshotThrottledError
from pipeline.snapshot.runner import Page

#: Lines per page read from a data file.
EXPORT_PAGE_LINES = 1000


def parse_export_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix/AWSDynamoDB/EXPORT_ID/`` → (bucket, key prefix ending in ``/``).
    Raises ConfigError for another form."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc or "/AWSDynamoDB/" not in f"/{parsed.path.strip('/')}/":
        raise ConfigError([f"--from-export {uri!r}: use s3://bucket/prefix/AWSDynamoDB/EXPORT_ID/ "
                           "(the folder holding manifest-summary.json)"])
    return parsed.netloc, parsed.path.strip("/") + "/"


def _s3_text(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


class ExportReader:
    """:class:`pipeline.snapshot.runner.SegmentReader` over an export's data files (see the module doc).

    ``client``: boto3 ``s3`` client; ``files``: the data file keys (segment n = ``files[n]``);
    ``key_names``: the table's key attribute names."""

    def __init__(self, client: Any, bucket: str, files: list[str], *, key_names: tuple[str, ...],
                 item_count: int | None = None):
        self.client = client
        self.bucket = bucket
        self.files = files
        self.key_names = key_names
        self.segments = len(files)
        self.item_count = item_count
        self._open: dict[int, tuple[Any, int]] = {}
        self._lock = threading.Lock()

    def _stream(self, segment: int, line: int) -> Any:
        with self._lock:
            cached = self._open.pop(segment, None)
        if cached is not None and cached[1] == line:
            return cached[0]
        if cached is not None:
            cached[0].close()
        key = self.files[segment]
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout"):
                raise SnapshotThrottledError(f"s3://{self.bucket}/{key}: {_s3_text(exc)}") from None
            raise SnapshotError(f"cannot read export data file s3://{self.bucket}/{key}: {_s3_text(exc)}") from None
        except BotoCoreError as exc:
            raise SnapshotThrottledError(f"s3://{self.bucket}/{key}: {_s3_text(exc)}") from None
        stream = gzip.GzipFile(fileobj=body, mode="rb")
        for _ in range(line):  # resume: skip the lines already delivered
            if not stream.readline():
                break
        return stream

    def read_page(self, segment: int, position: Any, limit: int | None) -> Page:
        """Up to :data:`EXPORT_PAGE_LINES` items of data file ``segment`` after ``position``."""
        line = int((position or {}).get("line", 0))
        stream = self._stream(segment, line)
        items, size, read_at = [], 0, datetime.now(timezone.utc)
        key = self.files[segment]
        try:
            while len(items) < EXPORT_PAGE_LINES:
                raw = stream.readline()
                if not raw:
                    stream.close()
                    return Page(items=items, next_position=None, bytes=size, read_at=read_at)
                line += 1
                if not raw.strip():
                    continue
                size += len(raw)
                try:
                    items.append(orjson.loads(raw)["Item"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    raise SnapshotError(f"s3://{self.bucket}/{key} line {line}: not a DYNAMODB_JSON export line "
                                        '({"Item": {...}}); is the export in the ION format?') from None
        except (OSError, EOFError) as exc:
            stream.close()
            raise SnapshotError(f"s3://{self.bucket}/{key}: not a gzip data file ({exc})") from None
        except (ClientError, BotoCoreError) as exc:
            stream.close()
            raise SnapshotThrottledError(f"s3://{self.bucket}/{key}: {_s3_text(exc)}") from None
        with self._lock:
            self._open[segment] = (stream, line)
        return Page(items=items, next_position={"line": line}, bytes=size, read_at=read_at)


def open_export(settings: Any, uri: str, *, table: str | None = None) -> tuple[ExportReader, datetime, str]:
    """Read the export's manifests → (reader, export time, table name). Raises ConfigError (bad
    URI), SnapshotError (missing manifest, another format, unknown table)."""
    bucket, prefix = parse_export_uri(uri)
    client = make_client("s3", settings.aws)
    try:
        summary = orjson.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest-summary.json")["Body"].read())
    except (ClientError, BotoCoreError) as exc:
        raise SnapshotError(f"cannot read s3://{bucket}/{prefix}manifest-summary.json: {_s3_text(exc)}; "
                            "--from-export names the export's folder (…/AWSDynamoDB/EXPORT_ID/)") from None
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"s3://{bucket}/{prefix}manifest-summary.json is not JSON: {exc}") from None
    fmt = summary.get("outputFormat", "DYNAMODB_JSON")
    if fmt != "DYNAMODB_JSON":
        raise SnapshotError(f"export {uri} is in the {fmt} format; only DYNAMODB_JSON is read (export again "
                            "with --export-format DYNAMODB_JSON)")
    try:
        export_time = datetime.fromisoformat(str(summary["exportTime"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        raise SnapshotError(f"s3://{bucket}/{prefix}manifest-summary.json has no exportTime") from None
    name = table or str(summary.get("tableArn", "")).rsplit("/", 1)[-1]
    if not name:
        raise SnapshotError(f"export {uri}: no tableArn in the manifest; name the table with --table")
    files_key = summary.get("manifestFilesS3Key") or prefix + "manifest-files.json"
    try:
        body = client.get_object(Bucket=bucket, Key=files_key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise SnapshotError(f"cannot read s3://{bucket}/{files_key}: {_s3_text(exc)}") from None
    files = [orjson.loads(line)["dataFileS3Key"] for line in body.splitlines() if line.strip()]
    if not files:
        raise SnapshotError(f"export {uri}: manifest-files.json lists no data files")
    info = describe_table(make_client("dynamodb", settings.aws), name)
    reader = ExportReader(client, bucket, files, key_names=info.key_names, item_count=summary.get("itemCount"))
    return reader, export_time, name
