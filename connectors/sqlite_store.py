"""Lease / checkpoint store in a SQLite file, for single-machine runs without AWS.

Same protocol as the DynamoDB lease table (KCL column names, conditional writes on
``leaseOwner`` + ``leaseCounter``): every conditional write is one ``UPDATE … WHERE`` whose
row count tells whether the condition held, inside SQLite's own locking, so several processes
on one machine can share one file (WAL mode, busy timeout 10 s).

Checkpoint moves (``moveCheckpoint`` … columns) and namespaces (stored keys prefixed
``{namespace}#``) work as in the DynamoDB lease table; see :mod:`pipeline.checkpoint`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from pipeline.checkpoint import NAMESPACE_SEPARATOR, Gap, Lease, MoveRequest, WorkerInfo, keeps_head_check
from pipeline.errors import CheckpointStoreError, LeaseLostError, LeaseNotFoundError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    leaseKey TEXT PRIMARY KEY,
    leaseOwner TEXT,
    leaseCounter INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT NOT NULL,
    checkpointSubSequenceNumber INTEGER NOT NULL DEFAULT 0,
    ownerSwitchesSinceCheckpoint INTEGER NOT NULL DEFAULT 0,
    parentShardId TEXT,
    streamArn TEXT NOT NULL,
    shardId TEXT NOT NULL,
    tableName TEXT NOT NULL,
    millisBehindLatest INTEGER,
    moveCheckpoint TEXT,
    moveRequestId TEXT,
    moveRequestedBy TEXT,
    moveRequestedAt TEXT,
    versionFloor INTEGER,
    versionHigh INTEGER,
    startingSequenceNumber TEXT,
    retainedSince INTEGER
)
"""

#: columns added after the first release: added to older files by ``ensure_table``
_ADDED_COLUMNS = ("moveCheckpoint TEXT", "moveRequestId TEXT", "moveRequestedBy TEXT", "moveRequestedAt TEXT",
                  "versionFloor INTEGER", "versionHigh INTEGER", "startingSequenceNumber TEXT",
                  "retainedSince INTEGER")

_WORKERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    workerId TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    startedAt TEXT NOT NULL,
    heartbeatAt TEXT NOT NULL,
    leases INTEGER NOT NULL DEFAULT 0
)
"""

_GAPS_SCHEMA = """
CREATE TABLE IF NOT EXISTS gaps (
    gapId TEXT PRIMARY KEY,
    streamArn TEXT NOT NULL,
    tableName TEXT NOT NULL,
    shardId TEXT NOT NULL,
    lastCheckpoint TEXT NOT NULL,
    firstPositionAfter TEXT,
    detectedAt TEXT NOT NULL,
    policy TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
)
"""

_COLUMNS = ("leaseKey, leaseOwner, leaseCounter, checkpoint, checkpointSubSequenceNumber, "
            "ownerSwitchesSinceCheckpoint, parentShardId, streamArn, shardId, tableName, millisBehindLatest, "
            "moveCheckpoint, moveRequestId, moveRequestedBy, moveRequestedAt, versionFloor, versionHigh, "
            "startingSequenceNumber, retainedSince")
_MOVE_COLUMNS = "moveCheckpoint, moveRequestId, moveRequestedBy, moveRequestedAt"


def _move(row) -> MoveRequest | None:
    """(moveCheckpoint, moveRequestId, moveRequestedBy, moveRequestedAt) → MoveRequest or None."""
    if not row or row[0] is None or row[1] is None:
        return None
    return MoveRequest(checkpoint=row[0], request_id=row[1], requested_by=row[2] or "", requested_at=row[3] or "")


class SQLiteLeaseStore:
    """:class:`pipeline.checkpoint.LeaseStore` in the SQLite file ``path``; with ``namespace``,
    only that namespace's rows."""

    def __init__(self, path: str | Path, *, namespace: str = ""):
        if NAMESPACE_SEPARATOR in namespace:
            raise ValueError(f"a lease namespace cannot contain {NAMESPACE_SEPARATOR!r}: {namespace!r}")
        self.path = str(path)
        self.namespace = namespace
        self.prefix = f"{namespace}{NAMESPACE_SEPARATOR}" if namespace else ""
        self._local = threading.local()

    def in_namespace(self, namespace: str = "") -> "SQLiteLeaseStore":
        """The same file seen through another namespace ("" = the live consumer's)."""
        return SQLiteLeaseStore(self.path, namespace=namespace)

    def _where_mine(self, column: str) -> tuple[str, tuple]:
        """SQL condition (and parameters) selecting this namespace's rows by ``column``."""
        if self.prefix:
            return f"substr({column}, 1, ?) = ?", (len(self.prefix), self.prefix)
        return f"instr({column}, ?) = 0", (NAMESPACE_SEPARATOR,)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
                self._enable_wal(conn)
                conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise CheckpointStoreError(f"cannot open checkpoint file {self.path}: {exc}; "
                                           "check checkpoints.sqlite_path") from None
            self._local.conn = conn
        return conn

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection, timeout_s: float = 10.0) -> None:
        """Switch to WAL mode. Several processes opening a brand-new file at once can get
        "database is locked" at once (the busy timeout does not cover this pragma), so retry with
        a short backoff until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _execute(self, sql: str, params=()) -> sqlite3.Cursor:
        """Run one statement; SQLite errors (locked file, missing table) become CheckpointStoreError."""
        try:
            return self._conn().execute(sql, params)
        except sqlite3.Error as exc:
            raise CheckpointStoreError(f"checkpoint file {self.path}: {exc}; check that no other program "
                                       "holds it locked and that checkpoints.sqlite_path is writable") from None

    def ensure_table(self) -> None:
        self._execute(_SCHEMA)
        self._execute(_WORKERS_SCHEMA)
        self._execute(_GAPS_SCHEMA)
        have = {row[1] for row in self._execute("PRAGMA table_info(leases)").fetchall()}
        for column in _ADDED_COLUMNS:
            if column.split()[0] not in have:
                try:
                    self._execute(f"ALTER TABLE leases ADD COLUMN {column}")
                except CheckpointStoreError as exc:
                    if "duplicate column" not in str(exc):  # another process added it first
                        raise
        have = {row[1] for row in self._execute("PRAGMA table_info(workers)").fetchall()}
        if "sinkLanes" not in have:  # added with per-sink lanes (issue 15)
            try:
                self._execute("ALTER TABLE workers ADD COLUMN sinkLanes TEXT")
            except CheckpointStoreError as exc:
                if "duplicate column" not in str(exc):
                    raise

    def _row_to_lease(self, row) -> Lease:
        parents = tuple(p for p in (row[6] or "").split(",") if p)
        return Lease(lease_key=row[0][len(self.prefix):], owner=row[1], counter=row[2], checkpoint=row[3],
                     sub_sequence_number=row[4], owner_switches_since_checkpoint=row[5],
                     parent_shard_ids=parents, stream_arn=row[7], shard_id=row[8], table=row[9],
                     behind_ms=row[10], move=_move(row[11:15]), version_floor=row[15], version_high=row[16],
                     starting_sequence_number=row[17], retained_since=row[18])

    def list_leases(self) -> list[Lease]:
        where, params = self._where_mine("leaseKey")
        rows = self._execute(f"SELECT {_COLUMNS} FROM leases WHERE {where} ORDER BY leaseKey", params).fetchall()
        return [self._row_to_lease(r) for r in rows]

    def get_lease(self, lease_key: str) -> Lease | None:
        row = self._execute(f"SELECT {_COLUMNS} FROM leases WHERE leaseKey = ?",
                            (self.prefix + lease_key,)).fetchone()
        return self._row_to_lease(row) if row else None

    def create_lease_if_absent(self, lease: Lease) -> bool:
        move = lease.move
        cur = self._execute(
            f"INSERT OR IGNORE INTO leases ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (self.prefix + lease.lease_key, lease.owner, lease.counter, lease.checkpoint, lease.sub_sequence_number,
             lease.owner_switches_since_checkpoint, ",".join(lease.parent_shard_ids) or None,
             lease.stream_arn, lease.shard_id, lease.table, lease.behind_ms,
             move.checkpoint if move else None, move.request_id if move else None,
             move.requested_by if move else None, move.requested_at if move else None,
             lease.version_floor, lease.version_high, lease.starting_sequence_number, lease.retained_since))
        return cur.rowcount == 1

    def _update(self, old: Lease, new: Lease, *, clear_move_id: str | None = None,
                clear_head: bool = False) -> Lease:
        """One conditional UPDATE; returns ``new`` with the move request as stored afterwards.
        With ``clear_move_id``: also conditional on that request id, and clears the request. With
        ``clear_head``: clears startingSequenceNumber and retainedSince (:func:`keeps_head_check`)."""
        if clear_head:
            new = new.with_(starting_sequence_number=None, retained_since=None)
        owner_clause = "leaseOwner IS NULL" if old.owner is None else "leaseOwner = ?"
        params = [new.owner, new.counter, new.checkpoint, new.sub_sequence_number,
                  new.owner_switches_since_checkpoint, new.behind_ms, new.version_floor, new.version_high,
                  self.prefix + old.lease_key, old.counter]
        if old.owner is not None:
            params.append(old.owner)
        move_set = move_where = ""
        if clear_head:
            move_set = ", startingSequenceNumber = NULL, retainedSince = NULL"
        if clear_move_id is not None:
            move_set += ", moveCheckpoint = NULL, moveRequestId = NULL, moveRequestedBy = NULL, moveRequestedAt = NULL"
            if clear_move_id:
                move_where = " AND moveRequestId = ?"
                params.append(clear_move_id)
        rows = self._execute(
            "UPDATE leases SET leaseOwner = ?, leaseCounter = ?, checkpoint = ?, checkpointSubSequenceNumber = ?, "
            f"ownerSwitchesSinceCheckpoint = ?, millisBehindLatest = ?, versionFloor = COALESCE(?, versionFloor), "
            f"versionHigh = COALESCE(?, versionHigh){move_set} "
            f"WHERE leaseKey = ? AND leaseCounter = ? AND {owner_clause}{move_where} RETURNING {_MOVE_COLUMNS}",
            params).fetchall()
        if len(rows) != 1:
            raise LeaseLostError(f"lease {old.lease_key} was changed by another worker "
                                 f"(expected owner {old.owner!r}, counter {old.counter})")
        return new.with_(move=_move(rows[0]))

    # -- checkpoint moves -----------------------------------------------------------------------

    def request_move(self, lease_key: str, move: MoveRequest) -> Lease:
        rows = self._execute(
            "UPDATE leases SET moveCheckpoint = ?, moveRequestId = ?, moveRequestedBy = ?, moveRequestedAt = ? "
            f"WHERE leaseKey = ? RETURNING {_COLUMNS}",
            (move.checkpoint, move.request_id, move.requested_by, move.requested_at,
             self.prefix + lease_key)).fetchall()
        if len(rows) != 1:
            raise LeaseNotFoundError(f"no lease {lease_key} in checkpoint file {self.path}")
        return self._row_to_lease(rows[0])

    def set_checkpoint(self, lease: Lease, checkpoint: str) -> Lease:
        lease = lease.with_(owner=None)  # conditional on having no owner, whatever ``lease`` says
        return self._update(lease, lease.with_(counter=lease.counter + 1, checkpoint=checkpoint, sub_sequence_number=0,
                                               owner_switches_since_checkpoint=0, move=None), clear_move_id="",
                            clear_head=not keeps_head_check(checkpoint))

    def apply_move(self, lease: Lease, move: MoveRequest) -> Lease:
        return self._update(lease, lease.with_(counter=lease.counter + 1, checkpoint=move.checkpoint,
                                               sub_sequence_number=0, owner_switches_since_checkpoint=0, move=None),
                            clear_move_id=move.request_id, clear_head=not keeps_head_check(move.checkpoint))

    def take_lease(self, lease: Lease, owner: str) -> Lease:
        # KCL counts a switch only when another worker owned it (DynamoDBLeaseRefresher.takeLease)
        switches = lease.owner_switches_since_checkpoint + (1 if lease.owner is not None and lease.owner != owner else 0)
        return self._update(lease, lease.with_(owner=owner, counter=lease.counter + 1,
                                               owner_switches_since_checkpoint=switches))

    def renew_lease(self, lease: Lease, *, behind_ms: int | None = None) -> Lease:
        behind = lease.behind_ms if behind_ms is None else behind_ms
        return self._update(lease, lease.with_(counter=lease.counter + 1, behind_ms=behind))

    def checkpoint(self, lease: Lease, checkpoint: str, sub_sequence_number: int = 0, *,
                   behind_ms: int | None = None) -> Lease:
        behind = lease.behind_ms if behind_ms is None else behind_ms
        return self._update(lease, lease.with_(counter=lease.counter + 1, checkpoint=checkpoint,
                                               sub_sequence_number=sub_sequence_number,
                                               owner_switches_since_checkpoint=0, behind_ms=behind),
                            clear_head=not keeps_head_check(checkpoint))

    def release_lease(self, lease: Lease) -> Lease:
        return self._update(lease, lease.with_(owner=None, counter=lease.counter + 1))

    def delete_lease(self, lease: Lease) -> None:
        cur = self._execute("DELETE FROM leases WHERE leaseKey = ? AND leaseCounter = ?",
                            (self.prefix + lease.lease_key, lease.counter))
        if cur.rowcount != 1:
            raise LeaseLostError(f"lease {lease.lease_key} changed; not deleted")

    # -- worker announcements -------------------------------------------------------------------

    def announce_worker(self, info: WorkerInfo) -> None:
        self._execute(
            "INSERT INTO workers (workerId, host, pid, startedAt, heartbeatAt, leases, sinkLanes) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(workerId) DO UPDATE SET heartbeatAt = excluded.heartbeatAt, leases = excluded.leases, "
            "sinkLanes = excluded.sinkLanes",
            (self.prefix + info.worker_id, info.host, info.pid, info.started_at, info.heartbeat_at, info.leases,
             info.sink_lanes))

    def list_workers(self) -> list[WorkerInfo]:
        where, params = self._where_mine("workerId")
        rows = self._execute(f"SELECT workerId, host, pid, startedAt, heartbeatAt, leases, sinkLanes FROM workers WHERE {where} "
                             "ORDER BY workerId", params).fetchall()
        return [WorkerInfo(row[0][len(self.prefix):], *row[1:]) for row in rows]

    def remove_worker(self, worker_id: str) -> None:
        self._execute("DELETE FROM workers WHERE workerId = ?", (self.prefix + worker_id,))

    def drop_namespace(self) -> int:
        """Delete every row of this store's namespace; returns how many leases. Raises ValueError
        without a namespace (the live leases stay)."""
        if not self.prefix:
            raise ValueError("drop_namespace is only for a namespaced store (the live leases stay)")
        where_l, p = self._where_mine("leaseKey")
        count = self._execute(f"DELETE FROM leases WHERE {where_l}", p).rowcount
        self._execute(f"DELETE FROM workers WHERE {self._where_mine('workerId')[0]}", p)
        self._execute(f"DELETE FROM gaps WHERE {self._where_mine('gapId')[0]}", p)
        return count

    # -- recorded gaps --------------------------------------------------------------------------

    def record_gap(self, gap: Gap) -> None:
        self._execute(
            "INSERT INTO gaps (gapId, streamArn, tableName, shardId, lastCheckpoint, firstPositionAfter, detectedAt, "
            "policy, error) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(gapId) DO UPDATE SET "
            "firstPositionAfter = excluded.firstPositionAfter, policy = excluded.policy, error = excluded.error",
            (self.prefix + gap.gap_id, gap.stream_arn, gap.table, gap.shard_id, gap.last_checkpoint, gap.first_position_after,
             gap.detected_at, gap.policy, gap.error))

    def list_gaps(self) -> list[Gap]:
        where, params = self._where_mine("gapId")
        rows = self._execute("SELECT streamArn, tableName, shardId, lastCheckpoint, firstPositionAfter, detectedAt, "
                             f"policy, error FROM gaps WHERE {where} ORDER BY detectedAt", params).fetchall()
        return [Gap(*row) for row in rows]
