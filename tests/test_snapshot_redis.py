"""Redis invalidation of snapshot items is an option, off by default (redis-server)."""

from __future__ import annotations

from datetime import datetime, timezone

import redis

from connectors.redis_cache import RedisCacheSink
from pipeline.events import Batch
from pipeline.sink import SinkContext
from pipeline.snapshot.items import snapshot_event


def _batch() -> Batch:
    events = tuple(snapshot_event({"pk": {"S": f"u{i}"}}, key_names=("pk",), table="users", snapshot_id="s1", segment=0,
                                  ordinal=i + 1, read_at=datetime.now(timezone.utc), version=1 << 32) for i in range(3))
    return Batch(table="users", stream_arn="snapshot:s1", shard_id=events[0].source.shard_id, events=events,
                 checkpoint_sequence_number=events[-1].sequence_number)


def test_snapshot_items_invalidate_nothing_unless_asked(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client.mset({"user:u0": "cached", "user:u1": "cached", "user:u2": "cached"})
        default = RedisCacheSink("cache", RedisCacheSink.Options(url=redis_server.url, key_templates=["user:{pk}"]))
        default.open(SinkContext(sink_name="cache", worker_id="w", logger=None))
        default.write(_batch())
        default.close()
        assert client.mget("user:u0", "user:u1", "user:u2") == ["cached"] * 3
        opted = RedisCacheSink("cache", RedisCacheSink.Options(url=redis_server.url, key_templates=["user:{pk}"],
                                                             snapshot_invalidate=True))
        opted.open(SinkContext(sink_name="cache", worker_id="w", logger=None))
        opted.write(_batch())
        opted.close()
        assert client.mget("user:u0", "user:u1", "user:u2") == [None] * 3
    finally:
        client.close()
