"""Deliver one shard's batch to every sink, in order, with retries and dead-lettering.

Per sink, per batch (DESIGN.md, "Contracts", Sink):

- ``RetriableSinkError`` (or any unexpected exception from a sink): retry the whole remaining
  batch with exponential backoff and jitter (tenacity), within ``retry_budget_s``;
- ``PartialSinkError``: dead-letter its permanent events, retry only its retriable ones;
- ``PermanentSinkError``: dead-letter every event of the remaining batch;
- ``FatalSinkError``: re-raised; the shard stops.

When the budget is used up, ``on_failure`` decides: ``block`` (default) keeps retrying and so
holds the shard's checkpoint, logging every attempt; ``dead_letter`` dead-letters what is left and
goes on. A shutdown request ends the retries with :class:`DeliveryAborted`, so the checkpoint does
not move past undelivered events.
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
from pipeline.deadletter import DeadLetterQueue, delivery_entry, utc_now
from pipeline.errors import (
    CdcError,
    FatalSinkError,
    PartialSinkError,
    PermanentSinkError,
    RetriableSinkError,
    SinkError,
)
from pipeline.events import Batch, ChangeEvent


class DeliveryAborted(CdcError):
    """Delivery stopped before every sink had the batch (shutdown during retries); do not checkpoint."""


class SinkFenced(DeliveryAborted):
    """A sink call was refused because shutdown fenced the sinks off (:meth:`SinkRunner.fence`):
    the worker's grace period ran out while this shard thread was still delivering. Like any
    :class:`DeliveryAborted`, the batch (or flush) did not reach every sink, so nothing after the
    last checkpoint is checkpointed; the events are read again by the shard's next owner."""


@dataclass
class FailurePolicy:
    """How one sink's failures are handled.

    ``on_failure``: ``block`` (retry until delivered, holding the checkpoint) or ``dead_letter``
    (after ``retry_budget_s`` seconds, dead-letter what is left). Backoff grows from
    ``initial_backoff_s`` to at most ``max_backoff_s`` seconds, with jitter.
    """

    on_failure: str = "block"
    retry_budget_s: float = 300.0
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 20.0


@dataclass
class SinkStats:
    """Counters for one sink (exported as metrics by the worker)."""

    delivered: int = 0
    batches: int = 0
    retries: int = 0
    dead_lettered: int = 0
    flushes: int = 0


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
    #: (table, shard) → epoch s creation time of the oldest event of the batch being delivered
    pending_since: dict = field(default_factory=dict)
    _gate: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _in_flight: int = field(default=0, repr=False)
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

    def _gated(self, fn: Callable[[], Any]) -> Any:
        with self._gate:
            if self._fenced:
                raise SinkFenced(f"sink {self.name!r}: shutdown fenced the sinks off "
                                 "(grace period exceeded); the batch is not checkpointed")
            self._in_flight += 1
        closer = None
        try:
            return fn()
        finally:
            with self._gate:
                self._in_flight -= 1
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
            if self._close_state != "open":
                return self._close_state == "closed"
            self._closer = closer
            if self._in_flight:
                self._close_state = "deferred"
                return False
            self._close_state = "closed"
        closer()
        return True


class _Remaining(RetriableSinkError):
    """Internal: some events are still to be delivered after this attempt."""


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

    def deliver(self, batch: Batch) -> None:
        """Give ``batch`` to every sink (each in turn). Raises FatalSinkError or DeliveryAborted."""
        if not batch.events:
            return
        for runner in self.runners:
            self._deliver_to(runner, batch)

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
            reset = getattr(runner.sink, "reset_shard", None)
            if reset is None:
                continue
            try:
                runner.call(lambda r=reset: r(table, shard_id))
            except DeliveryAborted:
                raise
            except Exception as exc:  # noqa: BLE001 - best effort, see the docstring
                self.log.warning("sink_reset_shard_failed", sink=runner.name, table=table, shard_id=shard_id,
                                 error=f"{type(exc).__name__}: {exc}"[:500])

    def flush(self) -> None:
        """Flush every sink; returns when all written events are durable everywhere.

        Raises FatalSinkError or DeliveryAborted.
        """
        for runner in self.runners:
            self._retry(runner, None, lambda r=runner: self._flush_once(r), what="flush")
            runner.stats.flushes += 1

    @staticmethod
    def _flush_once(runner: SinkRunner) -> None:
        """One flush attempt: retriable and unexpected errors are retried; a sink that reports a
        permanent error from flush cannot make written events durable, which is fatal."""
        try:
            runner.call(runner.sink.flush)
        except (FatalSinkError, RetriableSinkError, DeliveryAborted):
            raise
        except PermanentSinkError as exc:
            raise FatalSinkError(f"sink {runner.name!r} cannot flush: {exc}") from exc
        except Exception as exc:
            raise RetriableSinkError(f"flush: unexpected {type(exc).__name__}: {exc}") from exc

    # -- internals ---------------------------------------------------------------------------

    def _deliver_to(self, runner: SinkRunner, batch: Batch) -> None:
        key = (batch.table, batch.shard_id)
        created = next((ev.source.approximate_creation_time for ev in batch.events
                        if ev.source.approximate_creation_time is not None), None)
        runner.pending_since[key] = created.timestamp() if created is not None else time.time()
        started = time.monotonic()
        try:
            self._deliver_batch(runner, batch)
        finally:
            runner.pending_since.pop(key, None)
            metrics.SINK_BATCHES.labels(sink=runner.name).inc()
            metrics.SINK_DELIVERY_SECONDS.labels(sink=runner.name).observe(time.monotonic() - started)

    def _deliver_batch(self, runner: SinkRunner, batch: Batch) -> None:
        pending: list[ChangeEvent] = list(batch.events)
        state = {"first_failure": None, "attempts": 0, "last_error": ""}

        def attempt() -> None:
            nonlocal pending
            if not pending:
                return
            state["attempts"] += 1
            sub = replace(batch, events=tuple(pending))
            try:
                runner.call(lambda: runner.sink.write(sub))
            except PartialSinkError as exc:
                self._note_failure(state, exc)
                # match by position, not object identity, so a sink may report copies of events
                retry_positions = {(ev.source.shard_id, ev.sequence_number) for ev, _ in exc.retriable}
                for ev, reason in exc.permanent:
                    self._dead_letter(runner, ev, reason, state)
                delivered = max(0, len(pending) - len(exc.retriable) - len(exc.permanent))
                runner.stats.delivered += delivered
                metrics.SINK_DELIVERED.labels(sink=runner.name).inc(delivered)
                pending = [ev for ev in pending if (ev.source.shard_id, ev.sequence_number) in retry_positions]
                if pending:
                    raise _Remaining(f"{len(pending)} events to retry: {exc}") from exc
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
            except Exception as exc:  # a plugin bug or an unexpected library error: retry, never drop
                self._note_failure(state, exc)
                raise RetriableSinkError(f"unexpected {type(exc).__name__}: {exc}") from exc
            runner.stats.delivered += len(pending)
            metrics.SINK_DELIVERED.labels(sink=runner.name).inc(len(pending))
            pending = []

        try:
            self._retry(runner, batch, attempt, what="write")
        except _BudgetSpent:
            for ev in pending:
                self._dead_letter(runner, ev, f"retry budget spent: {state['last_error']}", state)
            pending = []
        runner.stats.batches += 1

    def _retry(self, runner: SinkRunner, batch: Batch | None, fn: Callable[[], None], *, what: str) -> None:
        policy = runner.policy
        started = time.monotonic()
        stop = stop_when_event_set(self.stop_event)
        if policy.on_failure == "dead_letter" and batch is not None:
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
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=False,
        )
        try:
            retrying(fn)
            if batch is not None:
                metrics.SINK_STALLED.labels(sink=runner.name, shard=batch.shard_id).set(0)
        except RetryError as exc:
            if self.stop_event.is_set():
                raise DeliveryAborted(f"sink {runner.name!r}: {what} interrupted by shutdown") from exc
            raise _BudgetSpent() from exc

    def _sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    def _note_failure(self, state: dict, exc: BaseException) -> None:
        now = utc_now()
        if state["first_failure"] is None:
            state["first_failure"] = now
        state["last_failure"] = now
        state["last_error"] = f"{type(exc).__name__}: {exc}"[:2000]

    def _dead_letter(self, runner: SinkRunner, event: ChangeEvent, reason: str, state: dict) -> None:
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
    """Internal: the retry budget of an ``on_failure: dead_letter`` sink is used up."""
