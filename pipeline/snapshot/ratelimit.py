"""Keeping a snapshot within a read-capacity budget, measured in consumed RCU.

Each Scan asks for ``ReturnConsumedCapacity=TOTAL`` and reports ``ConsumedCapacity.CapacityUnits``
(DynamoDB API reference, Scan). The limiter is a debt bucket shared by every segment: a segment
waits until the balance is not negative, scans one page, then pays what the page consumed. The
balance refills at ``max_rcu`` per second and holds at most :data:`BURST_S` seconds of it. What
one page costs is known only afterwards, so each page's ``Limit`` (items) is sized from the cost
per item seen so far to about ``max_rcu * PAGE_SHARE_S / segments`` RCU — then the segments'
concurrent pages overshoot a window by at most one small page each.

A Scan page of up to 1 MB costs 128 RCU eventually consistent, 256 with ConsistentRead (one RCU
per 4 KB strongly consistent read, half that eventually consistent — DynamoDB developer guide,
"Read/write capacity mode").

``slow_down(factor)`` (0 < factor ≤ 1) scales the rate: the stream watchdog lowers it while the
stream falls behind toward its trim horizon (:mod:`pipeline.snapshot.retention`).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

#: Most seconds of ``max_rcu`` the bucket holds (the burst after an idle pause).
BURST_S = 1.0
#: Each page is sized to about this many seconds of one segment's share of ``max_rcu``.
PAGE_SHARE_S = 0.5
#: Default ``--max-rcu`` (read capacity units per second across segments).
DEFAULT_MAX_RCU = 1000.0


class RcuLimiter:
    """Debt bucket over consumed RCU. ``max_rcu`` None or 0: unlimited (``page_limit`` None).

    ``clock`` / ``sleep`` are injectable for tests (seconds). Thread-safe.
    """

    def __init__(self, max_rcu: float | None, *, segments: int = 1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None):
        self.max_rcu = max_rcu or None
        self.segments = max(1, segments)
        self.clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._balance = (self.max_rcu or 0.0) * BURST_S
        self._at = clock()
        self._factor = 1.0
        self._rcu_per_item: float | None = None
        self.spent = 0.0

    @property
    def rate(self) -> float | None:
        """The current rate in RCU/s (``max_rcu`` × the slow-down factor), None = unlimited."""
        return None if self.max_rcu is None else self.max_rcu * self._factor

    def slow_down(self, factor: float) -> None:
        """Scale the rate by ``factor`` (clamped to [0.01, 1]); 1 restores it."""
        with self._lock:
            self._refill()
            self._factor = min(1.0, max(0.01, factor))

    def _refill(self) -> None:
        now = self.clock()
        rate = self.rate
        if rate is not None:
            self._balance = min(rate * BURST_S, self._balance + (now - self._at) * rate)
        self._at = now

    def wait_s(self) -> float:
        """Seconds until the balance is not negative (0 = go now)."""
        with self._lock:
            self._refill()
            rate = self.rate
            if rate is None or self._balance >= 0:
                return 0.0
            return -self._balance / rate

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait until a page may be read; False when ``stop`` was set meanwhile."""
        while True:
            wait = self.wait_s()
            if wait <= 0:
                return True
            if stop is not None:
                if stop.wait(min(wait, 0.5)):
                    return False
            else:
                (self._sleep or time.sleep)(min(wait, 0.5))

    def spend(self, rcu: float, items: int = 0) -> None:
        """Pay ``rcu`` consumed by a page of ``items`` items."""
        with self._lock:
            self._refill()
            self._balance -= rcu
            self.spent += rcu
            if items > 0 and rcu > 0:
                per_item = rcu / items
                self._rcu_per_item = per_item if self._rcu_per_item is None else 0.7 * self._rcu_per_item + 0.3 * per_item

    def page_limit(self) -> int | None:
        """``Limit`` for the next Scan page (items), or None (let DynamoDB fill 1 MB)."""
        rate = self.rate
        if rate is None:
            return None
        target = rate * PAGE_SHARE_S / self.segments
        per_item = self._rcu_per_item
        if per_item is None:  # first page: a few items to learn the cost
            return max(1, min(100, math.floor(target * 4)))
        return max(1, min(10_000, math.floor(target / per_item)))
