"""Checkpoint operations for operators: select leases, move checkpoints safely, export / import.

Used by ``ddb-cdc checkpoints list|export|import|set``. Nothing here edits a lease behind its
owner's back (see :mod:`pipeline.checkpoint`): a free lease is moved by a conditional write on
its counter; an owned one gets a move request that the owner applies at its next batch boundary.

Snapshot file (``export`` / ``import``), JSON::

    {"format": "ddb-cdc/checkpoints/v1", "exported_at": "2026-11-22T10:15:00+00:00",
     "exported_by": "alice@ops-host",
     "leases": [{"lease_key": "orders:2026-…:shardId-…", "table": "orders", "stream_arn": "arn:…",
                 "shard_id": "shardId-…", "checkpoint": "000…123" | "TRIM_HORIZON" | "LATEST" | "SHARD_END",
                 "parent_shard_ids": ["shardId-…"]}]}

Import restores each exported lease's checkpoint. Leases of an exported stream that are not in
the file were created after the export (new shards, which start at TRIM_HORIZON), so they are
moved to TRIM_HORIZON — every change after the exported positions is delivered again — except
ancestors of exported shards (finished before the export), which are left alone. Exported
leases that are gone from the store (a finished parent removed since) are created again.
Leases of streams that are not in the file are not touched.
"""

from __future__ import annotations

import getpass
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from pipeline.checkpoint import Lease, LeaseStore, MoveRequest, valid_checkpoint
from pipeline.errors import InputFileError, LeaseLostError, LeaseNotFoundError
from pipeline.lineage import ancestors
from pipeline.events import SHARD_END, TRIM_HORIZON
from pipeline.errors import CheckpointOperationError  # noqa: F401 (defined in the one error tree)

SNAPSHOT_FORMAT = "ddb-cdc/checkpoints/v1"



def default_requester() -> str:
    """``user@host`` of whoever runs the command (recorded with every move)."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def new_move(checkpoint: str, requested_by: str) -> MoveRequest:
    """A :class:`MoveRequest` with a fresh id and the current time. Raises CheckpointOperationError
    for a target that is not TRIM_HORIZON, LATEST or a sequence number."""
    if not valid_checkpoint(checkpoint):  # the AT_… forms come from exported snapshots of LATEST starts
        raise CheckpointOperationError(
            f"cannot move a checkpoint to {checkpoint!r}: use TRIM_HORIZON, LATEST, SHARD_END or a sequence number "
            "(digits)")
    return MoveRequest(checkpoint=checkpoint, request_id=uuid.uuid4().hex[:16], requested_by=requested_by,
                       requested_at=datetime.now(timezone.utc).isoformat())


@dataclass(frozen=True)
class MoveResult:
    """What happened to one lease: ``how`` is ``direct`` (free lease, written at once),
    ``requested`` (owned: the owner applies it at its next batch), ``created`` (lease re-created
    from a snapshot) or ``unchanged``."""

    lease: Lease
    to_checkpoint: str
    how: str
    request_id: str = ""


def select_leases(store: LeaseStore, *, shard: str | None = None, table: str | None = None,
                  all_leases: bool = False) -> list[Lease]:
    """The leases a ``set`` applies to: one shard (shard id or lease key), every lease of a
    table, or all. Raises CheckpointOperationError when nothing or an ambiguous shard matches."""
    leases = store.list_leases()
    if shard:
        found = [lease for lease in leases if shard in (lease.shard_id, lease.lease_key)]
        if table:
            found = [lease for lease in found if lease.table == table]
        if not found:
            raise CheckpointOperationError(f"no lease for shard {shard!r}; `ddb-cdc checkpoints list` shows them")
        if len(found) > 1:
            raise CheckpointOperationError(f"shard {shard!r} is in {len(found)} streams; name it by lease key: "
                                           + ", ".join(lease.lease_key for lease in found))
        return found
    if table:
        found = [lease for lease in leases if lease.table == table]
        if not found:
            raise CheckpointOperationError(f"no lease of table {table!r}; `ddb-cdc checkpoints list` shows them")
        return found
    if all_leases:
        return leases
    raise CheckpointOperationError("say which leases to move: --shard ID, --table NAME or --all")


def move_lease(store: LeaseStore, lease: Lease, checkpoint: str, *, requested_by: str,
               logger: Any = None) -> MoveResult:
    """Move one lease's checkpoint safely (see the module doc) and log it with who asked.

    Raises CheckpointOperationError for a bad target, LeaseNotFoundError if the lease vanished,
    CheckpointStoreError if the store cannot be reached.
    """
    move = new_move(checkpoint, requested_by)
    result: MoveResult | None = None
    if lease.owner is None:
        try:
            store.set_checkpoint(lease, checkpoint)
            result = MoveResult(lease, checkpoint, "direct")
        except LeaseLostError:
            pass  # taken (or changed) since it was read: ask its owner instead
    if result is None:
        store.request_move(lease.lease_key, move)
        result = MoveResult(lease, checkpoint, "requested", move.request_id)
    if logger is not None:
        logger.warning("checkpoint_move_requested" if result.how == "requested" else "checkpoint_moved",
                       table=lease.table, shard_id=lease.shard_id, owner=lease.owner,
                       from_checkpoint=lease.checkpoint, to_checkpoint=checkpoint,
                       requested_by=requested_by, request_id=result.request_id or move.request_id, how=result.how)
    return result


def wait_applied(store: LeaseStore, results: Iterable[MoveResult], timeout_s: float,
                 poll_s: float = 0.5) -> list[MoveResult]:
    """Wait until every ``requested`` move was applied by its owner (no request left on the
    lease, or a different one). Returns those still pending after ``timeout_s`` seconds."""
    pending = [r for r in results if r.how == "requested"]
    deadline = time.monotonic() + timeout_s
    while pending:
        still = []
        for r in pending:
            current = store.get_lease(r.lease.lease_key)
            if current is not None and current.move is not None and current.move.request_id == r.request_id:
                still.append(r)
        pending = still
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return pending


def export_snapshot(store: LeaseStore, *, exported_by: str) -> dict[str, Any]:
    """Every lease's position as a snapshot dict (module doc). A move still pending is exported
    as its target (the position the lease is about to have)."""
    leases = sorted(store.list_leases(), key=lambda lease: lease.lease_key)
    return {
        "format": SNAPSHOT_FORMAT,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "exported_by": exported_by,
        "leases": [{
            "lease_key": lease.lease_key, "table": lease.table, "stream_arn": lease.stream_arn,
            "shard_id": lease.shard_id,
            "checkpoint": lease.move.checkpoint if lease.move is not None else lease.checkpoint,
            "parent_shard_ids": list(lease.parent_shard_ids),
        } for lease in leases],
    }


def parse_snapshot(data: Any, where: str = "snapshot") -> list[Lease]:
    """The leases of a snapshot dict. Raises CheckpointOperationError naming what is wrong."""
    if not isinstance(data, Mapping) or data.get("format") != SNAPSHOT_FORMAT:
        raise InputFileError(f"{where} is not a checkpoint snapshot (expected \"format\": "
                                       f"\"{SNAPSHOT_FORMAT}\"; make one with `ddb-cdc checkpoints export`)")
    leases = []
    for i, entry in enumerate(data.get("leases") or []):
        try:
            checkpoint = str(entry["checkpoint"])
            if not valid_checkpoint(checkpoint):  # what `checkpoints export` writes, LATEST starts included
                raise ValueError(f"checkpoint {checkpoint!r}")
            leases.append(Lease(lease_key=str(entry["lease_key"]), table=str(entry["table"]),
                                stream_arn=str(entry["stream_arn"]), shard_id=str(entry["shard_id"]),
                                checkpoint=checkpoint,
                                parent_shard_ids=tuple(str(p) for p in entry.get("parent_shard_ids") or ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"{where}: lease #{i + 1} is malformed ({type(exc).__name__}: {exc})") from None
    return leases


@dataclass(frozen=True)
class ImportStep:
    """One lease of an import plan: ``action`` ``move``, ``create``, ``unchanged`` or ``untouched``
    (stream not in the file), with the target checkpoint and why."""

    lease: Lease
    target: str
    action: str
    why: str


def plan_import(store: LeaseStore, snapshot_leases: list[Lease]) -> list[ImportStep]:
    """What ``import`` will do to each lease (see the module doc); changes nothing."""
    current = {lease.lease_key: lease for lease in store.list_leases()}
    wanted = {lease.lease_key: lease for lease in snapshot_leases}
    streams = {lease.stream_arn for lease in snapshot_leases}
    steps: list[ImportStep] = []
    for key, snap in wanted.items():
        lease = current.get(key)
        if lease is None:
            steps.append(ImportStep(snap, snap.checkpoint, "create", "exported lease no longer in the store"))
        elif (lease.checkpoint == snap.checkpoint and lease.owner is None and lease.move is None):
            steps.append(ImportStep(lease, snap.checkpoint, "unchanged", "already at the exported position"))
        elif snap.checkpoint == SHARD_END and lease.finished and lease.move is None:
            steps.append(ImportStep(lease, snap.checkpoint, "unchanged", "finished then and now"))
        else:
            steps.append(ImportStep(lease, snap.checkpoint, "move", "exported position"))
    for arn in streams:
        parents = {lease.shard_id: lease.parent_shard_ids for lease in list(current.values()) + snapshot_leases
                   if lease.stream_arn == arn}
        exported = {lease.shard_id for lease in snapshot_leases if lease.stream_arn == arn}
        older = set().union(*(ancestors(s, parents) for s in exported)) if exported else set()
        for key, lease in current.items():
            if lease.stream_arn != arn or key in wanted:
                continue
            if lease.shard_id in older:
                steps.append(ImportStep(lease, lease.checkpoint, "unchanged", "ancestor of an exported shard"))
            elif lease.checkpoint == TRIM_HORIZON and lease.owner is None and lease.move is None:
                steps.append(ImportStep(lease, TRIM_HORIZON, "unchanged", "new since the export, not read yet"))
            else:
                steps.append(ImportStep(lease, TRIM_HORIZON, "move", "new since the export: read from its start"))
    for key, lease in current.items():
        if lease.stream_arn not in streams:
            steps.append(ImportStep(lease, lease.checkpoint, "untouched", "stream not in the file"))
    return sorted(steps, key=lambda step: step.lease.lease_key)


def apply_import(store: LeaseStore, steps: list[ImportStep], *, requested_by: str,
                 logger: Any = None) -> list[MoveResult]:
    """Carry out an import plan: create missing leases, move the others safely."""
    results = []
    for step in steps:
        if step.action == "create":
            if store.create_lease_if_absent(step.lease.with_(owner=None, counter=0)):
                results.append(MoveResult(step.lease, step.target, "created"))
                if logger is not None:
                    logger.warning("checkpoint_lease_restored", table=step.lease.table, shard_id=step.lease.shard_id,
                                   to_checkpoint=step.target, requested_by=requested_by)
                continue
            lease = store.get_lease(step.lease.lease_key)
            if lease is None:
                raise LeaseNotFoundError(f"lease {step.lease.lease_key} could neither be created nor read")
            results.append(move_lease(store, lease, step.target, requested_by=requested_by, logger=logger))
        elif step.action == "move":
            results.append(move_lease(store, step.lease, step.target, requested_by=requested_by, logger=logger))
        else:
            results.append(MoveResult(step.lease, step.target, "unchanged"))
    return results
