"""The sink contract (DESIGN.md, "Contracts"), shared by built-in sinks and plugins.

The contract at a glance (what the runtime relies on; details below):

=================  ==========================================================================
call               rule
=================  ==========================================================================
``open(ctx)``      once before any write; if it raises, the worker calls it *again* on the same
                   instance with backoff (1 s → 15 s) for ``worker.sink_open_timeout_s``, then
                   stops (exit 1). Replays, redrive and reindex open a fresh instance once.
``write(batch)``   one shard's events in sequence order; never two calls for the same shard at
                   once; calls for different shards come from different shard threads, serialised
                   by the fan-out unless the class sets ``thread_safe = True``. Keep per-shard
                   state keyed by ``batch.shard_id``. Events are frozen: do not mutate them.
``flush()``        before every checkpoint; returning means everything written before the call is
                   durable. The checkpoint never passes an event some sink has not flushed.
``reset_shard``    optional: a new reader of the shard starts from its checkpoint, or this
                   worker's reader of it ended (lease lost, SHARD_END, shutdown); drop what you
                   buffered for it and have not made durable.
``discard_...``    ``discard_unflushed()``, optional: the fan-out dead-lettered your unflushed
                   events after ``retry_budget_s``; drop your buffer. Must not raise.
``close()``        once, after the last call of every other method has returned — possibly from
                   another thread than the writes (the worker's main thread at shutdown).
=================  ==========================================================================

Errors (from ``write`` and ``flush``; :mod:`pipeline.errors`): ``RetriableSinkError`` and any
unexpected exception are retried with jittered backoff (``on_failure: block`` until it passes,
holding the checkpoint — or until this worker loses the shard's lease: then the retries end and
nothing more of that shard is written here; ``dead_letter`` for ``retry_budget_s``, then the events are
dead-lettered); ``PartialSinkError`` names the events that failed (``retriable`` ones are
written again *with every later event of the batch* — see "Order on retries" —, ``permanent``
ones dead-lettered, the events before the first retriable one counted delivered); ``PermanentSinkError``
dead-letters the batch (from ``flush``: see below); ``FatalSinkError`` stops the shard and the
worker exits 1. Delivery is at-least-once: the same event twice must give the same end state.

A sink gets ``open(context)`` once, then ``write(batch)`` with one shard's events in sequence
order (never concurrently for the same shard, but possibly from several shard threads, so a sink
that keeps per-shard state keys it by ``batch.shard_id``), ``flush()`` before every checkpoint,
and ``close()`` at shutdown.

``reset_shard(table, shard_id)`` (optional; the base class's is a no-op): a new reader of that shard
is about to start — this worker took the shard's lease (or took it back after losing it), a
checkpoint move was applied, or the shard's reader restarted — and it reads again from the
shard's checkpoint; it is also called when this worker's reader of the shard ends (its lease was
lost; after SHARD_END or at shutdown it may be, when nothing is left to drop), and before every
flush for a shard whose lease is lost, so a flush asked for by another shard does not make the lost
shard's buffer durable (an upload already running when the loss is noticed still completes). A sink that buffers per shard must drop what it holds for that shard and has not
made durable yet: those events are after the checkpoint (a checkpoint never passes an event some
sink has not flushed), so they are either sent again by the new reader or were made durable by the
worker that checkpointed past them. Keeping them would mix two ownership periods, with a hole
between them, in one unit of output. Called between batches of that shard, never during one.

Returning from ``flush`` means everything written before the call is durable. Delivery is
at-least-once, so a sink must be idempotent: the same event twice gives the same end state.

Order on retries (the one rule, :func:`pipeline.runtime.fanout.resend_after_partial`): a retry
never sends a shard's earlier event after its later ones without sending those again. After a
``PartialSinkError`` the fan-out writes again, per shard, the first retriable event *and every
later event of that shard* the sink was given — the rest of the batch (from ``write``), or every
later event of the shard written since the last successful flush (from ``flush``) — in sequence
order, before anything later of the shard is written; permanent ones are dead-lettered and left
out. So the last write of each event comes after the last write of every earlier event of its
shard, and a sink that applies writes in the order it gets them (a cache, a plain index) ends
at each item's last change. The price: later events the sink had already taken arrive again.

Ownership on retries: a flush serves every shard whose events the sink buffers, but what it
writes again is written only for shards this worker still owns, each under that shard's own
lease check — the one the events were first written under, never the check of the shard whose
checkpoint asked for the flush. Events of a shard whose lease was lost (or whose reader ended,
or which a new reader — ``reset_shard`` — reads again from its checkpoint) are left out of the
re-write and of an abandoned flush's dead letters (nothing of that shard is written after them,
so the order rule is untouched): its current owner reads them again from the checkpoint. A
fenced owner writes no event of the shard again and dead-letters none. (What the sink itself
buffered of the shard before the loss is not re-sent; a later ``flush`` of the sink may still
make it durable unless the sink dropped it.)
Errors are typed (:mod:`pipeline.errors`): ``RetriableSinkError`` (retry with backoff),
``PartialSinkError`` (these events failed), ``PermanentSinkError`` (dead-letter),
``FatalSinkError`` (stop the shard).

Errors from ``flush`` (the rule :class:`pipeline.runtime.fanout.FanOut` implements):

- ``RetriableSinkError`` (or any unexpected exception): the fan-out calls ``flush`` again with
  backoff. The sink keeps what it buffered, so the next ``flush`` tries it again.
- ``PartialSinkError``: every event written before the call is durable *except* the named ones,
  which the sink no longer holds (it reported and dropped them). ``permanent`` events are
  dead-lettered (full event, error, position) at once; ``retriable`` events are written again
  together with every later event of their shard written since the last successful flush
  ("Order on retries"; ``write`` with the normal write retries, one batch per shard in sequence
  order) and ``flush`` is called again, with backoff — both only for shards still owned here
  ("Ownership on retries"). A sink that did keep a named event, or the later ones, gets them
  twice (idempotent).
- ``PermanentSinkError``: the buffered events can never be made durable. ``on_failure:
  dead_letter`` dead-letters the events written since the last successful flush and calls
  ``discard_unflushed``; ``block`` stops the shard (``FatalSinkError``): nothing can unblock it.
- ``FatalSinkError``: the shard stops.

When the retries of a flush run out — only with ``on_failure: dead_letter``, after
``retry_budget_s`` seconds — the fan-out dead-letters every event it gave the sink since the
sink's last successful flush (it keeps those per sink, see :class:`pipeline.runtime.fanout.FanOut`;
not those of shards no longer owned here, and not again those it dead-lettered already, e.g.
when a write's budget ran out), with the sink name and the last error, then calls the sink's ``discard_unflushed()`` so the buffer is
not tried again, and the checkpoint moves. ``on_failure: block`` retries a flush until it
succeeds (or the worker shuts down, or loses the lease of every shard whose events it flushes),
holding the checkpoint.

``discard_unflushed()`` (optional; the base class's is a no-op, right for a sink whose ``write``
is already durable): drop everything buffered and not yet durable, for every shard; the events
are in the dead-letter destination by then. It must not raise. A buffering sink without it keeps
its buffer; a later successful flush then stores those events too — duplicates of the dead
letters, which at-least-once allows — and a flush that keeps failing is dead-lettered again
(entry ids are deterministic, so the same entries are rewritten, not added).

A sink declares its options as a pydantic model in the class attribute ``Options``; the registry
validates the ``options`` mapping of the configuration against it before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from pipeline.events import Batch

__all__ = [  # the public plugin API: tests/test_layout.py holds the list
    "SinkOptions",
    "SinkContext",
    "SinkProtocol",
    "Sink",
]


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
    #: True when the sink's per-change work reads only the events' wire form — the typed JSON of
    #: :meth:`~pipeline.events.ChangeEvent.typed_json_parts`, a few named attributes
    #: (``event.attributes``) — and never decodes whole images. When every sink of a worker says
    #: so, ``source.read_path: auto`` reads GetRecords bodies into checked structs
    #: (:mod:`pipeline.avwire`), which such sinks render fastest and whole-image decoding reads
    #: slower than plain dicts. False (the default) is always correct.
    renders_wire_form: bool = False

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

    def discard_unflushed(self) -> None:
        """Drop every buffered event that is not durable yet (all shards); called by the fan-out
        after it dead-lettered them because ``flush`` could not succeed (see the module doc).
        Must not raise. The default does nothing: right for sinks that buffer nothing."""

    def reset_shard(self, table: str, shard_id: str) -> None:
        """A new reader of ``(table, shard_id)`` starts from the shard's checkpoint, or this
        worker's reader of it ended: drop per-shard state not yet made durable (see the module
        doc). No-op by default."""

    def close(self) -> None:
        """Release connections. Called once, after the last flush."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
