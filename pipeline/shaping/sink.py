"""The sink wrapper that routes, filters and transforms each batch before the wrapped sink sees it.

:class:`ShapedSink` implements the sink contract (:mod:`pipeline.sink`) around one configured
sink, in this order per batch:

1. **tables** — a batch of a table no ``sinks[].tables`` name or glob (:func:`fnmatch.fnmatchcase`)
   matches is not given to the sink at all;
2. **filter** — events whose Lambda-shaped view (:mod:`pipeline.shaping.view`) matches none of the
   patterns (:mod:`pipeline.shaping.pattern`) are left out;
3. **transforms** — applied in order (:mod:`pipeline.shaping.transforms`); one that returns None
   drops the event.

Events left out by any step count as delivered for this sink: ``write`` returns normally, so the
fan-out treats them as accepted and the checkpoint moves past them (Lambda does the same: "If the
record doesn't satisfy your filter criteria ... the streams iterator advances past this record" —
AWS Lambda developer guide, "Lambda event filtering"). They are counted in
``ddb_cdc_sink_events_filtered_total{sink, reason}`` (reason ``table`` | ``filter`` |
``transform``); ``ddb_cdc_sink_events_delivered_total`` counts them too, as accepted.
When nothing is left the wrapped sink's ``write`` is not called.

The batch the wrapped sink gets carries ``extra["transforms"]``: the list of the transforms'
descriptions (:meth:`Transform.describe`, secret-free) — the S3 audit sink writes it on each line.

Failures stay per event: a transform that raises, or returns an event whose ``keys``, ``key_id``
or key attributes differ from the original, makes that event a permanent failure (dead-lettered
with the reason, as the *original* event) while the others are delivered
(:class:`pipeline.errors.PartialSinkError`). Events the wrapped sink names in a
``PartialSinkError`` are mapped back to the original events, so a dead letter always holds the
change as it came from the stream, and a redrive applies the sink's *current* filter and
transforms to it once.
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import replace
from typing import Any, Sequence

from prometheus_client import Counter

from pipeline.errors import PartialSinkError
from pipeline.events import Batch, ChangeEvent
from pipeline.shaping.pattern import FilterPattern
from pipeline.shaping.transforms import Transform

SINK_FILTERED = Counter("ddb_cdc_sink_events_filtered_total",
                        "Changes not given to a sink because of its tables, filter or a transform that dropped "
                        "them (they count as delivered: the checkpoint moves)", ["sink", "reason"])


def _position(event: ChangeEvent) -> tuple[str, str]:
    return (event.source.shard_id, event.sequence_number)


class ShapedSink:
    """Wraps ``inner`` (any sink) with ``tables`` (names / globs; empty = every table), ``filter``
    (a compiled :class:`FilterPattern` or None) and ``transforms`` (in order). Every attribute it
    does not define is the wrapped sink's (``prepare_replay``, ``options``, ``thread_safe`` …);
    ``wrapped`` is the wrapped sink."""

    def __init__(self, inner: Any, *, tables: Sequence[str] = (), filter: FilterPattern | None = None,
                 transforms: Sequence[Transform] = (), logger: Any = None):
        self.wrapped = inner
        self.tables = tuple(tables)
        self.filter = filter
        self.transforms = tuple(transforms)
        self.descriptions = [t.describe() for t in self.transforms]
        #: position → (generation, original event) of events handed on since their flush
        self._originals: dict[tuple[str, str], tuple[int, ChangeEvent]] = {}
        self._generation = 0
        self._lock = threading.Lock()
        self._log = logger
        self._table_ok: dict[str, bool] = {}

    # -- the sink contract --------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.wrapped.name

    def open(self, context: Any) -> None:
        self._log = getattr(context, "logger", None) or self._log
        self.wrapped.open(context)

    def write(self, batch: Batch) -> None:
        """Route, filter, transform, then hand what is left to the wrapped sink (see module doc).
        Raises what the wrapped sink raises (``PartialSinkError`` with original events), or
        ``PartialSinkError`` for events a transform failed on."""
        if not self.wants_table(batch.table):
            if batch.events:
                SINK_FILTERED.labels(sink=self.name, reason="table").inc(len(batch.events))
            return
        kept, failed = self.shape(batch.events)
        if kept:
            extra = dict(batch.extra) if batch.extra else {}
            if self.descriptions:
                extra["transforms"] = self.descriptions
            with self._lock:
                for original, shaped in kept:
                    self._originals[_position(shaped)] = (self._generation, original)
            try:
                self.wrapped.write(replace(batch, events=tuple(shaped for _, shaped in kept), extra=extra))
            except PartialSinkError as exc:
                raise self._remap(exc, extra_permanent=failed) from exc
        if failed:
            raise PartialSinkError(f"{len(failed)} change(s) could not be transformed for sink {self.name}",
                                   permanent=failed)

    def flush(self) -> None:
        with self._lock:  # events written from now on (other shards' threads) are not covered by it
            covered = self._generation
            self._generation += 1
        try:
            self.wrapped.flush()
        except PartialSinkError as exc:
            raise self._remap(exc) from exc
        with self._lock:
            self._originals = {pos: item for pos, item in self._originals.items() if item[0] > covered}

    def discard_unflushed(self) -> None:
        discard = getattr(self.wrapped, "discard_unflushed", None)
        if callable(discard):
            discard()
        with self._lock:
            self._originals.clear()

    def reset_shard(self, table: str, shard_id: str) -> None:
        reset = getattr(self.wrapped, "reset_shard", None)
        if callable(reset):
            reset(table, shard_id)

    def close(self) -> None:
        self.wrapped.close()

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (during unpickling / early errors)
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"ShapedSink({self.wrapped!r}, tables={list(self.tables)}, filter={self.filter is not None}, " \
               f"transforms={[d['type'] for d in self.descriptions]})"

    # -- shaping ------------------------------------------------------------------------------

    def wants_table(self, table: str) -> bool:
        """True when ``tables`` is empty or one of its names / globs matches ``table``."""
        if not self.tables:
            return True
        ok = self._table_ok.get(table)
        if ok is None:
            ok = self._table_ok[table] = any(fnmatch.fnmatchcase(table, pattern) for pattern in self.tables)
        return ok

    def shape(self, events: Sequence[ChangeEvent]) -> tuple[list[tuple[ChangeEvent, ChangeEvent]],
                                                            list[tuple[ChangeEvent, str]]]:
        """``(kept, failed)``: ``kept`` pairs (original, shaped) in order; ``failed`` pairs
        (original, reason) for events a transform raised on or changed the keys of."""
        kept: list[tuple[ChangeEvent, ChangeEvent]] = []
        failed: list[tuple[ChangeEvent, str]] = []
        filtered = dropped = 0
        for event in events:
            if self.filter is not None and not self.filter.matches(event):
                filtered += 1
                continue
            shaped: ChangeEvent | None = event
            try:
                for transform in self.transforms:
                    shaped = transform.apply(shaped)
                    if shaped is None:
                        break
                    problem = _key_change(event, shaped)
                    if problem:
                        raise ValueError(f"transform {transform.type_name or type(transform).__name__} {problem}; "
                                         "keys are never changed by a transform")
            except Exception as exc:  # a plugin bug or data it cannot handle: this event only
                failed.append((event, f"transform failed: {type(exc).__name__}: {exc}"))
                continue
            if shaped is None:
                dropped += 1
                continue
            kept.append((event, shaped))
        if filtered:
            SINK_FILTERED.labels(sink=self.name, reason="filter").inc(filtered)
        if dropped:
            SINK_FILTERED.labels(sink=self.name, reason="transform").inc(dropped)
        self._note_protected_keys()
        return kept, failed

    def _note_protected_keys(self) -> None:
        for transform in self.transforms:
            names = getattr(transform, "warned_keys", None)
            if names and self._log is not None:
                reported = getattr(transform, "_reported_keys", set())
                new = names - reported
                if new:
                    self._log.warning("transform_skips_key_attributes", sink=self.name,
                                      transform=transform.type_name, attributes=sorted(new),
                                      hint="key attributes are never changed by a transform; remove them "
                                           "from its paths")
                    transform._reported_keys = reported | new  # type: ignore[attr-defined]

    def _remap(self, exc: PartialSinkError, extra_permanent: Sequence[tuple[ChangeEvent, str]] = ()) -> PartialSinkError:
        with self._lock:
            originals = {pos: original for pos, (_, original) in self._originals.items()}

        def back(items):
            return [(originals.get(_position(ev), ev), reason) for ev, reason in items]

        return PartialSinkError(str(exc), retriable=back(exc.retriable),
                                permanent=back(exc.permanent) + list(extra_permanent))


def _key_change(original: ChangeEvent, shaped: ChangeEvent) -> str | None:
    """What a transform changed about the keys, or None."""
    if shaped.key_id != original.key_id:
        return "changed key_id"
    if dict(shaped.keys) != dict(original.keys):
        return "changed keys"
    for image_name in ("before", "after"):
        before_img, after_img = getattr(original, image_name), getattr(shaped, image_name)
        if before_img is after_img or before_img is None:
            continue
        if after_img is None:
            return f"removed {image_name}"
        for name in original.keys:
            if name in before_img and (name not in after_img or after_img[name] != before_img[name]):
                return f"changed key attribute {name!r} in {image_name}"
    if shaped.source is not original.source and shaped.source != original.source:
        return "changed the source (position)"
    return None
