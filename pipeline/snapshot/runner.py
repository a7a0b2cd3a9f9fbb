"""Running a snapshot: N segment readers in parallel, one delivery loop, checkpoints after flushes.

Shape::

    segment threads (one per unfinished segment)            delivery loop (the calling thread)
      limiter.acquire → reader.read_page(segment, pos) ──►   page → SNAPSHOT events → deliver(batch)
      throttled → back off, retry the same page      queue   every FLUSH_EVERY_PAGES pages / FLUSH_INTERVAL_S
      next_position None → segment read to its end           and when a segment ends: flush() → checkpoint
                                                             each segment's progress (position after its
                                                             last delivered page)

- Never a page dropped: a segment moves on only with the page's ``LastEvaluatedKey`` (or the
  export's next line); a throttled or failed call is retried from the same position
  (throttling and transient errors: backoff doubling from 0.2 s to :data:`MAX_BACKOFF_S`, with
  jitter, never fatal); the segment ends only when the page says there is nothing after it.
- Sinks are called from the delivery loop only, so a sink sees each segment as one shard whose
  events arrive in order — the contract of :mod:`pipeline.sink`.
- Resumable: a segment's checkpoint covers exactly the pages whose events every sink flushed;
  ``kill -9`` loses at most the pages since the last flush, which the next run reads again
  (same position, same ordinals, same version: idempotent sinks end the same).
- An item that cannot be decoded is dead-lettered (``kind = decode``, the item as read, its
  segment and ordinal as position) and counted; the snapshot goes on.
- ``stop_event`` set (SIGINT/SIGTERM): readers stop, what was delivered is flushed and
  checkpointed, the report ends ``stopped``; a rerun resumes.
"""

from __future__ import annotations

import base64
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Protocol, Sequence

from pipeline.deadletter import decode_entry
from pipeline.errors import CdcError, DecodeError, SnapshotThrottledError
from pipeline.events import Batch
from pipeline.snapshot.items import ordinal_sequence_number, snapshot_event, snapshot_shard_id, snapshot_stream_arn
from pipeline.snapshot.progress import SegmentProgress, SnapshotProgressStore, SnapshotState
from pipeline.snapshot.ratelimit import RcuLimiter
from pipeline.snapshot.report import SnapshotReport

#: The sinks are flushed (then segments checkpointed) after this many delivered pages ...
FLUSH_EVERY_PAGES = 16
#: ... or this many seconds after the previous flush, whichever comes first.
FLUSH_INTERVAL_S = 5.0
#: Longest backoff after a throttled or transiently failed page, in seconds.
MAX_BACKOFF_S = 20.0


@dataclass
class Page:
    """One page of a segment: ``items`` (AttributeValue maps), ``next_position`` (JSON-safe; None =
    nothing after this page), ``consumed_rcu`` (ConsumedCapacity.CapacityUnits; 0 for an export),
    ``bytes`` (approximate item bytes), ``read_at`` (UTC)."""

    items: Sequence[Mapping[str, Any]]
    next_position: Any
    consumed_rcu: float = 0.0
    bytes: int = 0
    read_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


class SegmentReader(Protocol):
    """Reads one segment page by page (a parallel Scan, or an export's data file).

    ``key_names``: the table's key attribute names; ``segments``: how many segments there are.
    ``read_page(segment, position, limit)``: the page starting at ``position`` (None = the
    segment's beginning), at most ``limit`` items (None = the reader's own page size). Raises
    SnapshotThrottledError (the runner backs off and asks again) or SnapshotError (fatal).
    """

    key_names: Sequence[str]
    segments: int

    def read_page(self, segment: int, position: Any, limit: int | None) -> Page: ...


def _json_safe(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


class SnapshotRunner:
    """Runs (or resumes) the snapshot in ``state`` and returns a :class:`SnapshotReport`.

    - ``reader``: a :class:`SegmentReader`; ``progress``: where checkpoints go (the state was
      taken from it); ``deliver(batch)`` / ``flush()``: the fan-out's (FanOut.deliver / flush);
      ``dead_letter``: for items that cannot be decoded; ``limiter``: the RCU budget;
      ``logger``: structlog; ``stop_event``: set to stop; ``on_tick(report)``: called about
      every page with the running report (progress bars).
    Nothing is raised for a failed page or sink: the report says ``failed`` and why.
    """

    def __init__(self, *, reader: SegmentReader, progress: SnapshotProgressStore, state: SnapshotState,
                 deliver: Callable[[Batch], None], flush: Callable[[], None], dead_letter: Any,
                 limiter: RcuLimiter, logger: Any, stop_event: threading.Event | None = None,
                 on_tick: Callable[[SnapshotReport], None] | None = None, sink_names: Sequence[str] = (),
                 total_items_hint: int | None = None, flush_every_pages: int = FLUSH_EVERY_PAGES,
                 flush_interval_s: float = FLUSH_INTERVAL_S, max_backoff_s: float = MAX_BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic):
        self.reader = reader
        self.progress = progress
        self.state = state
        self.meta = state.meta
        self.deliver = deliver
        self.flush = flush
        self.dead_letter = dead_letter
        self.limiter = limiter
        self.log = logger.bind(snapshot_id=self.meta.snapshot_id, table=self.meta.table)
        self.stop_event = stop_event or threading.Event()
        self.on_tick = on_tick
        self.flush_every_pages = flush_every_pages
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.current = {s.segment: s.copy() for s in state.segments}  # delivered (maybe not flushed)
        self._dirty: set[int] = set()
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, 2 * len(state.segments)))
        self._abort = threading.Event()  # readers stop (stop requested, or the delivery loop failed)
        self._throttles = 0
        self._lock = threading.Lock()
        self.report = SnapshotReport(
            snapshot_id=self.meta.snapshot_id, table=self.meta.table, source=self.meta.source,
            version=self.meta.version, started_at=self.meta.started_at, segments=self.meta.segments,
            sinks=list(sink_names), resumed=any(s.items or s.done for s in state.segments),
            total_items_hint=total_items_hint, export=self.meta.export)
        self._items_at_start = 0
        self._refresh_report()
        self._items_at_start = self.report.items

    # -- readers --------------------------------------------------------------------------------

    def _put(self, message: tuple) -> bool:
        while not self._abort.is_set():
            try:
                self._queue.put(message, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _read_segment(self, progress: SegmentProgress) -> None:
        segment, position = progress.segment, progress.position
        backoff = 0.2
        try:
            while not self._abort.is_set():
                if not self.limiter.acquire(self._abort):
                    return
                try:
                    page = self.reader.read_page(segment, position, self.limiter.page_limit())
                except SnapshotThrottledError as exc:
                    with self._lock:
                        self._throttles += 1
                    wait = min(self.max_backoff_s, backoff) * (0.5 + random.random() / 2)
                    self.log.warning("snapshot_throttled", segment=segment, retry_in_s=round(wait, 2),
                                     error=str(exc)[:300])
                    backoff = min(self.max_backoff_s, backoff * 2)
                    if self._abort.wait(wait):
                        return
                    continue
                backoff = 0.2
                self.limiter.spend(page.consumed_rcu, len(page.items))
                if not self._put(("page", segment, page)):
                    return
                if page.next_position is None:
                    return
                position = page.next_position
        except Exception as exc:  # noqa: BLE001 - handed to the delivery loop, which reports it
            self._put(("error", segment, exc))
        finally:
            self._put(("ended", segment, None))

    # -- delivery -------------------------------------------------------------------------------

    def _events(self, segment: int, page: Page, base: int) -> tuple[list, int]:
        events, dead = [], 0
        for offset, item in enumerate(page.items, start=1):
            ordinal = base + offset
            try:
                events.append(snapshot_event(
                    item, key_names=self.reader.key_names, table=self.meta.table, snapshot_id=self.meta.snapshot_id,
                    segment=segment, ordinal=ordinal, read_at=page.read_at, version=self.meta.version,
                    size_bytes=page.bytes // max(1, len(page.items))))
            except DecodeError as exc:
                dead += 1
                self.dead_letter.put(decode_entry(
                    _json_safe(item), table=self.meta.table, stream_arn=snapshot_stream_arn(self.meta.snapshot_id),
                    shard_id=snapshot_shard_id(self.meta.snapshot_id, segment),
                    sequence_number=ordinal_sequence_number(ordinal), error=str(exc)))
                self.log.warning("snapshot_item_dead_lettered", segment=segment, ordinal=ordinal, error=str(exc)[:300])
        return events, dead

    def _deliver_page(self, segment: int, page: Page) -> None:
        cur = self.current[segment]
        events, dead = self._events(segment, page, cur.items)
        if events:
            self.deliver(Batch(table=self.meta.table, stream_arn=snapshot_stream_arn(self.meta.snapshot_id),
                               shard_id=snapshot_shard_id(self.meta.snapshot_id, segment), events=tuple(events),
                               checkpoint_sequence_number=events[-1].sequence_number))
        cur.items += len(page.items)
        cur.dead_lettered += dead
        cur.pages += 1
        cur.bytes += page.bytes
        cur.rcu += page.consumed_rcu
        cur.position = page.next_position
        cur.done = page.next_position is None
        self._dirty.add(segment)

    def _checkpoint(self) -> None:
        """Flush every sink, then store the progress of every segment delivered to since."""
        if not self._dirty:
            return
        self.flush()
        for segment in sorted(self._dirty):
            self.progress.save_segment(self.meta, self.current[segment])
        self._dirty.clear()

    def _refresh_report(self) -> None:
        r = self.report
        segs = list(self.current.values())
        r.items = sum(s.items for s in segs)
        r.pages = sum(s.pages for s in segs)
        r.bytes = sum(s.bytes for s in segs)
        r.rcu = sum(s.rcu for s in segs)
        r.dead_lettered = sum(s.dead_lettered for s in segs)
        r.segments_done = sum(1 for s in segs if s.done)
        r.throttles = self._throttles
        r.items_this_run = r.items - self._items_at_start

    def run(self) -> SnapshotReport:
        """Run to the end (or a stop / failure); see the class doc."""
        started = self.clock()
        todo = [s for s in self.current.values() if not s.done]
        threads = [threading.Thread(target=self._read_segment, args=(s.copy(),), name=f"snapshot-seg{s.segment}",
                                    daemon=True) for s in todo]
        self.log.info("snapshot_started", segments=self.meta.segments, segments_todo=len(todo),
                      resumed=self.report.resumed, version=self.meta.version, max_rcu=self.limiter.max_rcu,
                      source=self.meta.source)
        for t in threads:
            t.start()
        running = len(threads)
        pages_since_flush, last_flush = 0, self.clock()
        error: str | None = None
        try:
            while running:
                if self.stop_event.is_set():
                    break
                try:
                    kind, segment, payload = self._queue.get(timeout=0.2)
                except queue.Empty:
                    payload = kind = None
                if kind == "ended":
                    running -= 1
                elif kind == "error":
                    text = str(payload) if isinstance(payload, CdcError) else f"{type(payload).__name__}: {payload}"
                    error = f"segment {segment}: {text}"
                    break
                elif kind == "page":
                    self._deliver_page(segment, payload)
                    pages_since_flush += 1
                if (pages_since_flush >= self.flush_every_pages or (kind == "page" and self.current[segment].done)
                        or self.clock() - last_flush >= self.flush_interval_s):
                    self._checkpoint()
                    pages_since_flush, last_flush = 0, self.clock()
                self.report.elapsed_s = self.clock() - started
                self._refresh_report()
                if self.on_tick is not None:
                    self.on_tick(self.report)
            self._abort.set()
            if error is None:
                self._checkpoint()
        except Exception as exc:  # a sink failed (FatalSinkError, DeliveryAborted) or the store did
            self._abort.set()
            error = str(exc) if isinstance(exc, CdcError) else f"{type(exc).__name__}: {exc}"
        else:
            if error is not None:  # a reader failed: keep what the sinks already have
                try:
                    self._checkpoint()
                except Exception as exc:  # noqa: BLE001 - reported with the first error
                    error += f"; checkpoint after it failed: {exc}"
        for t in threads:
            t.join(timeout=30)
        self._refresh_report()
        r = self.report
        r.elapsed_s = self.clock() - started
        r.items_this_run = r.items - self._items_at_start
        if error is not None and self.stop_event.is_set():  # a write cut short by the stop: resumable
            r.ended, r.error = "stopped", error
            self.log.info("snapshot_stopped", items=r.items, segments_done=r.segments_done, detail=error[:300])
        elif error is not None:
            r.ended, r.error = "failed", error
            self.log.error("snapshot_failed", error=error[:500], items=r.items)
        elif r.segments_done == r.segments:
            self.meta.state = "done"
            self.progress.save_meta(self.meta)
            r.ended = "done"
            self.log.info("snapshot_finished", items=r.items, pages=r.pages, rcu=round(r.rcu, 1),
                          elapsed_s=round(r.elapsed_s, 2), dead_lettered=r.dead_lettered)
        else:
            r.ended = "stopped"
            self.log.info("snapshot_stopped", items=r.items, segments_done=r.segments_done)
        return r
