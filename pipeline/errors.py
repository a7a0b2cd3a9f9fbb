"""Typed errors. Each says what went wrong and what to do; the CLI prints them as one line."""

from __future__ import annotations

from typing import Sequence, TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.events import ChangeEvent


class CdcError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(CdcError):
    """The configuration is invalid. ``problems`` holds one line per problem (where, what, how to fix)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


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


class SnapshotError(CdcError):
    """A snapshot (initial load / backfill) cannot go on: the table cannot be scanned, an export
    is not in the DYNAMODB_JSON layout, or its progress cannot be stored. The message names the
    table or S3 object and the fix."""


class SnapshotThrottledError(SnapshotError, TransientError):
    """DynamoDB throttled a Scan (ProvisionedThroughputExceededException, ThrottlingException,
    RequestLimitExceeded) or failed transiently after the client's retries: the snapshot backs off
    and retries the same page, never gives up on it."""
