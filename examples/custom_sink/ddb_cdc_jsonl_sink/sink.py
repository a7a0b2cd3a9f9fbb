"""``jsonl_file``: every change event as one JSON line, appended to a file per table — exactly once.

Layout of ``directory``::

    <table>.jsonl          the events, one :func:`pipeline.render.event_to_json_line` per line
    <table>.jsonl.state    sidecar state, rewritten atomically by every flush
    .jsonl-sink.lock       held (flock) while a sink has the directory open

Each line is the whole change event with keys and images as DynamoDB AttributeValue JSON
(lossless; :func:`pipeline.render.event_from_record_dict` rebuilds the event) and carries
``source.stream_arn``, ``source.shard_id`` and ``source.sequence_number``. Lines of one shard are in
sequence order; lines of different shards of the same table interleave.

Idempotence. The sidecar state holds, for the data file, the number of bytes committed by the last
``flush`` and, per stream and shard, the last sequence number in those bytes::

    {"format": 1, "table": "orders", "committed_bytes": 5230,
     "shards": {"arn:aws:dynamodb:...:table/orders/stream/...": {"shardId-...": "4900000000000000000123"}}}

- ``write`` skips every event whose sequence number is not above the last one already appended
  for its shard (in this process, flushed or not), so a retried or repeated batch adds nothing.
- ``flush`` fsyncs the data files, then replaces the state file (write to a temporary file, fsync,
  rename, fsync the directory). Only then does it return, and only then may the worker move the
  checkpoint.
- When a table's file is first used after a start, the file is cut back to ``committed_bytes``:
  whatever was appended after the last flush (including a torn last line from a crash) was never
  covered by a checkpoint, so the worker replays it, and events up to the recorded sequence number
  are skipped. The end state is each change exactly once, whatever the crash point.
- A missing or unreadable state file (deleted, or a data file from elsewhere) is rebuilt by
  reading the data file; a torn last line is cut off.

With ``fsync: false`` a *process* crash is still exactly-once (the page cache survives it), but a
machine crash or power loss can lose lines the worker has already checkpointed; on the next start
the state is rebuilt from what is left and a warning is logged.

One process per directory: the sink takes an exclusive ``flock`` on ``.jsonl-sink.lock`` at
``open`` and fails (FatalSinkError) when another sink holds it. To run several workers, give each
its own directory (for example through ``DDB_CDC_SINKS``); each directory is then exactly-once for
the shards its worker processed, and a shard that moves between workers continues in the other
worker's directory from the last checkpoint.

Threads: ``thread_safe = False``, so the fan-out serialises every call to one sink instance.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import orjson
from pydantic import Field

from pipeline.errors import FatalSinkError, PartialSinkError, RetriableSinkError
from pipeline.events import Batch, ChangeEvent, sequence_key
from pipeline.render import event_from_record_dict, event_to_json_line
from pipeline.sink import Sink, SinkContext, SinkOptions

try:  # POSIX only; elsewhere the one-process-per-directory rule is not enforced
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

DATA_SUFFIX = ".jsonl"
STATE_SUFFIX = ".jsonl.state"
LOCK_NAME = ".jsonl-sink.lock"
STATE_FORMAT = 1

# DynamoDB table names: 3-255 of [a-zA-Z0-9_.-] (DynamoDB developer guide, "Naming rules").
_SAFE_TABLE = re.compile(r"[A-Za-z0-9_.\-]{1,255}")


class Options(SinkOptions):
    """Options of the ``jsonl_file`` sink.

    - ``directory`` (required): where ``<table>.jsonl`` files go; created if missing.
    - ``fsync`` (default true): fsync data, state and directory on every flush. False trades
      durability across a machine crash for speed (see the module doc).
    """

    directory: str = Field(min_length=1, description="directory of the <table>.jsonl files")
    fsync: bool = Field(True, description="fsync on every flush (durable across machine crashes)")


@dataclass
class _TableFile:
    """One open ``<table>.jsonl`` with its positions."""

    table: str
    path: Path
    state_path: Path
    fd: int
    length: int  # bytes in the file, flushed or not
    committed_bytes: int  # bytes covered by the state file
    # stream ARN -> shard id -> last sequence number appended (``committed`` as of the last flush)
    positions: dict[str, dict[str, str]] = field(default_factory=dict)
    committed: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def dirty(self) -> bool:
        return self.length != self.committed_bytes or self.positions != self.committed

    def last(self, stream_arn: str, shard_id: str) -> str | None:
        return self.positions.get(stream_arn, {}).get(shard_id)


class JsonlFileSink(Sink):
    """Appends each change event as one JSON line to ``<directory>/<table>.jsonl``; see the module doc."""

    Options: ClassVar[type[SinkOptions]] = Options
    thread_safe = False

    def __init__(self, name: str, options: Options | None = None):
        super().__init__(name, options)
        self.directory = Path(self.options.directory)
        self._tables: dict[str, _TableFile] = {}
        self._lock_fd: int | None = None
        self.skipped = 0  # events not appended again (already in the file)

    # -- contract ----------------------------------------------------------------------------

    def open(self, context: SinkContext) -> None:
        super().open(context)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise FatalSinkError(f"sink {self.name!r}: cannot use directory {str(self.directory)!r}: {exc}") from None
        if fcntl is not None:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(lock_fd)
                raise FatalSinkError(
                    f"sink {self.name!r}: directory {str(self.directory)!r} is in use by another sink "
                    f"(lock {LOCK_NAME} is held); give each worker and each sink its own directory") from None
        self._lock_fd = lock_fd

    def write(self, batch: Batch) -> None:
        if not batch.events:
            return
        if self._lock_fd is None:
            raise FatalSinkError(f"sink {self.name!r}: write() before open()")
        by_table: dict[str, list[ChangeEvent]] = {}
        for event in batch.events:
            by_table.setdefault(event.source.table, []).append(event)
        permanent: list[tuple[ChangeEvent, str]] = []
        for table, events in by_table.items():
            if not _SAFE_TABLE.fullmatch(table) or table in {".", ".."}:
                permanent.extend((ev, f"table name {table!r} cannot be a file name") for ev in events)
                continue
            tf = self._table_file(table)
            chunk = bytearray()
            appended: dict[tuple[str, str], str] = {}
            for event in events:
                src = event.source
                last = appended.get((src.stream_arn, src.shard_id)) or tf.last(src.stream_arn, src.shard_id)
                if last is not None and sequence_key(src.sequence_number) <= sequence_key(last):
                    self.skipped += 1
                    continue
                try:
                    chunk += event_to_json_line(event)
                except Exception as exc:  # a value the renderer cannot take: this event only
                    permanent.append((event, f"cannot render as JSON: {type(exc).__name__}: {exc}"))
                    continue
                appended[(src.stream_arn, src.shard_id)] = src.sequence_number
            if chunk:
                self._append(tf, bytes(chunk))
            for (stream_arn, shard_id), seq in appended.items():
                tf.positions.setdefault(stream_arn, {})[shard_id] = seq
        if permanent:
            raise PartialSinkError(f"sink {self.name!r}: {len(permanent)} event(s) cannot be written",
                                   permanent=permanent)

    def flush(self) -> None:
        dirty = [tf for tf in self._tables.values() if tf.dirty]
        if not dirty:
            return
        for tf in dirty:
            if self.options.fsync:
                try:
                    os.fsync(tf.fd)
                except OSError as exc:
                    # After a failed fsync the kernel may have dropped the dirty pages: retrying
                    # could falsely succeed. Stop; the next start cuts back to the last commit.
                    raise FatalSinkError(f"sink {self.name!r}: fsync of {tf.path} failed: {exc}; "
                                         "restart the worker to replay from the last checkpoint") from None
        for tf in dirty:
            state = {
                "format": STATE_FORMAT,
                "table": tf.table,
                "committed_bytes": tf.length,
                "shards": tf.positions,
            }
            try:
                _atomic_write(tf.state_path, orjson.dumps(state, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2),
                              fsync=self.options.fsync)
            except OSError as exc:
                raise RetriableSinkError(f"sink {self.name!r}: cannot write {tf.state_path}: {exc}") from None
            tf.committed_bytes = tf.length
            tf.committed = {arn: dict(shards) for arn, shards in tf.positions.items()}
        if self.options.fsync:
            try:
                _fsync_dir(self.directory)
            except OSError as exc:
                raise RetriableSinkError(f"sink {self.name!r}: cannot fsync {self.directory}: {exc}") from None

    def close(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # nothing more to do: the next start cuts back to the last commit
            self._log("warning", "jsonl_sink_close_flush_failed", error=f"{type(exc).__name__}: {exc}")
        for tf in self._tables.values():
            _close_quietly(tf.fd)
        self._tables.clear()
        if self._lock_fd is not None:
            _close_quietly(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- internals ---------------------------------------------------------------------------

    def _table_file(self, table: str) -> _TableFile:
        tf = self._tables.get(table)
        if tf is not None:
            return tf
        path = self.directory / f"{table}{DATA_SUFFIX}"
        state_path = self.directory / f"{table}{STATE_SUFFIX}"
        try:
            created = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RetriableSinkError(f"sink {self.name!r}: cannot open {path}: {exc}") from None
        try:
            if created and self.options.fsync:
                _fsync_dir(self.directory)
            tf = self._recover(table, path, state_path, fd)
        except OSError as exc:
            _close_quietly(fd)
            raise RetriableSinkError(f"sink {self.name!r}: cannot recover {path}: {exc}") from None
        self._tables[table] = tf
        return tf

    def _recover(self, table: str, path: Path, state_path: Path, fd: int) -> _TableFile:
        """Open-time recovery: cut the file back to the last commit, or rebuild the state from it."""
        size = os.fstat(fd).st_size
        state = _read_state(state_path)
        if state is not None and state["committed_bytes"] <= size:
            committed_bytes = state["committed_bytes"]
            positions = state["shards"]
            if size > committed_bytes:
                os.ftruncate(fd, committed_bytes)
                self._log("info", "jsonl_sink_uncommitted_cut", path=str(path), bytes=size - committed_bytes,
                          committed_bytes=committed_bytes)
        else:
            if state is not None:
                self._log("warning", "jsonl_sink_data_shorter_than_state", path=str(path), size=size,
                          committed_bytes=state["committed_bytes"],
                          hint="lines were lost (fsync: false and a machine crash, or the file was edited)")
            elif size and state_path.exists():
                self._log("warning", "jsonl_sink_state_unreadable", path=str(state_path))
            committed_bytes, positions = _scan(path, size)
            if committed_bytes < size:
                os.ftruncate(fd, committed_bytes)
                self._log("info", "jsonl_sink_torn_line_cut", path=str(path), bytes=size - committed_bytes)
            if size:
                self._log("info", "jsonl_sink_state_rebuilt", path=str(path), committed_bytes=committed_bytes)
        tf = _TableFile(table=table, path=path, state_path=state_path, fd=fd, length=committed_bytes,
                        committed_bytes=committed_bytes, positions=positions,
                        committed={arn: dict(s) for arn, s in positions.items()})
        if state is None or state["committed_bytes"] != committed_bytes or state["shards"] != positions:
            tf.committed_bytes = -1  # mark dirty: the next flush records the rebuilt state
        return tf

    def _append(self, tf: _TableFile, data: bytes) -> None:
        try:
            _write_all(tf.fd, data)
        except OSError as exc:
            try:  # take back a partial append so that the retried batch starts on a line boundary
                os.ftruncate(tf.fd, tf.length)
            except OSError as exc2:
                raise FatalSinkError(f"sink {self.name!r}: append to {tf.path} failed ({exc}) and the partial "
                                     f"line cannot be removed ({exc2}); restart the worker") from None
            raise RetriableSinkError(f"sink {self.name!r}: cannot append to {tf.path}: {exc}") from None
        tf.length += len(data)

    def _log(self, level: str, event: str, **kv: Any) -> None:
        logger = self.context.logger if self.context is not None else None
        if logger is not None:
            getattr(logger, level)(event, sink=self.name, **kv)


# -- helpers ----------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _atomic_write(path: Path, data: bytes, *, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _read_state(path: Path) -> dict[str, Any] | None:
    """The state file's content, or None when missing or not a valid state."""
    try:
        state = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if (not isinstance(state, dict) or state.get("format") != STATE_FORMAT
            or not isinstance(state.get("committed_bytes"), int) or state["committed_bytes"] < 0
            or not isinstance(state.get("shards"), dict)):
        return None
    shards = state["shards"]
    if not all(isinstance(v, dict) and all(isinstance(s, str) for s in v.values()) for v in shards.values()):
        return None
    return state


def _scan(path: Path, size: int) -> tuple[int, dict[str, dict[str, str]]]:
    """Read the data file: (bytes up to the last complete line, last sequence number per shard)."""
    positions: dict[str, dict[str, str]] = {}
    good = 0
    if not size:
        return 0, positions
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break  # torn last line
            try:
                src = orjson.loads(line)["source"]
                arn, shard, seq = src["stream_arn"], src["shard_id"], src["sequence_number"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                break  # garbage after a crash: everything from here on is cut
            last = positions.setdefault(arn, {}).get(shard)
            if last is None or sequence_key(seq) > sequence_key(last):
                positions[arn][shard] = seq
            good += len(line)
    return good, positions


def read_events(directory: str | os.PathLike, table: str) -> Iterator[ChangeEvent]:
    """The committed events of ``table`` in ``directory``, in file order, as ChangeEvents.

    Reads only up to the state file's ``committed_bytes`` (when there is a state file), so lines a
    running sink has appended but not yet flushed are left out.
    """
    path = Path(directory) / f"{table}{DATA_SUFFIX}"
    state = _read_state(Path(directory) / f"{table}{STATE_SUFFIX}")
    limit = state["committed_bytes"] if state is not None else None
    read = 0
    with open(path, "rb") as fh:
        for line in fh:
            read += len(line)
            if (limit is not None and read > limit) or not line.endswith(b"\n"):
                return
            yield event_from_record_dict(orjson.loads(line))
