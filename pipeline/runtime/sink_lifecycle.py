"""Opening and closing sinks: the one place every runner (the worker, archive replay, dead-letter
redrive, reindex) gets a sink ready the same way — with a :class:`~pipeline.sink.SinkContext`
naming the sink, this run's worker id, a logger bound to the sink, the AWS settings and the
dead-letter destination — and turns any open failure into one :class:`FatalSinkError` line.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from pipeline.errors import CdcError, FatalSinkError
from pipeline.sink import SinkContext

__all__ = ["open_sink", "close_sinks", "opened_sinks"]


def open_sink(sink: Any, *, worker_id: str, logger: Any, aws: Any = None, dead_letter: Any = None) -> None:
    """Call ``sink.open`` with this run's :class:`SinkContext`. Raises FatalSinkError
    (``sink 'NAME' could not open: …``, one line; the original error chained) for any failure,
    a FatalSinkError of the sink's own included."""
    bound = logger.bind(sink=sink.name) if hasattr(logger, "bind") else logger
    ctx = SinkContext(sink_name=sink.name, worker_id=worker_id, logger=bound, aws=aws, dead_letter=dead_letter)
    try:
        sink.open(ctx)
    except Exception as exc:
        text = str(exc) if isinstance(exc, CdcError) else f"{type(exc).__name__}: {exc}"
        raise FatalSinkError(f"sink {sink.name!r} could not open: {text}") from exc


def close_sinks(sinks: Sequence[Any], logger: Any) -> None:
    """Close each sink, best effort: a failing ``close`` is logged (``sink_close_failed``) and
    the others are still closed. Never raises."""
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            logger.warning("sink_close_failed", sink=sink.name, error=str(exc)[:500])


@contextlib.contextmanager
def opened_sinks(sinks: Sequence[Any], *, worker_id: str, logger: Any, aws: Any = None,
                 dead_letter: Any = None) -> Iterator[list[Any]]:
    """Open every sink (in order) for the ``with`` block and close them all when it ends. If one
    cannot open, those already opened are closed and its FatalSinkError is raised."""
    opened: list[Any] = []
    try:
        for sink in sinks:
            open_sink(sink, worker_id=worker_id, logger=logger, aws=aws, dead_letter=dead_letter)
            opened.append(sink)
        yield opened
    finally:
        close_sinks(opened, logger)
