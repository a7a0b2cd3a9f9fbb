"""The sink contract (DESIGN.md, "Contracts"), shared by built-in sinks and plugins.

A sink gets ``open(context)`` once, then ``write(batch)`` with one shard's events in sequence
order (never concurrently for the same shard, but possibly from several shard threads, so a sink
that keeps per-shard state keys it by ``batch.shard_id``), ``flush()`` before every checkpoint,
and ``close()`` at shutdown.

``reset_shard(table, shard_id)`` (optional; the base class's is a no-op): a new reader of that shard
is about to start — this worker took the shard's lease (or took it back after losing it), a
checkpoint move was applied, or the shard's reader restarted — and it reads again from the
shard's checkpoint. A sink that buffers per shard must drop what it holds for that shard and has not
made durable yet: those events are after the checkpoint (a checkpoint never passes an event some
sink has not flushed), so they are either sent again by the new reader or were made durable by the
worker that checkpointed past them. Keeping them would mix two ownership periods, with a hole
between them, in one unit of output. Called between batches of that shard, never during one.

Returning from ``flush`` means everything written so far is durable. Delivery is
at-least-once, so a sink must be idempotent: the same event twice gives the same end state.
Errors are typed (:mod:`pipeline.errors`): ``RetriableSinkError`` (retry with backoff),
``PartialSinkError`` (these events failed), ``PermanentSinkError`` (dead-letter),
``FatalSinkError`` (stop the shard).

A sink declares its options as a pydantic model in the class attribute ``Options``; the registry
validates the ``options`` mapping of the configuration against it before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from pipeline.events import Batch


class SinkOptions(BaseModel):
    """Base for a sink's options model: unknown keys are errors, so typos are caught at start-up;
    error messages never echo the input (it may hold passwords)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


@dataclass
class SinkContext:
    """What a sink gets at ``open``: its configured name, the worker id and a bound logger.

    ``aws`` is the worker's :class:`pipeline.awsconfig.AwsConfig` (region, credentials,
    endpoints) for sinks that talk to AWS. ``dead_letter`` is the worker's dead-letter destination (a :class:`pipeline.deadletter.DeadLetterQueue`),
    for sinks that want to report events themselves; most sinks just raise typed errors.
    """

    sink_name: str
    worker_id: str
    logger: Any
    aws: Any = None
    dead_letter: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SinkProtocol(Protocol):
    """Structural type of a sink; :class:`Sink` is the convenient base class."""

    name: str

    def open(self, context: SinkContext) -> None: ...

    def write(self, batch: Batch) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class Sink:
    """Base class with no-op defaults. Subclasses set ``Options`` and override ``write``.

    ``name`` is the configured sink name (unique in a configuration), ``options`` the validated
    instance of ``Options``.
    """

    Options: ClassVar[type[SinkOptions]] = SinkOptions

    def __init__(self, name: str, options: SinkOptions | None = None):
        self.name = name
        self.options = options if options is not None else self.Options()
        self.context: SinkContext | None = None

    def open(self, context: SinkContext) -> None:
        """Connect to the destination. Raise FatalSinkError if it cannot be used at all."""
        self.context = context

    def write(self, batch: Batch) -> None:  # pragma: no cover - overridden
        """Deliver (or buffer) one shard's batch of events, in order."""

    def flush(self) -> None:
        """Make everything written so far durable; return only when it is."""

    def reset_shard(self, table: str, shard_id: str) -> None:
        """A new reader of ``(table, shard_id)`` starts from the shard's checkpoint: drop
        per-shard state not yet made durable (see the module doc). No-op by default."""

    def close(self) -> None:
        """Release connections. Called once, after the last flush."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
