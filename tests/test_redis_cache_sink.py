"""Redis cache invalidation sink against a real redis-server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from decimal import Decimal

import pytest
import redis
from pydantic import ValidationError

from connectors.redis_cache import RedisCacheSink, parse_key_template, redact_url, render_key_part
from pipeline.codec import decode_record
from pipeline.errors import FatalSinkError, RetriableSinkError
from pipeline.events import Batch
from pipeline.sink import SinkContext

TABLE = "users"
STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/users/stream/2024-05-01T00:00:00.000"
SHARD = "shardId-00000001714521600000-aaaaaaaa"
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


# -- servers -----------------------------------------------------------------------------------


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process on a free loopback port, no persistence."""

    def __init__(self, *extra: str):
        self.port = _free_port()
        self.password = None
        if "--requirepass" in extra:
            self.password = extra[extra.index("--requirepass") + 1]
        self.process = subprocess.Popen(
            [REDIS_BIN, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)
            finally:
                client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(*extra: str) -> RedisServer:
    try:
        return RedisServer(*extra)
    except (OSError, RuntimeError) as exc:
        _unavailable(f"cannot start redis-server ({REDIS_BIN}): {type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def redis_server():
    server = _start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def _context() -> SinkContext:
    return SinkContext(sink_name="cache", worker_id="w1", logger=None)


def _sink(url: str, templates, **options) -> RedisCacheSink:
    sink = RedisCacheSink("cache", RedisCacheSink.Options(url=url, key_templates=templates, **options))
    sink.open(_context())
    return sink


# -- records -----------------------------------------------------------------------------------


def _event(n: int, event: str, *, keys: dict, new: dict | None = None, old: dict | None = None):
    body = {"Keys": keys, "SequenceNumber": f"{n:021d}", "SizeBytes": 10,
            "StreamViewType": "NEW_AND_OLD_IMAGES", "ApproximateCreationDateTime": 1714567200}
    if new is not None:
        body["NewImage"] = new
    if old is not None:
        body["OldImage"] = old
    record = {"eventID": f"ev-{n}", "eventName": event, "dynamodb": body}
    return decode_record(record, table=TABLE, stream_arn=STREAM_ARN, shard_id=SHARD)


def _batch(*events) -> Batch:
    return Batch(TABLE, STREAM_ARN, SHARD, events=tuple(events),
                 checkpoint_sequence_number=events[-1].sequence_number)


def _user(pk: str, email: str, **more) -> dict:
    return {"pk": {"S": pk}, "email": {"S": email}, **more}


# -- options and rendering ---------------------------------------------------------------------


def test_options_defaults_and_template_validation():
    o = RedisCacheSink.Options(url="redis://127.0.0.1:1/0", key_templates=["user:{pk}"])
    assert (o.channel, o.socket_timeout_s) == (None, 5.0)
    for bad in ["user:{pk", "user:{}", "user:{0}", "user:{a.b}", "user:{a[0]}", "user:{pk!r}", "user:{pk:>5}", ""]:
        with pytest.raises(ValidationError) as info:
            RedisCacheSink.Options(url="redis://127.0.0.1:1/0", key_templates=["ok:{pk}", bad])
        assert f"key template {bad!r}" in str(info.value) and "key_templates" in str(info.value)
    with pytest.raises(ValidationError, match="key_templates"):
        RedisCacheSink.Options(url="redis://127.0.0.1:1/0", key_templates=[])
    with pytest.raises(ValidationError, match="url"):
        RedisCacheSink.Options(url="http://127.0.0.1:1", key_templates=["a"])
    with pytest.raises(ValidationError, match="url"):
        RedisCacheSink.Options(key_templates=["a"])
    assert parse_key_template("lit:{{x}}:{pk}").render({"pk": "1"}) == "lit:{x}:1"


def test_render_key_part():
    assert render_key_part("a b") == "a b"
    assert render_key_part(Decimal("1E+3")) == "1000"
    assert render_key_part(Decimal("12345678901234567890123456789012345678")) == "12345678901234567890123456789012345678"
    assert render_key_part(Decimal("1.50")) == "1.5"
    assert render_key_part(Decimal("-0")) == "0"
    assert render_key_part(b"\x00\xff") == "AP8="
    assert render_key_part(True) == "true" and render_key_part(False) == "false"
    for not_a_key in (None, {"a": 1}, [1], {"x"}):
        assert render_key_part(not_a_key) is None


def test_redact_url():
    assert redact_url("redis://user:s3cret@127.0.0.1:6379/0") == "redis://user:***@127.0.0.1:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- behaviour against redis-server ------------------------------------------------------------


def test_changed_email_invalidates_old_and_new_keys(r, redis_server):
    for key in ("user:u1", "email:old@x.io", "email:new@x.io", "user:u2", "email:other@x.io"):
        r.set(key, "cached")
    sink = _sink(redis_server.url, ["user:{pk}", "email:{email}"])
    event = _event(1, "MODIFY", keys={"pk": {"S": "u1"}},
                   old=_user("u1", "old@x.io"), new=_user("u1", "new@x.io"))
    assert sink.keys_for(event) == ["user:u1", "email:old@x.io", "email:new@x.io"]
    sink.write(_batch(event))
    sink.flush()
    assert r.exists("user:u1", "email:old@x.io", "email:new@x.io") == 0
    assert r.get("user:u2") == "cached" and r.get("email:other@x.io") == "cached"
    sink.write(_batch(event))  # replay: same end state, no error
    assert r.dbsize() == 2
    sink.close()


def test_composite_templates_numbers_and_binary_keys(r, redis_server):
    r.mset({"order:c1:1000": "x", "order:c1:7": "x", "blob:AP8=": "x", "order:c2:1": "keep"})
    sink = _sink(redis_server.url, ["order:{pk}:{sk}", "blob:{b}"])
    insert = _event(2, "INSERT", keys={"pk": {"S": "c1"}, "sk": {"N": "1E+3"}},
                    new={"pk": {"S": "c1"}, "sk": {"N": "1E+3"}, "b": {"B": "AP8="}})
    remove = _event(3, "REMOVE", keys={"pk": {"S": "c1"}, "sk": {"N": "7"}},
                    old={"pk": {"S": "c1"}, "sk": {"N": "7"}})
    assert sink.keys_for(insert) == ["order:c1:1000", "blob:AP8="]
    assert sink.keys_for(remove) == ["order:c1:7"]
    sink.write(_batch(insert, remove))
    assert sorted(r.keys()) == ["order:c2:1"]


def test_missing_or_unrenderable_placeholder_is_skipped(r, redis_server):
    r.mset({"user:u3": "x", "email:a@x.io": "x", "team:t1": "x"})
    sink = _sink(redis_server.url, ["user:{pk}", "email:{email}", "team:{team}", "tags:{tags}", "n:{nothing}"])
    # old image lacks email and team; new image has them; tags is a set, nothing is NULL → skipped
    event = _event(4, "MODIFY", keys={"pk": {"S": "u3"}},
                   old={"pk": {"S": "u3"}, "tags": {"SS": ["a"]}, "nothing": {"NULL": True}},
                   new=_user("u3", "a@x.io", team={"S": "t1"}, tags={"SS": ["a", "b"]}))
    assert sink.keys_for(event) == ["user:u3", "email:a@x.io", "team:t1"]
    sink.write(_batch(event))
    assert r.dbsize() == 0


def test_keys_only_stream_uses_the_keys(redis_server):
    sink = _sink(redis_server.url, ["user:{pk}", "email:{email}"])
    event = _event(5, "REMOVE", keys={"pk": {"S": "u9"}})
    assert event.before is None and event.after is None
    assert sink.keys_for(event) == ["user:u9"]


def test_batch_keys_are_deduplicated_and_published_on_the_channel(r, redis_server):
    sink = _sink(redis_server.url, ["user:{pk}", "email:{email}"], channel="invalidations")
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("invalidations")
    deadline = time.monotonic() + 5
    while pubsub.get_message(timeout=0.1) is None and r.pubsub_numsub("invalidations")[0][1] == 0:
        assert time.monotonic() < deadline
    e1 = _event(6, "MODIFY", keys={"pk": {"S": "u1"}}, old=_user("u1", "a@x.io"), new=_user("u1", "b@x.io"))
    e2 = _event(7, "MODIFY", keys={"pk": {"S": "u1"}}, old=_user("u1", "b@x.io"), new=_user("u1", "c@x.io"))
    sink.write(_batch(e1, e2))
    received = []
    deadline = time.monotonic() + 5
    while len(received) < 4 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is not None:
            received.append((message["channel"], message["data"]))
    pubsub.close()
    assert received == [("invalidations", k) for k in ("user:u1", "email:a@x.io", "email:b@x.io", "email:c@x.io")]
    assert sink.invalidated == 4


def test_server_stopped_is_retriable():
    server = _start()
    try:
        sink = _sink(server.url, ["user:{pk}"], socket_timeout_s=1)
    finally:
        server.stop()
    event = _event(8, "INSERT", keys={"pk": {"S": "u1"}}, new={"pk": {"S": "u1"}})
    with pytest.raises(RetriableSinkError, match="will retry"):
        sink.write(_batch(event))
    sink.close()


def test_unreachable_at_open_is_fatal_with_one_clear_line():
    port = _free_port()
    sink = RedisCacheSink("cache", RedisCacheSink.Options(url=f"redis://127.0.0.1:{port}/0",
                                                          key_templates=["user:{pk}"], socket_timeout_s=1))
    with pytest.raises(FatalSinkError) as info:
        sink.open(_context())
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "sinks[].options.url" in message and "\n" not in message


def test_wrong_password_is_fatal_and_hidden():
    server = _start("--requirepass", "right-one")
    try:
        sink = RedisCacheSink("cache", RedisCacheSink.Options(
            url=f"redis://:wrong-one@127.0.0.1:{server.port}/0", key_templates=["user:{pk}"]))
        with pytest.raises(FatalSinkError, match="credentials") as info:
            sink.open(_context())
        assert "wrong-one" not in str(info.value)
        # the right password works; losing it later (ACL change) is fatal on write
        sink = _sink(f"redis://:right-one@127.0.0.1:{server.port}/0", ["user:{pk}"])
        admin = redis.Redis(host="127.0.0.1", port=server.port, password="right-one")
        admin.config_set("requirepass", "changed")
        admin.close()
        sink._client.connection_pool.disconnect()  # next command reconnects and must authenticate
        event = _event(9, "INSERT", keys={"pk": {"S": "u1"}}, new={"pk": {"S": "u1"}})
        with pytest.raises(FatalSinkError):
            sink.write(_batch(event))
        sink.close()
    finally:
        server.stop()


def test_key_templates_per_table():
    from pipeline.testing import make_batch, make_stream_record

    sink = RedisCacheSink("cache", RedisCacheSink.Options(
        url="redis://127.0.0.1:1/0", key_templates={"users": ["user:{pk}"], "*": ["any:{pk}"]}))
    rec = make_stream_record(keys={"pk": "a"}, new_image={"pk": "a"})
    users = make_batch([rec], table="users").events[0]
    orders = make_batch([rec], table="orders").events[0]
    assert sink.keys_for(users) == ["user:a"]
    assert sink.keys_for(orders) == ["any:a"]
    only_users = RedisCacheSink("c2", RedisCacheSink.Options(url="redis://127.0.0.1:1/0",
                                                             key_templates={"users": ["user:{pk}"]}))
    assert only_users.keys_for(orders) == []
    with pytest.raises(Exception, match="key_templates"):
        RedisCacheSink.Options(url="redis://x", key_templates={"users": ["bad:{"]})
