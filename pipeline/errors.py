"""Every error this project raises on purpose, in one tree. Each says what went wrong and what
to do; the CLI prints it as one line (exit 2 for a usage or configuration mistake, 1 for a
failure at run time). Plugins raise the sink errors.

::

    CdcError
    ├── ConfigError ................. bad configuration (exit 2)
    │   └── FilterPatternError ...... a sinks[].filter that is not a valid AWS event filter pattern
    ├── UsageError .................. a command asked for what it cannot do (exit 2)
    │   ├── CheckpointOperationError  ddb-cdc checkpoints: the move cannot be made as asked
    │   └── ReplayError ............. ddb-cdc replay: cannot start as asked
    ├── InputFileError .............. a file named on the command line is unreadable or malformed (exit 1)
    ├── InstallationError ........... another distribution installs pipeline/ or connectors/ (exit 2)
    ├── DecodeError ................. a record cannot be decoded (dead-lettered, the shard goes on)
    ├── SinkError ................... raised by sinks from write / flush
    │   ├── RetriableSinkError ...... retried with backoff
    │   ├── PermanentSinkError ...... dead-lettered
    │   ├── FatalSinkError .......... the shard stops
    │   └── PartialSinkError ........ some events of a batch failed
    ├── DeliveryAborted ............. shutdown during delivery: nothing is checkpointed
    │   └── SinkFenced
    ├── LeaseLostError .............. another worker owns the lease now
    ├── CheckpointStoreError ........ the lease table / SQLite store cannot be used
    │   ├── LeaseNotFoundError
    │   └── TransientCheckpointStoreError (also a TransientError)
    ├── SourceError ................. the stream cannot be read
    │   ├── IteratorExpiredError
    │   ├── TrimmedDataError ........ a position behind the trim horizon: a gap
    │   │   └── ShardVanishedError
    │   ├── ShardNotFoundError
    │   └── TransientSourceError (also a TransientError)
    │       └── ThrottledError
    ├── TransientError .............. 5xx, throttling, timeouts: retried, shown in /readyz
    ├── ArchiveError ................ the S3 archive cannot be listed or read
    ├── ReindexError ................ ddb-cdc opensearch reindex cannot go on
    ├── MappingSpecError (also a ValueError): an OpenSearch mapping spec that cannot be used
    ├── WorkloadError ............... ddb-cdc workload cannot write
    ├── DemoError ................... a step of ddb-cdc demo failed
    ├── LambdaEventError ............ a Lambda invocation whose event is not this table's stream event
    ├── LambdaBatchError ............ a Lambda batch failure that batchItemFailures cannot name
    ├── SnapshotError ............... a snapshot cannot go on (scan, export layout, progress)
    │   └── SnapshotThrottledError (also a TransientError): backed off, the page retried
    └── EmbeddedServerError ......... an embedded stand-in server could not start
        └── ServiceNotInstalledError

``tests/test_layout.py`` checks that ``__all__`` lists every class defined here, and no error
class of the project is defined anywhere else.
"""

from __future__ import annotations

from typing import Sequence, TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.events import ChangeEvent

__all__ = [
    "CdcError",
    "ConfigError",
    "UsageError",
    "InputFileError",
    "InstallationError",
    "FilterPatternError",
    "LambdaEventError",
    "LambdaBatchError",
    "SnapshotError",
    "SnapshotThrottledError",
    "DecodeError",
    "SinkError",
    "RetriableSinkError",
    "PermanentSinkError",
    "FatalSinkError",
    "PartialSinkError",
    "LeaseLostError",
    "CheckpointStoreError",
    "LeaseNotFoundError",
    "SourceError",
    "TransientError",
    "TransientSourceError",
    "TransientCheckpointStoreError",
    "IteratorExpiredError",
    "TrimmedDataError",
    "ShardNotFoundError",
    "ShardVanishedError",
    "ThrottledError",
    "DeliveryAborted",
    "SinkFenced",
    "CheckpointOperationError",
    "ReplayError",
    "ArchiveError",
    "ReindexError",
    "MappingSpecError",
    "WorkloadError",
    "DemoError",
    "EmbeddedServerError",
    "ServiceNotInstalledError",
]


class CdcError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(CdcError):
    """The configuration is invalid. ``problems`` holds one line per problem (where, what, how to fix)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class UsageError(CdcError):
    """A command was asked something it cannot do as asked — a bad flag value, an unknown shard or
    table, a refused combination of flags, an input file that cannot be read: nothing was changed;
    fix the command line (exit 2, like a :class:`ConfigError`)."""


class InputFileError(CdcError):
    """A file named on the command line (a checkpoint snapshot, a checkpoint file) cannot be read
    or is not what the command expects: nothing was changed; the message names the file and the
    problem (exit 1 — the input is wrong, not the command line)."""


class InstallationError(CdcError):
    """ddb-cdc's environment is broken — another installed distribution provides one of its
    top-level packages (``pipeline``, ``connectors``): install it in an environment of its own
    (exit 2: nothing ran, a restart cannot help)."""


class DecodeError(CdcError):
    """A stream record or AttributeValue cannot be decoded; the record goes to the dead-letter destination."""


class SinkError(CdcError):
    """Base of errors a sink raises from ``write``/``flush``; the subclass says what the fan-out does."""


class RetriableSinkError(SinkError):
    """Transient failure (timeout, throttling, 5xx): the fan-out retries the batch with backoff."""


class PermanentSinkError(SinkError):
    """The events cannot be delivered as they are: they are dead-lettered with the error and position."""


class FatalSinkError(SinkError):
    """The sink cannot go on (bad credentials, missing bucket): the shard stops and the worker reports it."""


class PartialSinkError(SinkError):
    """Some events of a batch failed.

    ``retriable`` and ``permanent`` are lists of ``(event, reason)``; every other event of the batch
    was delivered. The fan-out retries the retriable ones and dead-letters the permanent ones.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: Sequence[tuple["ChangeEvent", str]] = (),
        permanent: Sequence[tuple["ChangeEvent", str]] = (),
    ):
        super().__init__(message)
        self.retriable = list(retriable)
        self.permanent = list(permanent)


class LeaseLostError(CdcError):
    """This worker no longer owns the lease (a conditional write failed); stop reading the shard."""


class CheckpointStoreError(CdcError):
    """The checkpoint / lease store cannot be reached or used; check its endpoint and permissions."""


class LeaseNotFoundError(CheckpointStoreError):
    """No lease with that key (or shard) is in the store; `ddb-cdc checkpoints list` shows the leases."""


class SourceError(CdcError):
    """The stream cannot be read (no stream on the table, access denied, unknown ARN)."""


class TransientError(CdcError):
    """A dependency call failed in a way that passes (HTTP 5xx, throttling, read timeout, reset or
    refused connection) after the client's own retries: retry it with backoff; only its duration
    matters (the worker reports it in metrics and ``/readyz``). ``operation`` names the call
    (``get_records``, ``describe_stream``, ``checkpoint`` …). Errors that cannot pass (access
    denied, resource gone, validation) are the plain :class:`SourceError` /
    :class:`CheckpointStoreError` instead."""

    def __init__(self, message: str, *, operation: str = ""):
        super().__init__(message)
        self.operation = operation


class TransientSourceError(SourceError, TransientError):
    """DynamoDB / DynamoDB Streams failed transiently (see :class:`TransientError`)."""


class TransientCheckpointStoreError(CheckpointStoreError, TransientError):
    """The lease table failed transiently (see :class:`TransientError`); a conditional-write
    failure is never this (it is :class:`LeaseLostError`)."""


# -- the stream source (pipeline.source) ---------------------------------------------------------


class IteratorExpiredError(SourceError):
    """The shard iterator is older than 15 minutes; get a new one after the last processed record."""


class TrimmedDataError(SourceError):
    """The requested position is behind the stream's trim horizon (older than 24 hours): a gap."""


class ShardNotFoundError(SourceError):
    """The shard is no longer in the stream (trimmed away or the stream was deleted)."""


class ShardVanishedError(TrimmedDataError):
    """A shard left the stream before it was read to SHARD_END: its unread records are lost."""


class ThrottledError(TransientSourceError):
    """GetRecords / GetShardIterator was throttled (LimitExceededException: too many readers on the
    shard or too many calls) after botocore's own retries; back off and call again (transient, but
    not an outage: it does not make the worker "degraded")."""


# -- delivery (pipeline.runtime.fanout) ------------------------------------------------------------


class DeliveryAborted(CdcError):
    """Delivery stopped before every sink had the batch (shutdown during retries); do not checkpoint."""


class SinkFenced(DeliveryAborted):
    """A sink call was refused because shutdown fenced the sinks off (:meth:`SinkRunner.fence`):
    the worker's grace period ran out while this shard thread was still delivering. Like any
    :class:`DeliveryAborted`, the batch (or flush) did not reach every sink, so nothing after the
    last checkpoint is checkpointed; the events are read again by the shard's next owner."""


# -- commands (checkpoints, replay, archive, reindex, mapping, workload, demo, embedded servers) ----


class CheckpointOperationError(UsageError):
    """A checkpoint command cannot be carried out as asked (unknown shard, bad target, bad file)."""


class ReplayError(UsageError):
    """A replay cannot start as asked (bad --from, unknown shard, unreadable file)."""


class ArchiveError(CdcError):
    """The S3 audit archive cannot be listed or read (missing bucket, no access, corrupt object):
    check the ``s3://`` URI, the S3 endpoint and the credentials."""


class ReindexError(CdcError):
    """The reindex cannot go on; the message says what to do (one line)."""


class MappingSpecError(CdcError, ValueError):
    """An OpenSearch mapping spec (``mapping``/``fields`` options) that cannot be used (a ValueError too,
    so pydantic reports it as an option error): bad path, unknown type, conflicting paths.
    Was: a field declaration that cannot be used (bad path, unknown type, conflicting paths)."""


class WorkloadError(CdcError):
    """The workload cannot be written (table missing, wrong key schema)."""


class DemoError(CdcError):
    """A step of the demo failed; the message is one line saying which and why."""


class EmbeddedServerError(CdcError):
    """An embedded server could not be started (or restarted); the message says why, in one line."""


class ServiceNotInstalledError(EmbeddedServerError):
    """A program the server needs (java, the DynamoDB Local jar, …) is missing; the message says how to install it."""


# -- configuration of sinks (pipeline.shaping) --------------------------------------------------


class FilterPatternError(ConfigError):
    """A ``sinks[].filter`` is not a valid AWS event filter pattern (or uses an operator ddb-cdc
    does not support); ``problems`` holds one line naming the bad part (``dynamodb.NewImage.x.S``)
    and how to fix it."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__([f"{where}: {message}" if where else message])


# -- the AWS Lambda handler (connectors.aws_lambda) ---------------------------------------------


class LambdaEventError(CdcError):
    """An AWS Lambda invocation's event is not a DynamoDB stream event (no ``Records`` list, no
    DynamoDB stream ``eventSourceARN``), or names a table the configuration's ``source`` does not:
    a misconfigured trigger, not bad data. The invocation fails (Lambda retries it); fix the event
    source mapping or ``source.table`` / ``source.tables``."""


class LambdaBatchError(CdcError):
    """A Lambda invocation could not deliver a record and cannot name it in batchItemFailures (it
    has no valid sequence number): the invocation fails as a whole, so Lambda retries the batch
    (and bisects it with BisectBatchOnFunctionError)."""


# -- snapshot and backfill (pipeline.snapshot) ---------------------------------------------------


class SnapshotError(CdcError):
    """A snapshot (initial load / backfill) cannot go on: the table cannot be scanned, an export
    is not in the DYNAMODB_JSON layout, or its progress cannot be stored. The message names the
    table or S3 object and the fix."""


class SnapshotThrottledError(SnapshotError, TransientError):
    """DynamoDB throttled a Scan (ProvisionedThroughputExceededException, ThrottlingException,
    RequestLimitExceeded) or failed transiently after the client's retries: the snapshot backs off
    and retries the same page, never gives up on it."""
