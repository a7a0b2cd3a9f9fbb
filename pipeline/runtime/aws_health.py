"""Transient AWS errors in the core: how long each dependency has been failing, and the retries.

A 1-2 minute AWS blip is routine. The connectors classify every failed call in one place
(:mod:`connectors.dynamodb_streams.errors`): an error that passes (HTTP 5xx, throttling, read
timeout, reset or refused connection) arrives here as a :class:`~pipeline.errors.TransientError`
and is retried with jittered exponential backoff (tenacity); only errors that cannot pass (access
denied, table or stream gone, validation) stop a shard or the worker.

Where each kind of call is retried, and the backoff caps (jittered exponential, seconds):

============================  ==================  =====================================================
call                          backoff             retried until
============================  ==================  =====================================================
GetRecords                    0.25 → 10           it passes, the worker stops or the lease is lost
                                                  (:class:`pipeline.runtime.shard_consumer.ShardConsumer`)
GetShardIterator              0.25 → 10           it passes or the worker stops (:class:`TrackedSource`)
DescribeStream (discovery)    1 → discovery       it passes; the main loop keeps renewing meanwhile
                              interval            (:class:`pipeline.runtime.worker.Worker`)
DescribeTable (start-up)      0.5 → 10            120 s, then exit 1 (connectors/dynamodb_streams/source.py)
lease table create (start-up) 0.5 → 10            120 s (:data:`STARTUP_RETRY_S`), then exit 1
lease renewal                 0.25 → renewal      the lease would have expired: ``failover_time_s``
                              interval            after the last write that succeeded, it is lost
checkpoint / checkpoint move  0.1 → 2             the same lease expiry (conditional failure = lease
                                                  lost: never retried)
============================  ==================  =====================================================

:class:`DependencyHealth` remembers, per dependency (``dynamodb_streams``, ``lease_table``) and
operation (``get_records``, ``list_shards``, ``renew_lease``, ``checkpoint`` …), since when its
calls have been failing transiently (the first failure after the last success of that operation;
throttling counts as neither). A dependency is failing while one of its operations is (so
DescribeStream answering does not hide GetRecords failing). Limit: operations are not told apart
by shard, so one shard's GetRecords succeeding resets the clock of another's failing. ``/readyz`` is not ready while one has been failing for longer than
``metrics.aws_unready_after_s`` (30 s); ``ddb_cdc_aws_failing_seconds{dependency}`` and
``ddb_cdc_aws_degraded`` show the same at scrape time; ``ddb_cdc_aws_transient_errors_total
{operation}`` counts the failures themselves.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from pipeline.errors import TransientError, TransientSourceError
from pipeline.source import ReadResult, ShardInfo, ThrottledError

#: The dependencies :class:`DependencyHealth` tracks.
STREAMS = "dynamodb_streams"
LEASE_TABLE = "lease_table"

#: Default of ``metrics.aws_unready_after_s``: ``/readyz`` is 503 while a dependency has been
#: failing for longer than this (s).
DEFAULT_UNREADY_AFTER_S = 30.0
#: Start-up calls (lease table creation) retry errors that pass for this long (s), then fail.
STARTUP_RETRY_S = 120.0
#: Backoff of reads (GetRecords, GetShardIterator): initial and cap, s.
READ_BACKOFF_INITIAL_S, READ_BACKOFF_MAX_S = 0.25, 10.0
#: Backoff of start-up calls: initial and cap, s.
STARTUP_BACKOFF_INITIAL_S, STARTUP_BACKOFF_MAX_S = 0.5, 10.0
#: Backoff of discovery (DescribeStream) in the main loop: initial, s (cap: the discovery interval).
DISCOVERY_BACKOFF_INITIAL_S = 1.0
#: Backoff of lease renewals: initial, s (cap: the renewal interval, failover_time_s / 3).
RENEWAL_BACKOFF_INITIAL_S = 0.25
#: Backoff of checkpoint writes: initial and cap, s (bounded by the lease's expiry).
CHECKPOINT_BACKOFF_INITIAL_S, CHECKPOINT_BACKOFF_MAX_S = 0.1, 2.0


def backoff_s(failures: int, initial_s: float, max_s: float) -> float:
    """The wait before the next try after ``failures`` (>= 1) failures in a row: tenacity's
    jittered exponential (``initial_s * 2**(failures-1)`` plus up to ``initial_s`` of jitter,
    capped at ``max_s``) — for loops that schedule a retry instead of sleeping for it."""
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, failures)
    return float(wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=initial_s)(state))


def is_outage(exc: BaseException) -> bool:
    """True for a transient error that says the dependency is failing (not throttling)."""
    return isinstance(exc, TransientError) and not isinstance(exc, ThrottledError)


class DependencyHealth:
    """Since when each dependency has been failing transiently (see module doc). Thread-safe.

    ``unready_after_s``: failing longer than this makes :meth:`ready_reasons` non-empty and
    :meth:`degraded` true. ``clock``: monotonic seconds.
    """

    def __init__(self, *, unready_after_s: float = DEFAULT_UNREADY_AFTER_S,
                 clock: Callable[[], float] = time.monotonic):
        self.unready_after_s = unready_after_s
        self.clock = clock
        self._lock = threading.Lock()
        self._failing_since: dict[tuple[str, str], float] = {}
        self._last_error: dict[tuple[str, str], str] = {}

    def succeeded(self, dependency: str, operation: str = "") -> None:
        """A call succeeded (or got an answer that is not a failure of the service)."""
        key = (dependency, operation)
        if key in self._failing_since:  # unlocked fast path: the common case is "not failing"
            with self._lock:
                self._failing_since.pop(key, None)
                self._last_error.pop(key, None)

    def failed(self, dependency: str, exc: BaseException, operation: str = "") -> None:
        """A call failed with ``exc``; only outages (:func:`is_outage`) count."""
        if not is_outage(exc):
            return
        with self._lock:
            self._failing_since.setdefault((dependency, operation), self.clock())
            self._last_error[(dependency, operation)] = str(exc)[:300]

    def failing_for(self) -> dict[str, float]:
        """Seconds each currently failing dependency has been failing (the longest of its failing
        operations; absent: not failing)."""
        now = self.clock()
        out: dict[str, float] = {}
        with self._lock:
            for (dep, _op), since in self._failing_since.items():
                out[dep] = max(out.get(dep, 0.0), max(0.0, now - since))
        return out

    def _worst(self, dependency: str) -> tuple[str, str]:
        """(operation, last error) of the operation of ``dependency`` failing the longest."""
        with self._lock:
            keys = sorted((since, op) for (dep, op), since in self._failing_since.items() if dep == dependency)
            if not keys:
                return "", ""
            op = keys[0][1]
            return op, self._last_error.get((dependency, op), "")

    def degraded(self) -> bool:
        """True while some dependency has been failing for longer than ``unready_after_s``."""
        return any(s > self.unready_after_s for s in self.failing_for().values())

    def ready_reasons(self) -> list[str]:
        """One line per dependency failing for longer than ``unready_after_s``."""
        reasons = []
        for dep, seconds in sorted(self.failing_for().items()):
            if seconds > self.unready_after_s:
                op, last = self._worst(dep)
                reasons.append(f"{dep} failing for {seconds:.0f} s ({op}; limit {self.unready_after_s:g} s; "
                               f"retrying with backoff): {last}")
        return reasons


class TrackedSource:
    """A :class:`~pipeline.source.StreamSource` that reports every call's outcome to a
    :class:`DependencyHealth` and retries GetShardIterator's transient errors (throttling included)
    with jittered exponential backoff (:data:`READ_BACKOFF_INITIAL_S` → :data:`READ_BACKOFF_MAX_S`)
    until it passes or ``stopping()`` is true (then the last error is raised).

    GetRecords and DescribeStream are not retried here: the shard consumer retries GetRecords
    (it gives its read-budget share back between attempts) and the worker's main loop schedules
    discovery again rather than block its lease renewals. Other attributes are the wrapped
    source's.
    """

    def __init__(self, source: Any, health: DependencyHealth, *, stopping: Callable[[], bool],
                 sleep: Callable[[float], Any], logger: Any = None):
        self.inner = source
        self.health = health
        self.stopping = stopping
        self.sleep = sleep
        self.log = logger

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _track(self, operation: str, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except TransientError as exc:
            self.health.failed(STREAMS, exc, operation)
            raise
        except Exception:
            self.health.succeeded(STREAMS, operation)  # the service answered (not an outage)
            raise
        self.health.succeeded(STREAMS, operation)
        return result

    def list_shards(self) -> list[ShardInfo]:
        return self._track("list_shards", self.inner.list_shards)

    def get_records(self, iterator: str, limit: int) -> ReadResult:
        return self._track("get_records", lambda: self.inner.get_records(iterator, limit))

    def get_iterator(self, shard_id: str, iterator_type: str, sequence_number: str | None = None) -> str:
        def before_sleep(state: RetryCallState) -> None:
            if self.log is not None:
                exc = state.outcome.exception() if state.outcome else None
                self.log.warning("get_shard_iterator_retry", shard_id=shard_id, attempt=state.attempt_number,
                                 error=str(exc),
                                 retry_in_s=round(state.next_action.sleep, 3) if state.next_action else None)

        for attempt in Retrying(retry=retry_if_exception_type(TransientSourceError),
                                wait=wait_exponential_jitter(multiplier=READ_BACKOFF_INITIAL_S, max=READ_BACKOFF_MAX_S,
                                                             jitter=READ_BACKOFF_INITIAL_S),
                                stop=lambda _state: self.stopping(), sleep=self.sleep,
                                before_sleep=before_sleep, reraise=True):
            with attempt:
                return self._track("get_iterator",
                                   lambda: self.inner.get_iterator(shard_id, iterator_type, sequence_number))
        raise AssertionError("unreachable")  # pragma: no cover


class TrackedLeaseStore:
    """A :class:`~pipeline.checkpoint.LeaseStore` that reports every call's outcome to a
    :class:`DependencyHealth` (dependency ``lease_table``); no retries here (the lease coordinator
    and the worker decide them). Other attributes are the wrapped store's."""

    def __init__(self, store: Any, health: DependencyHealth):
        self.inner = store
        self.health = health

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name.startswith("_") or not callable(value):
            return value
        health = self.health

        def tracked(*args: Any, **kwargs: Any) -> Any:
            try:
                result = value(*args, **kwargs)
            except TransientError as exc:
                health.failed(LEASE_TABLE, exc, name)
                raise
            except Exception:
                health.succeeded(LEASE_TABLE, name)  # answered: a conditional failure is not an outage
                raise
            health.succeeded(LEASE_TABLE, name)
            return result

        return tracked


def retry_startup(call: Callable[[], Any], *, what: str, stopping: Callable[[], bool], sleep: Callable[[float], Any],
                  logger: Any, retry_s: float = STARTUP_RETRY_S) -> Any:
    """Run a start-up ``call``, retrying its transient errors with jittered exponential backoff
    (:data:`STARTUP_BACKOFF_INITIAL_S` → :data:`STARTUP_BACKOFF_MAX_S`) for ``retry_s`` seconds or
    until ``stopping()``; then the last error is raised. ``what`` names the call in the log line
    ``startup_call_retry``."""
    started = time.monotonic()

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning("startup_call_retry", call=what, attempt=state.attempt_number, error=str(exc),
                       retry_in_s=round(state.next_action.sleep, 2) if state.next_action else None,
                       gives_up_after_s=retry_s)

    for attempt in Retrying(retry=retry_if_exception_type(TransientError),
                            wait=wait_exponential_jitter(multiplier=STARTUP_BACKOFF_INITIAL_S, max=STARTUP_BACKOFF_MAX_S,
                                                         jitter=STARTUP_BACKOFF_INITIAL_S),
                            stop=lambda _s: stopping() or time.monotonic() - started >= retry_s,
                            sleep=sleep, before_sleep=before_sleep, reraise=True):
        with attempt:
            return call()
    raise AssertionError("unreachable")  # pragma: no cover
