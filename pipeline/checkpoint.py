"""Lease / checkpoint store protocol (DESIGN.md, "Contracts").

One lease per shard, with KCL's attribute names so operators who know the KCL can read the
table: ``leaseKey``, ``leaseOwner``, ``leaseCounter``, ``checkpoint``,
``checkpointSubSequenceNumber``, ``ownerSwitchesSinceCheckpoint``, ``parentShardId``.

Every write that matters is conditional: taking a lease is conditional on the counter (and owner)
this worker observed; renewing, checkpointing and releasing are conditional on ``leaseOwner`` and
``leaseCounter``, so a worker that lost its lease can never move a checkpoint. Each successful
write increments ``leaseCounter`` (as KCL's ``updateLease`` does).

The checkpoint is a sequence number or one of the sentinels TRIM_HORIZON, LATEST, SHARD_END.

Moving a checkpoint from outside (``ddb-cdc checkpoints set|import``) never edits a lease behind
its owner's back. A *free* lease (no owner) is written directly, conditional on its counter. An
owned lease gets a :class:`MoveRequest` (``moveCheckpoint``, ``moveRequestId``, ``moveRequestedBy``,
``moveRequestedAt``) written beside it without touching ``leaseCounter`` — so the owner's
conditional writes keep succeeding — and the owner sees the request in the lease returned by its
next renewal or checkpoint, then applies it at its next batch boundary with one conditional
write (owner, counter and request id) that sets the checkpoint and clears the request.

Namespaces. A store built with ``namespace="replay-…"`` keeps its leases, workers and gaps apart
from the live consumer's in the same table or file (stored keys are prefixed ``{namespace}#``;
``#`` cannot occur in a table name, stream label or shard id); the live consumer's store (no
namespace) never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from pipeline.events import LATEST, SHARD_END, TRIM_HORIZON

#: Separates a namespace from the lease key in stored keys (never part of a table name or shard id).
NAMESPACE_SEPARATOR = "#"


def lease_key_for(table: str, stream_arn: str, shard_id: str) -> str:
    """The lease key of one shard: ``{table}:{stream label}:{shard id}``.

    The stream label (the last part of the stream ARN, a timestamp) keeps the leases of a
    re-created stream apart from the old one's, as KCL's multi-stream lease keys do
    (``account:stream:creation-epoch:shardId``).
    """
    label = stream_arn.rsplit("/", 1)[-1]
    return f"{table}:{label}:{shard_id}"


#: A checkpoint of this form starts reading AT the sequence number (that record included); used
#: for the start of a replay (``--from sequence SHARD=SEQ``) and for a LATEST start pinned to
#: its first record (:meth:`pipeline.runtime.shard_consumer.ShardConsumer._pin_first_record`).
AT_SEQUENCE_PREFIX = "AT_SEQUENCE_NUMBER:"

#: A checkpoint of this form, ``AT_TIMESTAMP:<epoch s>``, is a LATEST start made concrete (see
#: :meth:`pipeline.runtime.shard_consumer.ShardConsumer._resolve_latest`): read from TRIM_HORIZON, do not deliver the records whose
#: ApproximateCreationDateTime lies before ``<epoch s>``, and deliver every record from the first one
#: at or after it on (and every record without a readable creation time). Written only by a live
#: worker, in place of LATEST, before it delivers anything from the shard.
AT_TIMESTAMP_PREFIX = "AT_TIMESTAMP:"


def valid_checkpoint(checkpoint: str) -> bool:
    """True for every checkpoint a lease can hold: a move target (:func:`valid_move_target`),
    ``AT_SEQUENCE_NUMBER:<digits>`` or ``AT_TIMESTAMP:<epoch s>`` (a LATEST start made concrete)."""
    if valid_move_target(checkpoint):
        return True
    if checkpoint.startswith(AT_SEQUENCE_PREFIX):
        rest = checkpoint[len(AT_SEQUENCE_PREFIX):]
        return rest.isascii() and rest.isdigit()
    if checkpoint.startswith(AT_TIMESTAMP_PREFIX):
        rest = checkpoint[len(AT_TIMESTAMP_PREFIX):]
        return rest.isascii() and rest.lstrip("-").isdigit()
    return False


def keeps_head_check(checkpoint: str) -> bool:
    """True when a lease written with ``checkpoint`` keeps what its head check needs
    (``startingSequenceNumber``, ``retainedSince``): LATEST and ``AT_TIMESTAMP:`` (a later reader still
    reads the shard from TRIM_HORIZON and must see whether records asked for were trimmed).

    Every other checkpoint write clears them, in both lease stores: a checkpoint past the shard's
    start (a sequence number, ``AT_SEQUENCE_NUMBER:``, SHARD_END) means the head was read and
    checked — it is never checked again, however much of it is trimmed later; a checkpoint set or
    moved to TRIM_HORIZON (``checkpoints set --to TRIM_HORIZON``, an import) asks for "the oldest
    record retained" (GetShardIterator TRIM_HORIZON — DynamoDB Streams API reference), so nothing
    older is asked for and a trimmed head is no gap."""
    return checkpoint == LATEST or checkpoint.startswith(AT_TIMESTAMP_PREFIX)


def valid_move_target(checkpoint: str) -> bool:
    """True for TRIM_HORIZON, LATEST, SHARD_END (skip the rest of the shard) or a sequence number
    (decimal digits, as DynamoDB gives them)."""
    return checkpoint in (TRIM_HORIZON, LATEST, SHARD_END) or (checkpoint.isascii() and checkpoint.isdigit())


@dataclass(frozen=True)
class MoveRequest:
    """A checkpoint move asked for from outside the owning worker.

    ``checkpoint``: the new position (TRIM_HORIZON, LATEST or a sequence number; reading resumes
    *after* a sequence number, as after any checkpoint); ``request_id``: unique per request (a
    newer request replaces an older one not yet applied); ``requested_by``: who asked (e.g.
    ``alice@ops-host``); ``requested_at``: ISO 8601 UTC.
    """

    checkpoint: str
    request_id: str
    requested_by: str
    requested_at: str


@dataclass(frozen=True)
class Lease:
    """One shard's lease record as the store holds it.

    ``counter`` is KCL's ``leaseCounter`` (incremented by every write), ``owner`` None when
    free, ``checkpoint`` a sequence number or a sentinel, ``parent_shard_ids`` the shard's parents
    (DynamoDB Streams gives at most one; KCL stores a set).
    """

    lease_key: str
    table: str
    stream_arn: str
    shard_id: str
    owner: str | None = None
    counter: int = 0
    checkpoint: str = "TRIM_HORIZON"
    sub_sequence_number: int = 0
    owner_switches_since_checkpoint: int = 0
    parent_shard_ids: tuple[str, ...] = ()
    #: how far the owner's reader is behind the stream, in ms (KCL's MillisBehindLatest idea):
    #: now − ApproximateCreationDateTime of the last record read, 0 when the last read was empty;
    #: written with every renewal and checkpoint, None until the first.
    behind_ms: int | None = field(default=None, compare=False)
    #: a checkpoint move waiting for the owner to apply it (see the module doc), or None
    move: MoveRequest | None = field(default=None, compare=False)
    #: ``versionFloor``: the shard's version floor (:func:`pipeline.codec.record_version`), fixed
    #: by its first reader from its parents' leases and stored with its first checkpoint; None
    #: until then
    version_floor: int | None = field(default=None, compare=False)
    #: ``versionHigh``: the highest version high part this shard delivered up to its checkpoint
    #: (its children's floors are computed from it); None before the first
    version_high: int | None = field(default=None, compare=False)
    #: ``startingSequenceNumber``: set for a shard that must be read from its first record (a
    #: child of a shard this lease table knows, or any shard found after the first sync; a replay's
    #: shard, see :func:`pipeline.replay.stream.checks_head`) and for a LATEST lease — its
    #: SequenceNumberRange.StartingSequenceNumber from DescribeStream. A reader from TRIM_HORIZON
    #: whose first record is later than it, or that reads none at all, may have lost a trimmed head
    #: (a gap: :func:`pipeline.runtime.shard_consumer.head_trimmed`). None: reading from the trim
    #: horizon is what was asked for (an ``AT_TIMESTAMP:`` checkpoint still checks its time).
    starting_sequence_number: str | None = field(default=None, compare=False)
    #: ``retainedSince`` (epoch s): with ``starting_sequence_number``, for a shard listed at the first
    #: sync of its stream (a child of a shard listed with it): only its records created at or after
    #: this time had to be delivered — the records retained when the worker first started, less a
    #: margin (:func:`pipeline.runtime.leases.first_sync_retained_since`); the head check counts them
    #: as it counts an ``AT_TIMESTAMP:`` time. None: every record from its StartingSequenceNumber on.
    retained_since: int | None = field(default=None, compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def finished(self) -> bool:
        """True once the shard was read to its end (checkpoint SHARD_END)."""
        return self.checkpoint == SHARD_END

    @property
    def needs_reader(self) -> bool:
        """True while the shard has something to do: not finished, or a move is waiting (a
        finished shard moved back must be taken again to apply and read it)."""
        return not self.finished or self.move is not None

    def with_(self, **changes) -> "Lease":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


class LeaseStore(Protocol):
    """Where leases and checkpoints live: a DynamoDB table (KCL layout) or a SQLite file.

    Methods that change a lease return the lease as stored afterwards and raise
    :class:`pipeline.errors.LeaseLostError` when the condition fails (someone else wrote the
    lease since it was read), :class:`pipeline.errors.CheckpointStoreError` when the store
    cannot be reached.
    """

    def ensure_table(self) -> None:
        """Create the table if absent and wait until it is usable."""

    def create_lease_if_absent(self, lease: Lease) -> bool:
        """Create ``lease`` unless one with its key exists; True if created."""

    def list_leases(self) -> list[Lease]:
        """Every lease in the store."""

    def get_lease(self, lease_key: str) -> Lease | None:
        """One lease, or None."""

    def take_lease(self, lease: Lease, owner: str) -> Lease:
        """Become the owner of ``lease``, conditional on the counter and owner in ``lease``.

        The lease returned by ``take_lease``, ``renew_lease`` and ``checkpoint`` carries the move
        request stored at that moment (``Lease.move``), so the owner learns of it.
        """

    def renew_lease(self, lease: Lease, *, behind_ms: int | None = None) -> Lease:
        """Increment the counter (and record ``behind_ms``), conditional on owner and counter."""

    def checkpoint(self, lease: Lease, checkpoint: str, sub_sequence_number: int = 0, *,
                   behind_ms: int | None = None) -> Lease:
        """Record a checkpoint, conditional on owner and counter; resets ownerSwitchesSinceCheckpoint.
        Also stores ``lease.version_floor`` and ``lease.version_high`` when they are not None."""

    def release_lease(self, lease: Lease) -> Lease:
        """Clear the owner, conditional on owner and counter, so another worker takes it at once."""

    def delete_lease(self, lease: Lease) -> None:
        """Remove a finished lease (conditional on counter)."""

    def request_move(self, lease_key: str, move: MoveRequest) -> Lease:
        """Store ``move`` on an existing lease (replacing any earlier request) without changing its
        counter, owner or checkpoint; returns the lease as stored. Raises LeaseNotFoundError."""

    def set_checkpoint(self, lease: Lease, checkpoint: str) -> Lease:
        """Move the checkpoint of a *free* lease directly, conditional on its counter and on having
        no owner; clears any move request. Raises LeaseLostError when it was taken meanwhile."""

    def apply_move(self, lease: Lease, move: MoveRequest) -> Lease:
        """The owner applies ``move``: checkpoint := ``move.checkpoint``, request cleared,
        conditional on owner, counter and ``move.request_id``. Raises LeaseLostError otherwise
        (re-read the lease: a newer request may have replaced this one)."""

    def announce_worker(self, info: "WorkerInfo") -> None:
        """Create or refresh this worker's record (id, host, pid, start time, heartbeat)."""

    def list_workers(self) -> list["WorkerInfo"]:
        """Every announced worker (live or not: compare ``heartbeat_at`` with the failover time)."""

    def remove_worker(self, worker_id: str) -> None:
        """Remove a worker's record (graceful shutdown)."""

    def record_gap(self, gap: "Gap") -> None:
        """Store (or update, same ``gap.gap_id``) a recorded gap."""

    def list_gaps(self) -> list["Gap"]:
        """Every recorded gap, oldest first."""


@dataclass(frozen=True)
class Gap:
    """Records lost before this worker read them: the shard's checkpoint lay behind the stream's
    24-hour trim horizon (TrimmedDataAccessException) or the shard left the stream before it was
    read to SHARD_END.

    ``last_checkpoint``: the shard's checkpoint when the gap was found; ``first_position_after``:
    the sequence number of the first record read after it (``None`` while unknown, or when the
    shard was stopped / had vanished); ``detected_at``: ISO 8601 UTC; ``policy``: ``fail``
    (the shard stopped) or ``skip`` (reading went on from TRIM_HORIZON).
    """

    stream_arn: str
    table: str
    shard_id: str
    last_checkpoint: str
    first_position_after: str | None
    detected_at: str
    policy: str
    error: str = ""

    @property
    def gap_id(self) -> str:
        """Stable id of the gap: stream label, shard id and the checkpoint it starts from."""
        return f"{self.stream_arn.rsplit('/', 1)[-1]}:{self.shard_id}:{self.last_checkpoint}"


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's announcement: id, host, pid, start and last heartbeat as ISO 8601 UTC text,
    and how many leases it held at that heartbeat. ``sink_lanes``: the per-sink lanes of its shards at
    that heartbeat as compact JSON text (:func:`pipeline.runtime.lanes.encode_lane_status`; None:
    not reported), shown by ``ddb-cdc status``."""

    worker_id: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: str
    leases: int = 0
    sink_lanes: str | None = None
