"""Deliver one shard's batch to every sink, in order, with retries and dead-lettering.

Per sink, per batch (DESIGN.md, "Contracts", Sink):

- ``RetriableSinkError`` (or any unexpected exception from a sink): retry the whole remaining
  batch with exponential backoff and jitter (tenacity), within ``retry_budget_s``;
- ``PartialSinkError``: dead-letter its permanent events; write again its retriable ones *with
  every later event of the batch*, in sequence order (:func:`resend_after_partial`: the per-shard
  order rule of :mod:`pipeline.sink`);
- ``PermanentSinkError``: dead-letter every event of the remaining batch;
- ``FatalSinkError``: re-raised; the shard stops.

Per sink, per flush (the rule is stated in :mod:`pipeline.sink`):

- ``RetriableSinkError`` (or any unexpected exception): flush again with backoff;
- ``PartialSinkError``: the named events are no longer in the sink — permanent ones are
  dead-lettered, retriable ones are written again together with every later event of their
  shard given to the sink since its last successful flush (:func:`resend_after_partial`; the
  write rules above) and the sink is flushed again, with backoff. Only events of shards still
  owned here: each is re-checked with the ownership check it was written under, and a shard
  whose lease was lost is left out (its new owner reads it again from the checkpoint);
- ``PermanentSinkError``: ``dead_letter`` abandons the unflushed events (below); ``block`` makes
  it a ``FatalSinkError`` (the shard stops);
- ``FatalSinkError``: re-raised.

When the budget is used up, ``on_failure`` decides: ``block`` (default) keeps retrying and so
holds the shard's checkpoint, logging every attempt; ``dead_letter`` dead-letters what is left and
goes on. For a flush, "what is left" is every event given to the sink since its last successful
flush: the fan-out keeps them (:class:`UnflushedEvents`), dead-letters them (those of shards
still owned here, each at most once) with the sink name and the last error, then calls the
sink's ``discard_unflushed()`` and lets the checkpoint move. A shutdown request ends the retries with :class:`DeliveryAborted`, so the
checkpoint does not move past undelivered events. Lease loss ends them with
:class:`~pipeline.errors.LeaseLostError` (``owns``, the shard reader's ownership check, is asked
before every attempt and during every backoff): a worker that no longer owns the shard writes
nothing more of it — ``block`` included — and cannot checkpoint (the write is conditional).

The checkpoint therefore never passes an event that is neither durable in every sink nor in the
dead-letter destination (or still to be re-read: a failed shard does not checkpoint).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, Sequence

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    stop_when_event_set,
    wait_exponential_jitter,
)

from pipeline import metrics
from pipeline.codec import version_high
from pipeline.deadletter import DeadLetterQueue, decode_entry, delivery_entry, utc_now
from pipeline.errors import (
    DecodeError,
    FatalSinkError,
    LeaseLostError,
    PartialSinkError,
    PermanentSinkError,
    RetriableSinkError,
    SinkError,
)
from pipeline.events import Batch, ChangeEvent, sequence_key
from pipeline.errors import DeliveryAborted, SinkFenced  # noqa: F401 (defined in the one error tree)

#: an ownership check: True while this worker holds the lease of the shard being delivered
Owns = Callable[[], bool]
#: retries of a write or a flush re-ask their ownership check at least this often (s)
OWNERSHIP_POLL_S = 0.5




@dataclass
class FailurePolicy:
    """How one sink's failures are handled.

    ``on_failure``: ``block`` (retry a write or a flush until it succeeds, holding the checkpoint)
    or ``dead_letter`` (after ``retry_budget_s`` seconds of retries of one write or one flush,
    dead-letter what is left: the rest of the batch, or every event given to the sink since its
    last successful flush). Backoff grows from ``initial_backoff_s`` to at most ``max_backoff_s``
    seconds, with jitter.
    """

    on_failure: str = "block"
    retry_budget_s: float = 300.0
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 20.0

    @classmethod
    def from_config(cls, sink_config: Any | None) -> "FailurePolicy":
        """The policy a sink's configuration (:class:`pipeline.config.SinkConfig`: ``on_failure``,
        ``retry_budget_s``, ``max_backoff_s``) asks for; the defaults for None (a sink that is
        not configured, e.g. one a test passes in)."""
        if sink_config is None:
            return cls()
        return cls(on_failure=sink_config.on_failure, retry_budget_s=sink_config.retry_budget_s,
                   max_backoff_s=sink_config.max_backoff_s)


@dataclass
class SinkStats:
    """Counters for one sink (exported as metrics by the worker)."""

    delivered: int = 0
    batches: int = 0
    retries: int = 0
    dead_lettered: int = 0
    flushes: int = 0


def _position(event: ChangeEvent) -> tuple[str, str, str]:
    """(table, shard id, sequence number): an event's identity, also for copies of it."""
    return (event.source.table, event.source.shard_id, event.sequence_number)


def resend_after_partial(given: Sequence[ChangeEvent], retriable: Sequence[ChangeEvent],
                         permanent: Sequence[ChangeEvent] = ()) -> list[ChangeEvent]:
    """What the fan-out writes again after a ``PartialSinkError`` (from ``write`` or ``flush``):
    per shard, every retriable event *and every later event of that shard in* ``given`` (sequence
    number at or above the shard's first retriable one), without the permanent ones; sorted by
    table, shard and sequence number, one event per position.

    ``given``: what the sink was given — the batch of the failed write, or everything written to
    the sink since its last successful flush. Re-sending the later events too keeps the per-shard
    order of the sink contract (:mod:`pipeline.sink`): whatever the sink applied of a later event
    before it is applied again after the retried one, so a sink never ends at change v1 of an item
    after it was given v2 (at-least-once allows the repeats). Events of ``given`` win over the
    sink's copies at the same position.
    """
    dropped = {_position(ev) for ev in permanent}
    first: dict[tuple[str, str], tuple] = {}
    for ev in retriable:
        shard, key = (ev.source.table, ev.source.shard_id), sequence_key(ev.sequence_number)
        if shard not in first or key < first[shard]:
            first[shard] = key
    out: dict[tuple[str, str, str], ChangeEvent] = {}
    for ev in (*given, *retriable):
        shard = (ev.source.table, ev.source.shard_id)
        if shard in first and sequence_key(ev.sequence_number) >= first[shard] and _position(ev) not in dropped:
            out.setdefault(_position(ev), ev)
    return sorted(out.values(), key=lambda ev: (ev.source.table, ev.source.shard_id, sequence_key(ev.sequence_number)))


class UnflushedEvents:
    """The events one sink accepted (``write`` returned for them) since its last successful flush,
    each with the ownership check of the write that gave it (``owns``, see
    :meth:`FanOut.deliver_to`; None: no lease).

    Kept by the fan-out for every sink: a partial flush writes its retriable events again with the
    later events of their shards from here (:func:`resend_after_partial`), and for an
    ``on_failure: dead_letter`` sink a flush that cannot succeed dead-letters them all
    (:meth:`FanOut.flush`) — in both cases only events whose ``owns`` still holds: a shard this
    worker no longer owns (in the period of ownership that wrote the event) is left to its new
    owner, who reads it again from the checkpoint. Bounded by the flushes: the worker
    flushes before every checkpoint (``source.checkpoint_interval_s``, any shard's checkpoint
    flushes every sink), so it holds about one checkpoint interval of every shard's events — the
    events a buffering sink holds anyway (references, not copies) — and more only while a flush is
    being retried. A shard's events are forgotten at once when a new reader of it starts
    (:meth:`forget_shard`: the sink's ``reset_shard``) or its reader detaches its lanes, and those
    of a lost lease at the next flush (:meth:`forget_unowned`). Thread-safe.

    Every :meth:`record` gets a rising serial number; :meth:`mark` taken before a flush and
    :meth:`forget_through` after it forget exactly the events accepted before that flush started
    (an event accepted again later, e.g. re-written, keeps its later serial).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._serial = 0
        self._events: dict[tuple[str, str, str], tuple[int, ChangeEvent, Owns | None]] = {}
        #: positions of recorded events the fan-out has dead-lettered already (not again at an abandon)
        self._dead_lettered: set[tuple[str, str, str]] = set()

    def record(self, events: Sequence[ChangeEvent], owns: Owns | None = None) -> None:
        """Note ``events`` as accepted by the sink and not yet flushed, written under ``owns``."""
        with self._lock:
            for event in events:
                self._serial += 1
                self._events[_position(event)] = (self._serial, event, owns)

    def mark(self) -> int:
        """The serial of the last event recorded so far (pass it to :meth:`forget_through`)."""
        with self._lock:
            return self._serial

    def forget_through(self, marker: int) -> None:
        """Forget the events recorded up to ``marker`` (they are durable or dead-lettered)."""
        with self._lock:
            self._keep(lambda item: item[0] > marker)

    def forget_shard(self, table: str, shard_id: str) -> None:
        """Forget every event of ``(table, shard_id)``: its reader ended or a new one starts from
        the shard's checkpoint, so they are read (and written) again or skipped on purpose (a
        checkpoint move) — never re-sent or dead-lettered from here."""
        with self._lock:
            self._keep(lambda item: (item[1].source.table, item[1].source.shard_id) != (table, shard_id))

    def forget_unowned(self) -> None:
        """Forget the events whose ownership check is False now (their shard's lease was lost).
        The checks are asked outside the lock, once per distinct check."""
        with self._lock:
            checks = {id(item[2]): item[2] for item in self._events.values() if item[2] is not None}
        lost = {key for key, owns in checks.items() if not owns()}
        if lost:
            with self._lock:
                self._keep(lambda item: item[2] is None or id(item[2]) not in lost)

    def note_dead_lettered(self, event: ChangeEvent) -> None:
        """The fan-out dead-lettered ``event``: if it is recorded, an abandoned flush does not
        dead-letter (and count) it again (entry ids are deterministic: the entry would be the same)."""
        with self._lock:
            if _position(event) in self._events:
                self._dead_lettered.add(_position(event))

    def snapshot(self) -> tuple[int, list[ChangeEvent]]:
        """(marker, the events recorded up to it, in the order they were recorded)."""
        marker, entries = self.entries()
        return marker, [ev for ev, _, _ in entries]

    def entries(self) -> tuple[int, list[tuple[ChangeEvent, Owns | None, bool]]]:
        """(marker, ``(event, owns, dead_lettered)`` for the events recorded up to it, in the order
        they were recorded; ``dead_lettered``: the fan-out dead-lettered it already)."""
        with self._lock:
            items = sorted(self._events.items(), key=lambda kv: kv[1][0])
            return self._serial, [(ev, owns, pos in self._dead_lettered) for pos, (_, ev, owns) in items]

    def _keep(self, keep: Callable[[tuple], bool]) -> None:
        """Keep only the entries for which ``keep((serial, event, owns))`` is true (lock held)."""
        self._events = {pos: item for pos, item in self._events.items() if keep(item)}
        self._dead_lettered &= self._events.keys()

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)


@dataclass
class SinkRunner:
    """One configured sink with its failure policy, a lock and a shutdown fence.

    Unless the sink class sets ``thread_safe = True``, calls from different shard threads are
    serialised by ``lock``, so a plugin never sees concurrent calls at all.

    Every ``write``/``flush`` goes through :meth:`call`, which counts the calls in progress. At
    shutdown the worker fences the runner (:meth:`fence`) — from then on :meth:`call` raises
    :class:`SinkFenced` instead of calling the sink — and closes the sink through
    :meth:`close_when_idle`, which never runs ``close()`` while a call is in progress: a sink
    still busy in a straggling shard thread is closed by that thread right after its call returns.
    """

    sink: Any
    policy: FailurePolicy = field(default_factory=FailurePolicy)
    stats: SinkStats = field(default_factory=SinkStats)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: events accepted since the sink's last successful flush
    unflushed: UnflushedEvents = field(default_factory=UnflushedEvents)
    #: (table, shard) → epoch s creation time of the oldest event of the batch being delivered
    pending_since: dict = field(default_factory=dict)
    _gate: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _in_flight: int = field(default=0, repr=False)
    _exclusive: int = field(default=0, repr=False)  # exclusive calls waiting or running
    _fenced: bool = field(default=False, repr=False)
    _closer: Callable[[], None] | None = field(default=None, repr=False)
    _close_state: str = field(default="open", repr=False)  # open → deferred → closed

    def age_s(self, now: float) -> float:
        """How far this sink is behind: now − creation time of the oldest change handed to it and
        not yet delivered; 0 when nothing is in delivery."""
        oldest = min(self.pending_since.values(), default=None)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    @property
    def name(self) -> str:
        return self.sink.name

    @property
    def in_flight(self) -> int:
        """Sink calls (``write``/``flush``) in progress right now."""
        with self._gate:
            return self._in_flight

    @property
    def fenced(self) -> bool:
        """True once :meth:`fence` was called: no new sink call starts."""
        with self._gate:
            return self._fenced

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (one call of the sink) under the sink's lock unless it is thread-safe.

        Raises :class:`SinkFenced` without calling ``fn`` once the runner is fenced (checked after
        the lock is taken, so a thread that waited for it behind a straggler is refused too);
        otherwise whatever ``fn`` raises.
        """
        if getattr(self.sink, "thread_safe", False):
            return self._gated(fn)
        with self.lock:
            return self._gated(fn)

    def exclusive(self, fn: Callable[[], Any]) -> Any:
        """Like :meth:`call`, but ``fn`` runs while no other call of this sink is in progress,
        even for a thread-safe sink: calls already running are waited for, new ones wait until
        ``fn`` returns. Used to take the unflushed events and discard the sink's buffer as one
        step (no write can slip in between). Raises :class:`SinkFenced` like :meth:`call`."""
        if getattr(self.sink, "thread_safe", False):
            return self._gated(fn, exclusive=True)
        with self.lock:
            return self._gated(fn, exclusive=True)

    def _gated(self, fn: Callable[[], Any], *, exclusive: bool = False) -> Any:
        with self._gate:
            if exclusive:
                self._exclusive += 1
                while self._in_flight and not self._fenced:
                    self._gate.wait()
            else:
                while self._exclusive and not self._fenced:
                    self._gate.wait()
            if self._fenced:
                if exclusive:
                    self._exclusive -= 1
                    self._gate.notify_all()
                raise SinkFenced(f"sink {self.name!r}: shutdown fenced the sinks off "
                                 "(grace period exceeded); the batch is not checkpointed")
            self._in_flight += 1
        closer = None
        try:
            return fn()
        finally:
            with self._gate:
                self._in_flight -= 1
                if exclusive:
                    self._exclusive -= 1
                    self._gate.notify_all()
                if self._in_flight == 0:
                    self._gate.notify_all()
                    if self._close_state == "deferred":
                        self._close_state, closer = "closed", self._closer
            if closer is not None:
                closer()  # the last straggling call returned: the sink can be closed now

    def fence(self) -> None:
        """Refuse every sink call from now on (:meth:`call` raises :class:`SinkFenced`). Calls in
        progress are not interrupted. Idempotent."""
        with self._gate:
            self._fenced = True
            self._gate.notify_all()  # calls waiting behind an exclusive one give up

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for the calls in progress to return; True when none is
        left. Only meaningful after :meth:`fence` (otherwise new calls may start at any time)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._gate:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._gate.wait(remaining)
            return True

    def close_when_idle(self, closer: Callable[[], None]) -> bool:
        """Fence the runner, then run ``closer`` (which closes the sink) now if no call is in
        progress — returns True — or else leave it to the thread whose call returns last (returns
        False: the sink is closed as soon as it is no longer in use, never while it is).
        ``closer`` runs at most once; it should not raise (exceptions propagate to whichever
        thread runs it)."""
        with self._gate:
            self._fenced = True
            self._gate.notify_all()
            if self._close_state != "open":
                return self._close_state == "closed"
            self._closer = closer
            if self._in_flight:
                self._close_state = "deferred"
                return False
            self._close_state = "closed"
        closer()
        return True


class _OwnershipNow:
    """Whether an event's shard is still owned, asked once per ownership check (one flush's answer
    is one moment's): ``owners`` maps an event's position to the check it was written under (None:
    no lease, owned). An event not in ``owners`` is not owned: the fan-out forgot it when its
    shard's reader ended or a new one started (a sink naming it has it from that earlier time)."""

    def __init__(self, owners: dict[tuple[str, str, str], Owns | None]):
        self._owners = owners
        self._answers: dict[int, bool] = {}

    def __call__(self, event: ChangeEvent) -> bool:
        pos = _position(event)
        if pos not in self._owners:
            return False
        check = self._owners[pos]
        if check is None:
            return True
        if id(check) not in self._answers:
            self._answers[id(check)] = bool(check())
        return self._answers[id(check)]


class _Remaining(RetriableSinkError):
    """Internal: some events are still to be delivered after this attempt."""


class _FlushRefused(SinkError):
    """Internal: a ``dead_letter`` sink's flush raised PermanentSinkError (not retried)."""


class FanOut:
    """Delivers batches to every sink and flushes them; see the module doc for the rules.

    ``stop_event`` set → retries end with :class:`DeliveryAborted`. ``logger`` is a structlog
    logger.
    """

    def __init__(self, runners: Sequence[SinkRunner], dead_letter: DeadLetterQueue, *,
                 stop_event: threading.Event, logger: Any):
        self.runners = list(runners)
        self.dead_letter = dead_letter
        self.stop_event = stop_event
        self.log = logger

    def deliver(self, batch: Batch, *, owns: Owns | None = None) -> None:
        """Give ``batch`` to every sink (each in turn). Raises FatalSinkError, DeliveryAborted, or
        LeaseLostError once ``owns()`` is False (see :meth:`deliver_to`)."""
        if not batch.events:
            return
        for runner in self.runners:
            self._deliver_to(runner, batch, owns)

    def deliver_to(self, runner: SinkRunner, batch: Batch, *, owns: Owns | None = None) -> None:
        """Give ``batch`` to one sink (``runner``, one of :attr:`runners`; a lane's thread calls
        this, :mod:`pipeline.runtime.lanes`) under the same rules as :meth:`deliver`.

        ``owns``: the shard reader's ownership check (True while this worker holds the shard's
        lease in the reader's period of ownership; None: no lease, e.g. Lambda). It is asked before
        every attempt and during every backoff (at least every :data:`OWNERSHIP_POLL_S` s): once
        False, the retries end with :class:`~pipeline.errors.LeaseLostError` and nothing more of the
        batch is written — another worker reads the shard from its checkpoint, and a write retried
        here later could land after its newer changes. Without this an ``on_failure: block`` sink
        was retried for ever by a worker that no longer owned the shard.

        Raises FatalSinkError, DeliveryAborted or LeaseLostError; each carries ``undelivered``, the
        tuple of the batch's events the sink had not taken when it stopped (in batch order; every
        earlier event is in the sink or in the dead-letter destination)."""
        if batch.events:
            self._deliver_to(runner, batch, owns)

    def flush_one(self, runner: SinkRunner, *, owns: Owns | None = None) -> None:
        """Flush one sink (as :meth:`flush` does for each). ``owns``: as for :meth:`deliver_to` —
        for a flush, whether any shard whose events it makes durable is still owned (the flush
        is retried while it holds). What a ``PartialSinkError`` leaves to write again (or an
        abandoned flush to dead-letter) is checked per shard instead, with the ownership check
        each event was written under (:class:`UnflushedEvents`): events of a shard whose lease
        was lost — or whose reader ended — are left out, neither written nor dead-lettered (its
        new owner reads them again from the checkpoint), and a re-write is retried only under its
        own shard's check, never under another shard's. Raises FatalSinkError, DeliveryAborted or
        LeaseLostError."""
        self._flush_runner(runner, owns)
        runner.stats.flushes += 1

    def reset_one(self, runner: SinkRunner, table: str, shard_id: str) -> None:
        """:meth:`reset_shard` for one sink; the fan-out forgets the shard's unflushed events of
        that sink too (:meth:`UnflushedEvents.forget_shard`), so no partial or abandoned flush
        re-sends or dead-letters what the new reader reads again — or what a checkpoint move skipped."""
        runner.unflushed.forget_shard(table, shard_id)
        reset = getattr(runner.sink, "reset_shard", None)
        if reset is None:
            return
        try:
            runner.call(lambda: reset(table, shard_id))
        except DeliveryAborted:
            raise
        except Exception as exc:  # noqa: BLE001 - best effort, see reset_shard
            self.log.warning("sink_reset_shard_failed", sink=runner.name, table=table, shard_id=shard_id,
                             error=f"{type(exc).__name__}: {exc}"[:500])

    def fence(self) -> None:
        """Refuse every further sink call of this fan-out (see :meth:`SinkRunner.fence`): a shard
        thread that reaches a sink afterwards gets :class:`SinkFenced` and does not checkpoint."""
        for runner in self.runners:
            runner.fence()

    def sink_ages(self, now: float) -> dict[str, float]:
        """Each sink's age in seconds (see :meth:`SinkRunner.age_s`)."""
        return {runner.name: runner.age_s(now) for runner in self.runners}

    def reset_shard(self, table: str, shard_id: str) -> None:
        """Tell every sink that has ``reset_shard`` (see :mod:`pipeline.sink`) that a new reader of
        the shard starts from its checkpoint. A sink's error is logged, not raised (the new reader
        re-sends the events anyway); raises DeliveryAborted when the sinks are fenced off."""
        for runner in self.runners:
            self.reset_one(runner, table, shard_id)

    def flush(self, *, owns: Owns | None = None) -> None:
        """Flush every sink; returns when every event given to a sink so far is durable in it or
        in the dead-letter destination (see the module doc for the rules).

        Raises FatalSinkError, DeliveryAborted or LeaseLostError (``owns``: see
        :meth:`deliver_to`); the checkpoint must not move then.
        """
        for runner in self.runners:
            self.flush_one(runner, owns=owns)

    def _flush_runner(self, runner: SinkRunner, owns: Owns | None = None) -> None:
        state: dict[str, Any] = {"first_failure": None, "attempts": 0, "last_error": ""}
        runner.unflushed.forget_unowned()  # a lost lease's events are its new owner's to write

        def attempt() -> None:
            state["attempts"] += 1
            # filled by a partial flush: what the sink was given since its last flush, with the
            # ownership check each event was written under
            given: list[tuple[ChangeEvent, Owns | None, bool]] = []
            try:
                runner.call(lambda: self._flush_call(runner, given))
            except PartialSinkError as exc:
                self._note_failure(state, exc)
                owners = {_position(ev): check for ev, check, _ in given}
                owned = _OwnershipNow(owners)
                for ev, reason in exc.permanent:
                    if owned(ev):
                        self._dead_letter(runner, ev, f"flush: {reason}", state)
                if exc.retriable:
                    resend = resend_after_partial([ev for ev, _, _ in given], [ev for ev, _ in exc.retriable],
                                                  [ev for ev, _ in exc.permanent])
                    kept = [ev for ev in resend if owned(ev)]
                    self._log_left_out(runner, [ev for ev in (*resend, *(e for e, _ in exc.permanent))
                                                if not owned(ev)])
                    self._rewrite(runner, kept, owners, owns)
                    raise _Remaining(f"{len(exc.retriable)} failed events and the later ones of their shards "
                                     f"({len(kept)}) written again, flushing again: {exc}") from exc
            except (FatalSinkError, DeliveryAborted):
                raise
            except PermanentSinkError as exc:
                self._note_failure(state, exc)
                if runner.policy.on_failure == "dead_letter":
                    raise _FlushRefused(str(exc)) from exc
                raise FatalSinkError(f"sink {runner.name!r} cannot flush: {exc}") from exc
            except RetriableSinkError as exc:
                self._note_failure(state, exc)
                raise
            except Exception as exc:  # a plugin bug or an unexpected library error: retry
                self._note_failure(state, exc)
                raise RetriableSinkError(f"flush: unexpected {type(exc).__name__}: {exc}") from exc

        try:
            self._retry(runner, None, attempt, what="flush", owns=owns)
        except _BudgetSpent:
            self._abandon_unflushed(runner, f"flush failed for {runner.policy.retry_budget_s:g} s "
                                            f"({state['attempts']} attempts): {state['last_error']}", state)
        except _FlushRefused:
            self._abandon_unflushed(runner, f"flush refused: {state['last_error']}", state)

    def _flush_call(self, runner: SinkRunner, given: list[ChangeEvent]) -> None:
        """One ``sink.flush()`` (run inside :meth:`SinkRunner.call`); the events accepted before it
        started are forgotten by the unflushed log when it returns — also with a PartialSinkError,
        whose named events the fan-out then handles itself: ``given`` then gets every event of the
        log first (what the sink was given since its last successful flush, for
        :func:`resend_after_partial`)."""
        log = runner.unflushed
        marker = log.mark()
        try:
            runner.sink.flush()
        except PartialSinkError:
            given.extend(log.entries()[1])
            log.forget_through(marker)
            raise
        log.forget_through(marker)

    def _rewrite(self, runner: SinkRunner, events: Sequence[ChangeEvent],
                 owners: dict[tuple[str, str, str], Owns | None], owns: Owns | None = None) -> None:
        """Write ``events`` (what a partial flush left to write again, :func:`resend_after_partial`;
        any shards, all still owned) again: one batch per shard, in sequence order, through the
        write rules (retries, dead-lettering). Each shard's batch is retried under the ownership
        check its events were first written under (``owners``: position → check; the flush's
        ``owns`` for events written without one) — never under another shard's: once its shard's
        lease is lost, that batch stops (nothing more of it is written) and the next one goes on."""
        groups: dict[tuple[str, str, str], dict[tuple[str, str, str], ChangeEvent]] = {}
        for ev in events:
            src = ev.source
            groups.setdefault((src.table, src.stream_arn, src.shard_id), {})[_position(ev)] = ev
        for (table, stream_arn, shard_id), by_pos in groups.items():
            ordered = sorted(by_pos.values(), key=lambda e: sequence_key(e.sequence_number))
            checks = list({id(c): c for c in (owners.get(pos) for pos in by_pos) if c is not None}.values())
            shard_owns = owns if not checks else (lambda checks=checks: all(check() for check in checks))
            try:
                self._deliver_batch(runner, Batch(table=table, stream_arn=stream_arn, shard_id=shard_id,
                                                  events=tuple(ordered),
                                                  checkpoint_sequence_number=ordered[-1].sequence_number),
                                    shard_owns)
            except LeaseLostError:
                if shard_owns is owns:
                    raise  # the flush's own check: the flush ends with it
                continue  # logged by _retry; the shard's new owner reads it from its checkpoint

    def _log_left_out(self, runner: SinkRunner, events: Sequence[ChangeEvent]) -> None:
        """Log the events of a partial flush left out because their shard is no longer owned here."""
        if events:
            self.log.warning("sink_resend_left_out", sink=runner.name, events=len(events),
                             shards=sorted({ev.source.shard_id for ev in events})[:20],
                             hint="their shard's lease was lost (or its reader ended): its new owner "
                                  "reads them again from the checkpoint; nothing of it is written here")

    def _abandon_unflushed(self, runner: SinkRunner, error: str, state: dict) -> None:
        """A ``dead_letter`` sink's flush cannot succeed: dead-letter every event it accepted since
        its last successful flush (of shards still owned here, and not dead-lettered already), then tell it to drop its buffer (``discard_unflushed``), as
        one step with no other call of the sink in between (:meth:`SinkRunner.exclusive`). A
        dead-letter write that fails raises before anything is discarded or forgotten."""

        def dead_letter_and_discard() -> int:
            marker, entries = runner.unflushed.entries()
            owned = _OwnershipNow({_position(ev): check for ev, check, _ in entries})
            # not again what the fan-out dead-lettered already; nothing of a shard no longer owned
            events = [ev for ev, _, done in entries if not done and owned(ev)]
            for ev in events:
                self._dead_letter(runner, ev, error, state)
            discard = getattr(runner.sink, "discard_unflushed", None)
            if callable(discard):
                try:
                    discard()
                except Exception as exc:  # the contract says it must not raise; keep going
                    self.log.warning("sink_discard_failed", sink=runner.name,
                                     error=f"{type(exc).__name__}: {exc}"[:500])
            runner.unflushed.forget_through(marker)
            return len(events)

        count = runner.exclusive(dead_letter_and_discard)
        self.log.error("sink_flush_abandoned", sink=runner.name, dead_lettered=count,
                       attempts=state.get("attempts", 0), error=error[:500],
                       hint="the sink's unflushed events are in the dead-letter destination; "
                            "redrive them with `ddb-cdc dlq redrive` once the sink is back")

    # -- internals ---------------------------------------------------------------------------

    def _deliver_to(self, runner: SinkRunner, batch: Batch, owns: Owns | None) -> None:
        key = (batch.table, batch.shard_id)
        created = next((ev.source.approximate_creation_time for ev in batch.events
                        if ev.source.approximate_creation_time is not None), None)
        runner.pending_since[key] = created.timestamp() if created is not None else time.time()
        started = time.monotonic()
        try:
            self._deliver_batch(runner, batch, owns)
        finally:
            runner.pending_since.pop(key, None)
            metrics.SINK_BATCHES.labels(sink=runner.name).inc()
            metrics.SINK_DELIVERY_SECONDS.labels(sink=runner.name).observe(time.monotonic() - started)

    def _deliver_batch(self, runner: SinkRunner, batch: Batch, owns: Owns | None = None) -> None:
        pending: list[ChangeEvent] = list(batch.events)
        state = {"first_failure": None, "attempts": 0, "last_error": ""}

        def attempt() -> None:
            nonlocal pending
            if not pending:
                return
            state["attempts"] += 1
            sub = replace(batch, events=tuple(pending))
            try:
                runner.call(lambda: self._write_call(runner, sub, owns))
            except PartialSinkError as exc:
                self._note_failure(state, exc)
                for ev, reason in exc.permanent:
                    self._dead_letter(runner, ev, reason, state)
                # the retriable events and every later one of the batch, in order (matched by
                # position, not identity, so a sink may report copies of events)
                resend = resend_after_partial(pending, [ev for ev, _ in exc.retriable],
                                              [ev for ev, _ in exc.permanent])
                failed = {_position(ev) for ev in resend} | {_position(ev) for ev, _ in exc.permanent}
                delivered = sum(1 for ev in pending if _position(ev) not in failed)
                runner.stats.delivered += delivered
                metrics.SINK_DELIVERED.labels(sink=runner.name).inc(delivered)
                pending = resend
                if pending:
                    raise _Remaining(f"{len(pending)} events to write again: {exc}") from exc
                return
            except PermanentSinkError as exc:
                self._note_failure(state, exc)
                for ev in pending:
                    self._dead_letter(runner, ev, str(exc), state)
                pending = []
                return
            except (FatalSinkError, DeliveryAborted):
                raise
            except RetriableSinkError as exc:
                self._note_failure(state, exc)
                raise
            except DecodeError as exc:
                # a lazily decoded image failed inside the sink (issue 16): its record is bad
                # input, not a sink failure — dead-letter it as a decode entry, deliver the rest
                self._note_failure(state, exc)
                undecodable = [(ev, ev.decode_error()) for ev in pending]
                undecodable = [(ev, err) for ev, err in undecodable if err is not None]
                if not undecodable:  # a sink's own DecodeError, not an image of the batch: retry
                    raise RetriableSinkError(f"unexpected {type(exc).__name__}: {exc}") from exc
                for ev, err in undecodable:
                    self._dead_letter_undecodable(runner, ev, err)
                bad = {id(ev) for ev, _ in undecodable}
                pending = [ev for ev in pending if id(ev) not in bad]
                if pending:
                    raise _Remaining(f"{len(pending)} events to write again after "
                                     f"{len(undecodable)} undecodable one(s)") from exc
                return
            except Exception as exc:  # a plugin bug or an unexpected library error: retry, never drop
                self._note_failure(state, exc)
                raise RetriableSinkError(f"unexpected {type(exc).__name__}: {exc}") from exc
            runner.stats.delivered += len(pending)
            metrics.SINK_DELIVERED.labels(sink=runner.name).inc(len(pending))
            pending = []

        try:
            self._retry(runner, batch, attempt, what="write", owns=owns)
        except (DeliveryAborted, FatalSinkError, LeaseLostError) as exc:
            # which events this sink has not taken: the Lambda handler reports them (and every
            # later record) as batchItemFailures (connectors.aws_lambda.delivery)
            if getattr(exc, "undelivered", None) is None:
                exc.undelivered = tuple(pending)
            raise
        except _BudgetSpent:
            for ev in pending:
                self._dead_letter(runner, ev, f"retry budget spent: {state['last_error']}", state)
            pending = []
        runner.stats.batches += 1

    def _write_call(self, runner: SinkRunner, sub: Batch, owns: Owns | None = None) -> None:
        """One ``sink.write(sub)`` (run inside :meth:`SinkRunner.call`); the events it accepted
        are recorded in the unflushed log (with ``owns``, the write's ownership check) before the
        call ends, so no flush or discard can run between the sink taking them and the fan-out
        knowing it."""
        log = runner.unflushed
        try:
            runner.sink.write(sub)
        except PartialSinkError as exc:
            failed = {_position(ev) for ev, _ in (*exc.retriable, *exc.permanent)}
            log.record([ev for ev in sub.events if _position(ev) not in failed], owns)
            raise
        log.record(sub.events, owns)

    def _retry(self, runner: SinkRunner, batch: Batch | None, fn: Callable[[], None], *, what: str,
               owns: Owns | None = None) -> None:
        """Run ``fn`` (one attempt of a write or a flush) under ``runner``'s policy. With ``owns``,
        each attempt first asks it and the backoff waits re-ask it: once False, LeaseLostError
        (no further attempt)."""
        policy = runner.policy
        state = {"attempts": 0}

        def guarded() -> None:
            if owns is not None and not owns():
                self.log.warning("sink_retry_lease_lost", sink=runner.name, operation=what,
                                 shard_id=batch.shard_id if batch else None, attempts=state["attempts"],
                                 hint="another worker owns the shard now and reads it from its checkpoint; "
                                      "nothing more of it is written here")
                raise LeaseLostError(f"sink {runner.name!r}: {what} stopped: the shard's lease was lost "
                                     f"(after {state['attempts']} attempt(s)); nothing more of it is written here")
            state["attempts"] += 1
            fn()

        started = time.monotonic()
        stop = stop_when_event_set(self.stop_event)
        if policy.on_failure == "dead_letter":
            stop = stop | stop_after_delay(policy.retry_budget_s)
        else:
            stop = stop | stop_never

        def before_sleep(retry_state) -> None:
            runner.stats.retries += 1
            metrics.SINK_RETRIES.labels(sink=runner.name).inc()
            if batch is not None:
                metrics.SINK_STALLED.labels(sink=runner.name, shard=batch.shard_id).set(time.monotonic() - started)
            exc = retry_state.outcome.exception() if retry_state.outcome else None
            self.log.warning(
                "sink_retry",
                sink=runner.name,
                operation=what,
                shard_id=batch.shard_id if batch else None,
                attempt=retry_state.attempt_number,
                stalled_s=round(time.monotonic() - started, 3),
                error=str(exc)[:500] if exc else None,
                on_failure=policy.on_failure,
            )

        retrying = Retrying(
            retry=retry_if_exception_type(RetriableSinkError),
            stop=stop,
            wait=wait_exponential_jitter(multiplier=policy.initial_backoff_s, max=policy.max_backoff_s,
                                         jitter=policy.initial_backoff_s),
            sleep=self._sleep if owns is None else (lambda seconds: self._sleep_while_owned(seconds, owns)),
            before_sleep=before_sleep,
            reraise=False,
        )
        try:
            retrying(guarded)
            if batch is not None:
                metrics.SINK_STALLED.labels(sink=runner.name, shard=batch.shard_id).set(0)
        except RetryError as exc:
            if self.stop_event.is_set():
                raise DeliveryAborted(f"sink {runner.name!r}: {what} interrupted by shutdown") from exc
            raise _BudgetSpent() from exc

    def _sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    def _sleep_while_owned(self, seconds: float, owns: Owns) -> None:
        """A backoff that ends early on shutdown or once ``owns()`` is False (asked every
        :data:`OWNERSHIP_POLL_S` s)."""
        deadline = time.monotonic() + seconds
        while owns():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stop_event.wait(min(remaining, OWNERSHIP_POLL_S)):
                return

    def _note_failure(self, state: dict, exc: BaseException) -> None:
        now = utc_now()
        if state["first_failure"] is None:
            state["first_failure"] = now
        state["last_failure"] = now
        state["last_error"] = f"{type(exc).__name__}: {exc}"[:2000]

    def _dead_letter_undecodable(self, runner: SinkRunner, event: ChangeEvent, error: BaseException) -> None:
        """Dead-letter an event whose image cannot be decoded as a ``decode`` entry holding its
        raw record (:meth:`ChangeEvent.raw_record`) — the entry the shard consumer would have
        written had the image been decoded at read time; its id does not name the sink, so
        every sink that meets the record rewrites the one entry."""
        src = event.source
        entry = decode_entry(event.raw_record(), table=src.table, stream_arn=src.stream_arn,
                             shard_id=src.shard_id, sequence_number=src.sequence_number,
                             error=f"{type(error).__name__}: {error}"[:4000],
                             version_floor=version_high(event.version))
        entry_id = self.dead_letter.put(entry)
        metrics.DECODE_ERRORS.labels(table=src.table).inc()
        self.log.error("record_decode_failed", sink=runner.name, shard_id=src.shard_id,
                       sequence_number=src.sequence_number, key_id=event.key_id,
                       error=str(error)[:500], dead_letter_id=entry_id, when="first access of an image")

    def _dead_letter(self, runner: SinkRunner, event: ChangeEvent, reason: str, state: dict) -> None:
        error = event.decode_error()
        if error is not None:  # a delivery entry holds the rendered event, which this one has not
            self._dead_letter_undecodable(runner, event, error)
            runner.unflushed.note_dead_lettered(event)
            runner.stats.dead_lettered += 1
            metrics.SINK_DEAD_LETTERED.labels(sink=runner.name).inc()
            return
        now = utc_now()
        first: datetime = state.get("first_failure") or now
        entry = delivery_entry(
            event,
            sink=runner.name,
            error=str(reason)[:4000],
            attempts=max(1, state.get("attempts", 1)),
            first_failure=first,
            last_failure=state.get("last_failure") or now,
        )
        entry_id = self.dead_letter.put(entry)
        runner.unflushed.note_dead_lettered(event)
        runner.stats.dead_lettered += 1
        metrics.SINK_DEAD_LETTERED.labels(sink=runner.name).inc()
        self.log.error(
            "event_dead_lettered",
            sink=runner.name,
            shard_id=event.source.shard_id,
            sequence_number=event.sequence_number,
            key_id=event.key_id,
            error=str(reason)[:500],
            dead_letter_id=entry_id,
        )


class _BudgetSpent(SinkError):
    """Internal: the retry budget of an ``on_failure: dead_letter`` sink is used up (a write or a flush)."""
