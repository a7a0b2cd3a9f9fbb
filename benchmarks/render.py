"""What the three built-in sinks compute per change, without network I/O (issue 16 "render").

- **S3 audit**: :func:`pipeline.render.event_to_json_line` per event, the batch's lines joined
  and ``gzip.compress(lines, level, mtime=0)`` at the sink's default ``compress_level``
  (:data:`GZIP_LEVEL`; the sink compresses a whole buffer per upload, which costs the same per byte);
- **OpenSearch** (``typed`` mapping, the default without declared fields): the bulk action lines
  of every event — ``index`` meta line + ``_source`` for INSERT / MODIFY, a ``delete`` line for a
  REMOVE — rendered by a real :class:`connectors.opensearch.sink.OpenSearchSink` (never opened)
  exactly as its ``_build_actions`` does for one target index;
- **Redis cache**: the cache keys of every event from a real
  :class:`connectors.redis_cache.RedisCacheSink` (never opened), templates :data:`REDIS_TEMPLATES`.

:func:`render_sinks` gives them as sinks (``thread_safe``) for the pipeline section;
:func:`render_batch` is the same work as one function for the decode section.
"""

from __future__ import annotations

import gzip
import threading
from typing import Any, Sequence

import orjson

def _default_gzip_level() -> int:
    from connectors.s3.audit import S3AuditSink

    return S3AuditSink.Options(bucket="b").compress_level


#: The S3 audit sink's default gzip level (``compress_level``), what the render way compresses at.
GZIP_LEVEL = _default_gzip_level()
#: The Redis key templates of the benchmark: one from the key, one from an image attribute.
REDIS_TEMPLATES = ["order:{pk}:{sk}", "city:{city}"]
INDEX = "bench"


class Renderers:
    """The three sinks' per-change computations (see the module doc)."""

    def __init__(self) -> None:
        from connectors.opensearch.mapping import MappingSpec
        from connectors.opensearch.sink import OpenSearchSink
        from connectors.redis_cache import RedisCacheSink

        self.opensearch = OpenSearchSink("search", OpenSearchSink.Options(hosts=["http://127.0.0.1:9"]))
        self.spec = MappingSpec.build(None)  # typed: no fields declared
        self.redis = RedisCacheSink("cache", RedisCacheSink.Options(url="redis://127.0.0.1:9/0",
                                                                    key_templates=REDIS_TEMPLATES))

    def s3_body(self, events: Sequence[Any]) -> bytes:
        from pipeline.render import event_to_json_line

        return gzip.compress(b"".join([event_to_json_line(ev) for ev in events]), GZIP_LEVEL, mtime=0)

    def opensearch_lines(self, events: Sequence[Any]) -> list[bytes]:
        from pipeline.events import Operation

        sink, spec, out = self.opensearch, self.spec, []
        for event in events:
            if event.operation is Operation.REMOVE:
                out.append(orjson.dumps({"delete": sink._meta(event, INDEX)}) + b"\n")
            else:
                out.append(sink._index_action(event, INDEX, spec, sink._render_source(event, spec)).lines)
        return out

    def redis_keys(self, events: Sequence[Any]) -> list[str]:
        keys: list[str] = []
        for event in events:
            keys.extend(self.redis.keys_for(event))
        return keys

    def render_batch(self, events: Sequence[Any]) -> int:
        """All three for one batch; returns the bytes rendered (so nothing is optimised away)."""
        body = self.s3_body(events)
        lines = self.opensearch_lines(events)
        keys = self.redis_keys(events)
        return len(body) + sum(map(len, lines)) + len(keys)


def render_sinks() -> list[Any]:
    """Three sinks (``pipeline.sink.Sink``, ``thread_safe = True``) doing one renderer each per
    batch and counting events, for the pipeline section."""
    from pipeline.sink import Sink

    renderers = Renderers()

    class _Render(Sink):
        thread_safe = True
        renders_wire_form = True  # as the three sinks whose work it does

        def __init__(self, sink_name: str, fn: Any):
            super().__init__(sink_name)
            self.fn = fn
            self.events = 0
            self._lock = threading.Lock()

        def write(self, batch: Any) -> None:
            self.fn(batch.events)
            with self._lock:
                self.events += len(batch.events)

    return [_Render("s3_audit_render", renderers.s3_body), _Render("opensearch_render", renderers.opensearch_lines),
            _Render("redis_render", renderers.redis_keys)]


def render_breakdown(bodies: Sequence[bytes], *, table: str, stream_arn: str, shard_id: str,
                     repetitions: int = 3) -> dict[str, float]:
    """CPU ms per 1,000 records of each part of the render way, measured apart (median of
    ``repetitions``; fresh lazy events for each part, so no part profits from another's cached
    ``typed_parts``; the parsed pages are shared, so with the typed read a ``WireImage``'s canonical
    JSON is written by the S3 part and reused by the OpenSearch part, as within the render way): ``parse`` (the typed read, as the render way), ``construction`` (decode_record), ``s3_lines``
    (event_to_json_line), ``gzip`` (of those lines, at :data:`GZIP_LEVEL`), ``opensearch`` (typed action
    lines), ``redis`` (cache keys)."""
    import time

    from benchmarks import median
    from benchmarks.decode import _parse_fast_body
    from pipeline.codec import decode_record
    from pipeline.render import event_to_json_line

    parse, _ = _parse_fast_body(typed=True)
    renderers = Renderers()
    records = 0
    parts: dict[str, list[float]] = {k: [] for k in ("parse", "construction", "s3_lines", "gzip", "opensearch", "redis")}

    def events_of(pages: list[dict]) -> list[list[Any]]:
        return [[decode_record(r, table=table, stream_arn=stream_arn, shard_id=shard_id) for r in page["Records"]]
                for page in pages]

    def timed(name: str, fn: Any, arg: Any) -> Any:
        start = time.thread_time()
        out = fn(arg)
        parts[name].append(time.thread_time() - start)
        return out

    for _ in range(repetitions):
        pages = timed("parse", lambda bs: [parse(b) for b in bs], bodies)
        records = sum(len(p["Records"]) for p in pages)
        timed("construction", events_of, pages)
        lines = timed("s3_lines", lambda evs: [b"".join([event_to_json_line(e) for e in page]) for page in evs],
                      events_of(pages))
        timed("gzip", lambda ls: [gzip.compress(x, GZIP_LEVEL, mtime=0) for x in ls], lines)
        timed("opensearch", lambda evs: [renderers.opensearch_lines(page) for page in evs], events_of(pages))
        timed("redis", lambda evs: [renderers.redis_keys(page) for page in evs], events_of(pages))
    return {name: 1000 * median(ts) * 1000 / records for name, ts in parts.items()}
