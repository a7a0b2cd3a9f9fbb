"""Dead-letter destination: where records that cannot be decoded or delivered go, in full.

An entry holds everything needed to understand and re-deliver it: the full change event
(typed, with before and after images) or, for a record that could not be decoded, the raw
record as read; the sink (None for decode failures), the error, the attempt count, the first and
last failure time and the position (stream ARN, shard id, sequence number).

Entry ids are deterministic (kind, shard, sequence number, sink), so dead-lettering the same
record twice — e.g. after a restart replays it — rewrites one entry instead of adding another.

:class:`DirectoryDeadLetterQueue` writes one JSON file per entry (atomic rename, then the
directory is fsynced so the new name survives a power loss);
``connectors.s3.deadletter.S3DeadLetterQueue`` writes one S3 object per entry.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import orjson

from pipeline.events import ChangeEvent
from pipeline.render import event_to_record_dict


@dataclass
class DeadLetterEntry:
    """One dead-lettered record.

    ``kind`` is ``decode`` (the record could not be decoded; ``raw_record`` holds it) or
    ``delivery`` (a sink could not deliver it; ``event`` holds the full change event as
    :func:`pipeline.render.event_to_record_dict`). Times are ISO 8601 UTC strings.
    """

    kind: str
    stream_arn: str
    shard_id: str
    sequence_number: str | None
    error: str
    sink: str | None = None
    table: str | None = None
    attempts: int = 1
    first_failure: str = ""
    last_failure: str = ""
    event: dict[str, Any] | None = None
    raw_record: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Deterministic id: ``{kind}-{sink or 'decoder'}-{shard}-{sequence}`` made filename-safe."""
        seq = self.sequence_number or hashlib.sha256(_dumps(self.raw_record)).hexdigest()[:20]
        raw = f"{self.kind}-{self.sink or 'decoder'}-{self.shard_id}-{seq}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the entry (raw bytes and datetimes rendered, see :func:`jsonable`)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "table": self.table,
            "sink": self.sink,
            "error": self.error,
            "attempts": self.attempts,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
            "position": {
                "stream_arn": self.stream_arn,
                "shard_id": self.shard_id,
                "sequence_number": self.sequence_number,
            },
            "event": self.event,
            "raw_record": jsonable(self.raw_record),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeadLetterEntry":
        """Inverse of :meth:`to_dict`."""
        pos = data.get("position") or {}
        return cls(
            kind=data["kind"],
            stream_arn=pos.get("stream_arn", ""),
            shard_id=pos.get("shard_id", ""),
            sequence_number=pos.get("sequence_number"),
            error=data.get("error", ""),
            sink=data.get("sink"),
            table=data.get("table"),
            attempts=int(data.get("attempts", 1)),
            first_failure=data.get("first_failure", ""),
            last_failure=data.get("last_failure", ""),
            event=data.get("event"),
            raw_record=data.get("raw_record"),
            extra=dict(data.get("extra") or {}),
        )


def delivery_entry(event: ChangeEvent, *, sink: str, error: str, attempts: int,
                   first_failure: datetime, last_failure: datetime) -> DeadLetterEntry:
    """A ``delivery`` entry for an event a sink could not deliver."""
    src = event.source
    return DeadLetterEntry(
        kind="delivery",
        stream_arn=src.stream_arn,
        shard_id=src.shard_id,
        sequence_number=src.sequence_number,
        table=src.table,
        sink=sink,
        error=error,
        attempts=attempts,
        first_failure=first_failure.isoformat(),
        last_failure=last_failure.isoformat(),
        event=event_to_record_dict(event),
    )


def decode_entry(raw_record: Any, *, table: str, stream_arn: str, shard_id: str,
                 sequence_number: str | None, error: str, version_floor: int = 0) -> DeadLetterEntry:
    """A ``decode`` entry for a record the decoder rejected, with the raw record as read.
    ``version_floor``: its shard's version floor, kept in ``extra["version_floor"]`` so a redrive
    gives the record the version the live read would have (pipeline.codec.record_version)."""
    now = utc_now().isoformat()
    return DeadLetterEntry(
        kind="decode",
        stream_arn=stream_arn,
        shard_id=shard_id,
        sequence_number=sequence_number,
        table=table,
        error=error,
        first_failure=now,
        last_failure=now,
        raw_record=raw_record,
        extra={"version_floor": version_floor} if version_floor else {},
    )


class DeadLetterQueue(Protocol):
    """A dead-letter destination. ``put`` returns only when the entry is durable."""

    def put(self, entry: DeadLetterEntry) -> str:
        """Store ``entry`` (replacing one with the same id); return its id."""

    def list(self) -> Iterator[DeadLetterEntry]:
        """Every stored entry."""

    def get(self, entry_id: str) -> DeadLetterEntry | None:
        """One entry by id, or None."""

    def delete(self, entry_id: str) -> None:
        """Remove an entry (after it was re-delivered)."""


class DirectoryDeadLetterQueue:
    """Dead-letter entries as ``{directory}/{id}.json`` files, written atomically and durably:
    temp file, fsync, rename, fsync of the directory (and of its parent when ``put`` created it).

    In the container image the default directory (``/var/lib/ddb-cdc/dead-letter``) is a declared
    ``VOLUME`` (Dockerfile), so entries outlive the container; mount a named volume or a host
    directory there to keep them across ``docker rm``.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def put(self, entry: DeadLetterEntry) -> str:
        """Write ``entry`` durably; returns its id. Raises OSError (disk full, no permission)."""
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.directory.parent)  # the new directory's own entry
        path = self.directory / f"{entry.id}.json"
        data = orjson.dumps(entry.to_dict(), option=orjson.OPT_INDENT_2)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_directory(self.directory)
        return entry.id

    def list(self) -> Iterator[DeadLetterEntry]:
        if not self.directory.is_dir():
            return iter(())
        return (self._load(p) for p in sorted(self.directory.glob("*.json")) if not p.name.startswith(".tmp-"))

    def get(self, entry_id: str) -> DeadLetterEntry | None:
        path = self.directory / f"{entry_id}.json"
        return self._load(path) if path.exists() else None

    def delete(self, entry_id: str) -> None:
        (self.directory / f"{entry_id}.json").unlink(missing_ok=True)

    @staticmethod
    def _load(path: Path) -> DeadLetterEntry:
        return DeadLetterEntry.from_dict(orjson.loads(path.read_bytes()))


def fsync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory, so that a file just renamed (or created) in it is still there after a
    crash or power loss: the rename is atomic, but "calling fsync() does not necessarily ensure
    that the entry in the directory containing the file has also reached disk. For that an
    explicit fsync() on a file descriptor for the directory is also needed" (Linux fsync(2) man
    page). A no-op where directories cannot be opened (Windows). Raises OSError otherwise."""
    if os.name == "nt":  # pragma: no cover - no directory fds on Windows
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def jsonable(value: Any) -> Any:
    """A raw record (boto3 shape: bytes, datetime, Decimal, sets) as JSON-safe values.

    bytes → ``{"__bytes__": base64}``, datetime → ISO text, Decimal → text, sets → lists, other
    unknown objects → ``repr``; nothing is dropped. A part nested deeper than
    :data:`JSONABLE_MAX_DEPTH` levels (hostile input: DynamoDB itself stops at 32) becomes
    ``{"__deep__": text}``, the text written without recursion, so no input makes this fail.
    """
    return _jsonable(value, 0)


#: Nesting kept as JSON structure in a dead letter (orjson refuses more than 254 levels).
JSONABLE_MAX_DEPTH = 200


def _jsonable(value: Any, depth: int) -> Any:
    if isinstance(value, (Mapping, list, tuple, set, frozenset)) and depth >= JSONABLE_MAX_DEPTH:
        return {"__deep__": _flat_text(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no inf/NaN (orjson would write null and lose the value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _flat_text(value: Any) -> str:
    """JSON-like text of nested maps and lists, written with an explicit stack (any depth)."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Token):
            out.append(item.text)
        elif isinstance(item, Mapping):
            out.append("{")
            parts: list[Any] = []
            for i, (k, v) in enumerate(item.items()):
                parts += [_Token(("," if i else "") + orjson.dumps(str(k)).decode() + ":"), v]
            stack += [_Token("}")] + parts[::-1]
        elif isinstance(item, (list, tuple, set, frozenset)):
            out.append("[")
            parts = []
            for i, v in enumerate(item):
                parts += ([_Token(",")] if i else []) + [v]
            stack += [_Token("]")] + parts[::-1]
        else:
            out.append(orjson.dumps(_jsonable(item, 0)).decode())
    return "".join(out)


class _Token:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _dumps(value: Any) -> bytes:
    return orjson.dumps(jsonable(value), option=orjson.OPT_SORT_KEYS)
