"""Resumable snapshot progress, kept in the lease store (DynamoDB lease table or SQLite file).

Everything lives in the store's ``snapshot`` namespace (stored keys ``snapshot#…``, so the live
consumer and ``ddb-cdc checkpoints`` never see them — :mod:`pipeline.checkpoint`):

- one *snapshot lease* per snapshot, key ``{table}:{snapshot_id}``, shard id ``snapshot``; its
  ``checkpoint`` is JSON ``{"state": "running" | "done", "started_at": ISO 8601, "version": int,
  "segments": N, "source": "scan" | "export", "export": uri | null, "margin_s": float,
  "updated_at": ISO 8601}``;
- one *segment lease* per segment, key ``{table}:{snapshot_id}:seg{NNNNN}``, shard id
  ``seg{NNNNN}``; its ``checkpoint`` is JSON ``{"done": bool, "position": <where the next page
  starts> | null, "items": n, "pages": n, "bytes": n, "rcu": float, "dead_lettered": n,
  "updated_at": ISO 8601}``. For a Scan ``position`` is the last flushed page's
  ``LastEvaluatedKey`` (:func:`pipeline.snapshot.items.key_to_json`); for an export it is
  ``{"line": n}`` in the segment's data file.

A segment's checkpoint moves only after every sink flushed the pages it covers (at-least-once:
after ``kill -9`` the pages read since the last checkpoint are read and delivered again, with the
same version and sequence numbers). Writes are the store's conditional writes on owner and
counter: the runner takes each lease (``take_lease``) before it writes, so two runners of one
snapshot cannot both move a checkpoint — the second to take a lease wins, the first gets
LeaseLostError on its next write and stops that segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

from pipeline.checkpoint import Lease
from pipeline.errors import LeaseLostError, SnapshotError

#: The lease store namespace of snapshot progress.
SNAPSHOT_NAMESPACE = "snapshot"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class SnapshotMeta:
    """One snapshot: ``table``, ``snapshot_id``, ``started_at`` (T0, timezone-aware), ``version``
    (:func:`pipeline.snapshot.version.snapshot_version` of T0), ``segments``, ``source`` (scan |
    export), ``export`` (the export URI), ``state`` (running | done), ``margin_s``."""

    table: str
    snapshot_id: str
    started_at: datetime
    version: int
    segments: int
    source: str = "scan"
    export: str | None = None
    state: str = "running"
    margin_s: float = 60.0
    updated_at: str = ""

    @property
    def lease_key(self) -> str:
        """``{table}:{snapshot_id}``."""
        return f"{self.table}:{self.snapshot_id}"

    def to_checkpoint(self) -> str:
        """The JSON text stored as the snapshot lease's checkpoint."""
        return orjson.dumps({"state": self.state, "started_at": self.started_at.isoformat(), "version": self.version,
                             "segments": self.segments, "source": self.source, "export": self.export,
                             "margin_s": self.margin_s, "updated_at": _now()}).decode()

    @classmethod
    def from_lease(cls, lease: Lease) -> "SnapshotMeta":
        """Parse a snapshot lease. Raises SnapshotError for a checkpoint that is not ours."""
        try:
            data = orjson.loads(lease.checkpoint)
            table, snapshot_id = lease.lease_key.split(":", 1)
            return cls(table=table, snapshot_id=snapshot_id, started_at=datetime.fromisoformat(data["started_at"]),
                       version=int(data["version"]), segments=int(data["segments"]), source=data.get("source", "scan"),
                       export=data.get("export"), state=data.get("state", "running"),
                       margin_s=float(data.get("margin_s", 60.0)), updated_at=data.get("updated_at", ""))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot lease {lease.lease_key!r} holds no snapshot record ({exc}); "
                                "delete it with `ddb-cdc snapshot --abandon`") from None


@dataclass
class SegmentProgress:
    """One segment's progress: ``position`` (where the next page starts; None = the beginning),
    ``done``, and counts (``items``, ``pages``, ``bytes``, ``rcu`` consumed, ``dead_lettered``)."""

    segment: int
    position: Any = None
    done: bool = False
    items: int = 0
    pages: int = 0
    bytes: int = 0
    rcu: float = 0.0
    dead_lettered: int = 0
    updated_at: str = ""

    def to_checkpoint(self) -> str:
        """The JSON text stored as the segment lease's checkpoint."""
        return orjson.dumps({"done": self.done, "position": self.position, "items": self.items, "pages": self.pages,
                             "bytes": self.bytes, "rcu": round(self.rcu, 3), "dead_lettered": self.dead_lettered,
                             "updated_at": _now()}).decode()

    @classmethod
    def from_checkpoint(cls, segment: int, text: str) -> "SegmentProgress":
        """Parse a segment checkpoint; a fresh lease (TRIM_HORIZON) is the segment's beginning."""
        if not text.startswith("{"):
            return cls(segment)
        data = orjson.loads(text)
        return cls(segment, position=data.get("position"), done=bool(data.get("done")), items=int(data.get("items", 0)),
                   pages=int(data.get("pages", 0)), bytes=int(data.get("bytes", 0)), rcu=float(data.get("rcu", 0.0)),
                   dead_lettered=int(data.get("dead_lettered", 0)), updated_at=data.get("updated_at", ""))

    def copy(self) -> "SegmentProgress":
        """An independent copy."""
        return SegmentProgress(**self.__dict__)


def segment_key(meta: SnapshotMeta, segment: int) -> str:
    """``{table}:{snapshot_id}:seg{NNNNN}``."""
    return f"{meta.lease_key}:seg{segment:05d}"


@dataclass
class SnapshotState:
    """A snapshot as read from the store: its record and each segment's progress."""

    meta: SnapshotMeta
    segments: list[SegmentProgress] = field(default_factory=list)

    @property
    def items(self) -> int:
        """Items delivered durably so far, over all segments."""
        return sum(s.items for s in self.segments)

    @property
    def segments_done(self) -> int:
        """Segments read to their end."""
        return sum(1 for s in self.segments if s.done)


class SnapshotProgressStore:
    """Snapshot records and segment checkpoints in ``lease_store.in_namespace("snapshot")``.

    ``lease_store``: a :class:`pipeline.checkpoint.LeaseStore` (with ``in_namespace``);
    ``owner``: who writes (the worker / command id). Store errors propagate
    (CheckpointStoreError); a lost lease is LeaseLostError.
    """

    def __init__(self, lease_store: Any, owner: str):
        self.store = lease_store.in_namespace(SNAPSHOT_NAMESPACE)
        self.owner = owner
        self._leases: dict[str, Lease] = {}

    # -- reading --------------------------------------------------------------------------------

    def list_snapshots(self, table: str | None = None) -> list[SnapshotState]:
        """Every snapshot in the store (of ``table`` only, when given), oldest first."""
        leases = self.store.list_leases()
        metas = [SnapshotMeta.from_lease(lease) for lease in leases
                 if lease.shard_id == "snapshot" and (table is None or lease.table == table)]
        by_key = {lease.lease_key: lease for lease in leases}
        states = []
        for meta in sorted(metas, key=lambda m: m.started_at):
            segs = []
            for segment in range(meta.segments):
                lease = by_key.get(segment_key(meta, segment))
                segs.append(SegmentProgress.from_checkpoint(segment, lease.checkpoint) if lease
                            else SegmentProgress(segment))
            states.append(SnapshotState(meta, segs))
        return states

    def running(self, table: str) -> SnapshotState | None:
        """The newest unfinished snapshot of ``table``, or None."""
        running = [s for s in self.list_snapshots(table) if s.meta.state != "done"]
        return running[-1] if running else None

    def finished(self, table: str) -> SnapshotState | None:
        """The newest finished snapshot of ``table``, or None."""
        done = [s for s in self.list_snapshots(table) if s.meta.state == "done"]
        return done[-1] if done else None

    # -- writing --------------------------------------------------------------------------------

    def create(self, meta: SnapshotMeta) -> SnapshotState:
        """Store a new snapshot record and its segment leases, owned by this store's owner.
        Raises SnapshotError when a snapshot with that id exists."""
        lease = Lease(lease_key=meta.lease_key, table=meta.table, stream_arn=f"snapshot:{meta.snapshot_id}",
                      shard_id="snapshot", checkpoint=meta.to_checkpoint())
        if not self.store.create_lease_if_absent(lease):
            raise SnapshotError(f"snapshot {meta.snapshot_id} of table {meta.table} exists already")
        for segment in range(meta.segments):
            self.store.create_lease_if_absent(Lease(
                lease_key=segment_key(meta, segment), table=meta.table, stream_arn=lease.stream_arn,
                shard_id=f"seg{segment:05d}", checkpoint=SegmentProgress(segment).to_checkpoint()))
        return self.take(meta)

    def take(self, meta: SnapshotMeta) -> SnapshotState:
        """Become the owner of the snapshot's leases (to resume it) and return its state."""
        keys = [meta.lease_key] + [segment_key(meta, s) for s in range(meta.segments)]
        segments = []
        for key in keys:
            lease = self.store.get_lease(key)
            if lease is None:
                raise SnapshotError(f"snapshot {meta.snapshot_id}: lease {key} is missing from the lease store; "
                                    "start a new snapshot with `ddb-cdc snapshot --new`")
            self._leases[key] = self.store.take_lease(lease, self.owner)
            if key != meta.lease_key:
                segments.append(SegmentProgress.from_checkpoint(len(segments), lease.checkpoint))
        return SnapshotState(meta, segments)

    def save_segment(self, meta: SnapshotMeta, progress: SegmentProgress) -> None:
        """Checkpoint one segment (conditional on owner and counter). Raises LeaseLostError."""
        self._write(segment_key(meta, progress.segment), progress.to_checkpoint())

    def save_meta(self, meta: SnapshotMeta) -> None:
        """Store the snapshot record (e.g. ``state = "done"``). Raises LeaseLostError."""
        self._write(meta.lease_key, meta.to_checkpoint())

    def _write(self, key: str, checkpoint: str) -> None:
        lease = self._leases.get(key)
        if lease is None:
            raise LeaseLostError(f"snapshot lease {key} is not held by {self.owner}")
        self._leases[key] = self.store.checkpoint(lease, checkpoint)

    def release(self) -> None:
        """Clear the owner of every lease held (best effort)."""
        for key, lease in list(self._leases.items()):
            try:
                self.store.release_lease(lease)
            except Exception:  # noqa: BLE001 - releasing is best effort; the next run takes them anyway
                pass
            self._leases.pop(key, None)

    def delete(self, state: SnapshotState) -> int:
        """Remove a snapshot's leases (``--abandon``); returns how many were removed."""
        removed = 0
        keys = [state.meta.lease_key] + [segment_key(state.meta, s) for s in range(state.meta.segments)]
        for key in keys:
            lease = self.store.get_lease(key)
            if lease is not None:
                self.store.delete_lease(lease)
                removed += 1
        return removed
