"""A worker-wide bound on the GetRecords pages held in memory at once (``worker.max_pages_in_flight``).

A page costs memory from the moment its GetRecords response arrives (body, parsed records, change
events) until it has been delivered to every sink. Without a bound, a worker that is behind on all
its shards holds one full page per shard at the same time: 100 shards × 1,000 records of ~3 KB
peaked at ~2.5 GB RSS in ``python -m benchmarks --sections memory`` (BENCHMARKS.md, "Catch-up
memory"). One worker process decodes on one core, so a few pages at once keep it busy; more only
cost memory.

The budget is counted in records, ``pages × max_records_per_call``:

- a shard reader reserves its GetRecords ``Limit`` before each call — a full page, or only
  ``CAUGHT_UP_LIMIT`` (100) records when its last page was smaller than that, so the polls of
  caught-up shards hold little (:mod:`pipeline.runtime.shard_consumer`) — and waits (FIFO) while the budget
  is used up;
- as soon as the page arrives it gives back what the page did not fill — an empty read gives back
  everything, so a caught-up shard holds nothing while it waits between polls, and a small page
  (the low-latency case) holds only its few records while it is delivered;
- it gives back the rest once the page was delivered to every sink (or failed). With per-sink
  lanes (:mod:`pipeline.runtime.lanes`) the share goes into the lanes with the page and the sink
  thread that writes it last gives it back; lane threads never wait for the budget, so a reader
  waiting for a share always waits for progress that needs no share.

A reservation is never held across a throttling backoff, an idle wait, a flush + checkpoint or a
lease hand-off, and a wait for one ends when the worker stops, so the budget cannot deadlock with
them. A page held up by a sink that keeps failing (``on_failure: block``) keeps its share: its
records are still in memory.
"""

from __future__ import annotations

import collections
import threading

#: default ``worker.max_pages_in_flight``: pages per worker process (see the module doc)
DEFAULT_MAX_PAGES_IN_FLIGHT = 4


class ReadBudget:
    """At most ``capacity`` records fetched and not yet delivered, across every shard of a worker.

    ``pages`` (≥ 0) full pages of ``records_per_page`` (1–1,000, the GetRecords ``Limit``) records;
    ``pages=0`` means no bound (every :meth:`reserve` succeeds at once). Thread-safe; waiters are
    served in arrival order (a waiter that does not fit yet holds back those behind it, so a full
    page is never starved by smaller reservations). Raises ValueError for ``pages`` < 0 or
    ``records_per_page`` < 1.
    """

    def __init__(self, pages: int, records_per_page: int):
        if pages < 0:
            raise ValueError(f"pages must be >= 0, got {pages}")
        if records_per_page < 1:
            raise ValueError(f"records_per_page must be >= 1, got {records_per_page}")
        self.pages = pages
        self.records_per_page = records_per_page
        self.capacity = pages * records_per_page  # records; 0 = unbounded
        self._used = 0
        self._lock = threading.Lock()
        self._queue: collections.deque[_Waiter] = collections.deque()
        #: the largest number of records reserved at once so far, and of readers holding a share
        self.peak_records = 0
        self.holders = 0
        self.peak_holders = 0

    @property
    def bounded(self) -> bool:
        """False when ``pages`` is 0 (no bound)."""
        return self.capacity > 0

    @property
    def used(self) -> int:
        """Records reserved right now."""
        with self._lock:
            return self._used

    @property
    def waiting(self) -> int:
        """Readers waiting for a share right now."""
        with self._lock:
            return len(self._queue)

    def reserve(self, records: int, *, stop: threading.Event | None = None,
                poll_s: float = 0.1) -> "Reservation | None":
        """Reserve ``records`` (clamped to 1…capacity), waiting while the budget is used up.

        Returns the :class:`Reservation`, or None when ``stop`` was set before the records were
        free (checked every ``poll_s`` seconds; the caller then stops instead of reading).
        Waiters are served first come, first served; a share given back is handed straight to
        the waiters it lets in (no thundering herd of wake-ups).
        """
        if not self.bounded:
            return Reservation(self, 0)
        wanted = min(max(1, records), self.capacity)
        with self._lock:
            if not self._queue and self._used + wanted <= self.capacity:  # the usual case: no wait
                self._take(wanted)
                return Reservation(self, wanted)
            waiter = _Waiter(wanted)
            self._queue.append(waiter)
            self._grant()
        while not waiter.granted.wait(poll_s):
            if stop is not None and stop.is_set():
                with self._lock:
                    if not waiter.granted.is_set():
                        self._queue.remove(waiter)
                        self._grant()  # the next in line may fit now
                        return None
                break  # granted meanwhile: keep it
        return Reservation(self, wanted)

    def _grant(self) -> None:
        """Hand records to the waiters at the head of the queue while they fit (lock held)."""
        while self._queue and self._used + self._queue[0].records <= self.capacity:
            waiter = self._queue.popleft()
            self._take(waiter.records)
            waiter.granted.set()

    def _take(self, records: int) -> None:
        """Count ``records`` as reserved by one more holder (lock held)."""
        self._used += records
        self.holders += 1
        self.peak_records = max(self.peak_records, self._used)
        self.peak_holders = max(self.peak_holders, self.holders)

    def _give_back(self, records: int, *, last: bool) -> None:
        if not self.bounded:
            return
        with self._lock:
            self._used -= records
            if last:
                self.holders -= 1
            self._grant()


class _Waiter:
    __slots__ = ("records", "granted")

    def __init__(self, records: int):
        self.records = records
        self.granted = threading.Event()


class Reservation:
    """A share of a :class:`ReadBudget`: ``records`` reserved. :meth:`shrink_to` gives back what a
    page did not fill; :meth:`release` gives back the rest (idempotent; also as a context manager's
    exit)."""

    def __init__(self, budget: ReadBudget, records: int):
        self.budget = budget
        self.records = records
        self._released = False

    def shrink_to(self, records: int) -> None:
        """Keep only ``records`` (a page's size) of the reservation, giving back the rest at once.
        ``records`` ≤ 0 releases the reservation entirely."""
        if self._released:
            return
        if records <= 0:
            self.release()
            return
        keep = min(records, self.records)
        if keep < self.records:
            self.budget._give_back(self.records - keep, last=False)
            self.records = keep

    def release(self) -> None:
        """Give back everything still reserved. Idempotent."""
        if self._released:
            return
        self._released = True
        self.budget._give_back(self.records, last=True)
        self.records = 0

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
