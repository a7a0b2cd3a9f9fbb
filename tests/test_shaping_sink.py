"""ShapedSink, the built-in transforms and the shaping configuration (issue 19 items 1–4)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import structlog
import yaml
from prometheus_client import REGISTRY

from pipeline.config import SinkConfig, load_settings
from pipeline.deadletter import DirectoryDeadLetterQueue, delivery_entry
from pipeline.errors import ConfigError, PartialSinkError
from pipeline.events import Batch
from pipeline.ops.redrive import redrive
from pipeline.registry import build_sinks
from pipeline.shaping.build import shape, shaping_problems_and_parts
from pipeline.shaping.sink import ShapedSink
from pipeline.shaping.transforms import Transform, TransformOptions, build_transform, hmac_text, with_images
from pipeline.testing import RecordingSink, check_transform, make_batch, make_stream_record

ROOT = Path(__file__).resolve().parent.parent
LOG = structlog.get_logger("test_shaping_sink")


def shaped(inner=None, **cfg) -> ShapedSink:
    config = SinkConfig(name=getattr(inner, "name", "rec"), type="recording", **cfg)
    problems, parts = shaping_problems_and_parts(config, "test")
    assert not problems, problems
    return shape(inner or RecordingSink("rec"), parts)


def records(n: int, *, pk_prefix="ORDER#", table="orders", start=1, **extra):
    recs = [make_stream_record(keys={"pk": f"{pk_prefix}{i}"},
                               new_image={"pk": f"{pk_prefix}{i}", "n": Decimal(i), "email": f"u{i}@x.test",
                                          "card": {"number": f"4111{i:012d}", "brand": "visa"}},
                               sequence_number=f"{100000000000000000000 + i}", **extra)
            for i in range(start, start + n)]
    return make_batch(recs, table=table)


def filtered(sink: str, reason: str) -> float:
    return REGISTRY.get_sample_value("ddb_cdc_sink_events_filtered_total", {"sink": sink, "reason": reason}) or 0.0


# -- routing, filter, metric -------------------------------------------------------------------------


def test_tables_names_and_globs():
    rec = RecordingSink("route")
    sink = shaped(rec, tables=["orders-*", "users"])
    before = filtered("route", "table")
    sink.write(records(2, table="sessions"))
    sink.write(records(2, table="orders-eu"))
    sink.write(records(1, table="users", start=5))
    sink.write(records(1, table="users-archive", start=9))
    assert [e.source.table for e in rec.written] == ["orders-eu", "orders-eu", "users"]
    assert filtered("route", "table") - before == 3


def test_filter_leaves_out_and_counts_and_table_template_still_sees_the_table():
    rec = RecordingSink("flt")
    sink = shaped(rec, filter={"dynamodb": {"NewImage": {"n": {"N": [{"numeric": [">", 2]}]}}}})
    before = filtered("flt", "filter")
    batch = records(5)
    sink.write(batch)
    assert [e.keys["pk"] for e in rec.written] == ["ORDER#3", "ORDER#4", "ORDER#5"]
    assert filtered("flt", "filter") - before == 2
    assert all(e.source.table == "orders" for e in rec.written)


def test_nothing_left_means_the_wrapped_sink_is_not_called():
    class Exploding(RecordingSink):
        def write(self, batch):
            raise AssertionError("must not be called")

    sink = shaped(Exploding("x"), filter={"eventName": ["REMOVE"]})
    sink.write(records(3))  # returns: the fan-out counts them delivered and the checkpoint moves


def test_transforms_in_order_and_described_in_the_batch():
    rec = RecordingSink("tr")
    seen = []

    class Spy(RecordingSink):
        def write(self, batch):
            seen.append(batch.extra.get("transforms"))
            super().write(batch)

    sink = shaped(Spy("tr"), transforms=[{"type": "rename", "fields": {"email": "contact"}},
                                         {"type": "redact", "paths": ["contact"], "mode": "mask"}])
    sink.write(records(1))
    assert seen == [[{"type": "rename", "fields": {"email": "contact"}},
                     {"type": "redact", "paths": ["contact"], "mode": "mask", "hmac_key_env": None, "mask": "***"}]]
    del rec


def test_attributes_of_the_wrapped_sink_pass_through():
    rec = RecordingSink("pt")
    sink = shaped(rec, tables=["orders"])
    assert sink.name == "pt" and sink.thread_safe is True and sink.wrapped is rec and sink.written is rec.written


def test_build_sinks_wraps_only_shaped_sinks(tmp_path):
    cfgs = [SinkConfig(name="plain", type="redis_cache",
                       options={"url": "redis://127.0.0.1:1", "key_templates": ["k:{pk}"]}),
            SinkConfig(name="shaped", type="redis_cache", tables=["orders"],
                       options={"url": "redis://127.0.0.1:1", "key_templates": ["k:{pk}"]})]
    plain, wrapped = build_sinks(cfgs)
    assert not isinstance(plain, ShapedSink) and isinstance(wrapped, ShapedSink)
    assert wrapped.options.key_templates == ["k:{pk}"]


# -- failures stay per event ---------------------------------------------------------------------------


class Boom(Transform):
    type_name = "boom"

    def apply(self, event):
        if event.keys["pk"] == "ORDER#2":
            raise ValueError("cannot handle this one")
        return event


class KeyChanger(Transform):
    type_name = "key_changer"

    def apply(self, event):
        return with_images(event, before=event.before, after={**event.after, "pk": "other"})


def test_a_transform_error_dead_letters_that_event_only():
    rec = RecordingSink("boom")
    sink = ShapedSink(rec, transforms=[Boom()])
    batch = records(3)
    with pytest.raises(PartialSinkError) as info:
        sink.write(batch)
    assert [e.keys["pk"] for e in rec.written] == ["ORDER#1", "ORDER#3"]
    (event, reason), = info.value.permanent
    assert event is batch.events[1] and "cannot handle this one" in reason and not info.value.retriable


def test_a_transform_that_changes_a_key_attribute_is_refused():
    rec = RecordingSink("kc")
    sink = ShapedSink(rec, transforms=[KeyChanger()])
    batch = records(2)
    with pytest.raises(PartialSinkError) as info:
        sink.write(batch)
    assert rec.written == []
    assert [e for e, _ in info.value.permanent] == list(batch.events)
    assert all("key attribute 'pk'" in r and "never changed" in r for _, r in info.value.permanent)


def test_partial_errors_of_the_wrapped_sink_name_the_original_events():
    """The dead letter holds the change as the stream gave it (redrive re-applies the transforms)."""

    class Partial(RecordingSink):
        def write(self, batch):
            super().write(batch)
            raise PartialSinkError("one refused", permanent=[(batch.events[0], "refused")],
                                   retriable=[(batch.events[1], "later")])

        def flush(self):
            raise PartialSinkError("flush", permanent=[(self.written[0], "lost")])

    sink = shaped(Partial("p"), transforms=[{"type": "redact", "paths": ["email"], "mode": "mask"}])
    batch = records(2)
    with pytest.raises(PartialSinkError) as info:
        sink.write(batch)
    assert info.value.permanent[0][0] is batch.events[0] and info.value.retriable[0][0] is batch.events[1]
    assert info.value.permanent[0][0].after["email"] == "u1@x.test"
    with pytest.raises(PartialSinkError) as flushed:
        sink.flush()
    assert flushed.value.permanent[0][0] is batch.events[0]


# -- built-in transforms -------------------------------------------------------------------------------


def ev(before=None, after=None, op="MODIFY", keys=None, ttl=False):
    keys = keys or {"pk": "USER#1"}
    return make_batch([make_stream_record(event_name=op, keys=keys, old_image=before, new_image=after,
                                          ttl=ttl)]).events[0]


ITEM = {"pk": "USER#1", "email": "a@b.test", "age": Decimal(5), "age_text": "5",
        "card": {"number": "4111111111111111", "brand": "visa", "exp": {"m": Decimal(1), "y": Decimal(30)}},
        "tags": ["a"]}


def test_include_and_exclude_dotted_paths_before_and_after_keys_kept():
    e = ev(before=ITEM, after={**ITEM, "email": "new@b.test"})
    [inc] = check_transform({"type": "include", "paths": ["email", "card.exp.y", "missing.x"]}, [e])
    for image in (inc.before, inc.after):
        assert set(image) == {"pk", "email", "card"} and image["card"] == {"exp": {"y": Decimal(30)}}
    [exc] = check_transform({"type": "exclude", "paths": ["card.number", "tags", "pk"]}, [e])
    for image in (exc.before, exc.after):
        assert "tags" not in image and "number" not in image["card"] and image["card"]["brand"] == "visa"
        assert image["pk"] == "USER#1"  # a key attribute is never excluded
    assert e.after["card"]["number"] == "4111111111111111"  # the input event is unchanged


def test_redact_hmac_keeps_equality_and_types_apart_and_mask():
    e = ev(before=ITEM, after=ITEM)
    [r] = check_transform({"type": "redact", "paths": ["email", "card.number", "age", "age_text", "pk"],
                           "hmac_key": "k1"}, [e])
    assert r.after["email"] == r.before["email"] == hmac_text(b"k1", "a@b.test")
    assert r.after["email"].startswith("hmac-sha256:") and len(r.after["email"]) == len("hmac-sha256:") + 64
    assert r.after["age"] != r.after["age_text"]  # N 5 and S "5" are different values
    assert r.after["pk"] == "USER#1" and r.keys == {"pk": "USER#1"}
    [other_key] = check_transform({"type": "redact", "paths": ["email"], "hmac_key": "k2"}, [e])
    assert other_key.after["email"] != r.after["email"]
    [m] = check_transform({"type": "redact", "paths": ["email", "card"], "mode": "mask", "mask": "[x]"}, [e])
    assert m.after["email"] == "[x]" and m.after["card"] == "[x]"


def test_redact_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_HMAC_KEY", "envkey")
    [r] = check_transform({"type": "redact", "paths": ["email"], "hmac_key_env": "MY_HMAC_KEY"}, [ev(after=ITEM)])
    assert r.after["email"] == hmac_text(b"envkey", "a@b.test")
    monkeypatch.delenv("MY_HMAC_KEY")
    with pytest.raises(ConfigError, match="MY_HMAC_KEY is not set"):
        build_transform({"type": "redact", "paths": ["email"], "hmac_key_env": "MY_HMAC_KEY"})


def test_rename_nested_and_never_onto_or_from_keys():
    e = ev(before=ITEM, after=ITEM)
    [r] = check_transform({"type": "rename", "fields": {"email": "contact", "card.brand": "network", "pk": "id",
                                                        "age": "pk"}}, [e])
    for image in (r.before, r.after):
        assert image["contact"] == "a@b.test" and "email" not in image
        assert image["card"]["network"] == "visa" and "brand" not in image["card"]
        assert image["pk"] == "USER#1" and "id" not in image and image["age"] == 5


def test_drop_ttl_deletes():
    outputs = check_transform({"type": "drop_ttl_deletes"})
    assert [o is None for o in outputs] == [False, False, False, True]
    rec = RecordingSink("ttl")
    sink = shaped(rec, transforms=[{"type": "drop_ttl_deletes"}])
    before = filtered("ttl", "transform")
    sink.write(make_batch([make_stream_record(event_name="REMOVE", keys={"pk": "S#1"}, old_image={"pk": "S#1"},
                                              ttl=True),
                           make_stream_record(event_name="REMOVE", keys={"pk": "S#2"}, old_image={"pk": "S#2"},
                                              sequence_number="000000000000000000002")]))
    assert [e.keys["pk"] for e in rec.written] == ["S#2"]
    assert filtered("ttl", "transform") - before == 1


def test_key_attribute_in_paths_is_skipped_and_logged_once():
    logs = []

    class Log:
        def warning(self, event, **kw):
            logs.append((event, kw))

    rec = RecordingSink("keys")
    sink = shaped(rec, transforms=[{"type": "redact", "paths": ["pk", "email"], "mode": "mask"}])
    sink._log = Log()
    sink.write(records(2))
    sink.write(records(2, start=3))
    assert [e.after["pk"] for e in rec.written] == ["ORDER#1", "ORDER#2", "ORDER#3", "ORDER#4"]
    assert [e.after["email"] for e in rec.written] == ["***"] * 4
    assert len(logs) == 1 and logs[0][0] == "transform_skips_key_attributes" and logs[0][1]["attributes"] == ["pk"]


# -- item 4: a redrive applies the sink's current filter and transforms -------------------------------


def test_redrive_applies_the_current_shaping(tmp_path):
    dlq = DirectoryDeadLetterQueue(tmp_path / "dlq")
    batch = records(3)
    now = datetime.now(timezone.utc)
    for event in batch.events:
        dlq.put(delivery_entry(event, sink="rec", error="was down", attempts=3, first_failure=now, last_failure=now))
    rec = RecordingSink("rec")
    sink = shaped(rec, filter={"dynamodb": {"Keys": {"pk": {"S": ["ORDER#1", "ORDER#3"]}}}},
                  transforms=[{"type": "exclude", "paths": ["card"]}])
    report = redrive(dlq, {"rec": sink}, logger=LOG)
    assert report.ok, report
    assert [e.keys["pk"] for e in rec.flushed] == ["ORDER#1", "ORDER#3"]
    assert all("card" not in e.after for e in rec.flushed)
    assert list(dlq.list()) == []  # the filtered-out one counts as delivered too


# -- configuration -------------------------------------------------------------------------------------


def _config(tmp_path: Path, sink: dict, source: dict | None = None) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "source": source or {"table": "app"},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "c.sqlite")},
        "sinks": [{"name": "cache", "type": "redis_cache",
                   "options": {"url": "redis://127.0.0.1:1", "key_templates": ["item:{pk}"]}, **sink}],
    }))
    return path


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connectors.app.cli", "config", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_config_check_bad_pattern_is_one_line_naming_sink_and_part(tmp_path):
    proc = _check(_config(tmp_path, {"filter": {"dynamodb": {"NewImage": {"status": {"S": [{"prefix": 5}]}}}}}))
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "sinks[0] (cache, type redis_cache): filter.dynamodb.NewImage.status.S[0]: prefix takes a string" in lines[0]


def test_config_check_accepts_a_pasted_filter_criteria_and_reports_ok(tmp_path):
    criteria = {"Filters": [{"Pattern": '{"dynamodb": {"Keys": {"pk": {"S": [{"prefix": "ORDER#"}]}}}}'}]}
    proc = _check(_config(tmp_path, {"filter": criteria, "tables": ["ap*"],
                                     "transforms": [{"type": "drop_ttl_deletes"}]}))
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout and "cache (redis_cache; tables ap*; filter; 1 transform(s))" in proc.stdout


def test_config_check_transform_and_tables_errors(tmp_path):
    proc = _check(_config(tmp_path, {"transforms": [{"type": "exclude", "paths": ["key_id"]},
                                                    {"type": "redact", "paths": ["a"], "hmac_key": "s3cr3t-value",
                                                     "mode": "mask"}]}))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert "transforms[0] (exclude): paths: path 'key_id': keys and key_id are never changed" in lines[0]
    assert "transforms[1] (redact): hmac_key / hmac_key_env apply to mode hmac only" in lines[1]
    assert "s3cr3t-value" not in proc.stderr
    proc = _check(_config(tmp_path, {"tables": ["orders-*"]}, source={"tables": ["app", "users"]}))
    assert proc.returncode == 2 and "match none of the source tables (app, users)" in proc.stderr


def test_load_settings_keeps_shaping_fields(tmp_path):
    settings = load_settings(_config(tmp_path, {"tables": ["app"], "filter": {"eventName": ["INSERT"]}}))
    assert settings.sinks[0].tables == ["app"] and settings.sinks[0].filter == {"eventName": ["INSERT"]}


def test_plugin_transform_options_model_is_validated():
    class Opts(TransformOptions):
        width: int

    class Pad(Transform):
        Options = Opts
        type_name = "pad"

    import pipeline.shaping.transforms as tr

    tr.BUILTIN_TRANSFORMS["pad_test"] = Pad
    try:
        with pytest.raises(ConfigError) as info:
            build_transform({"type": "pad_test", "width": "wide"})
        assert "width" in info.value.problems[0]
        assert build_transform({"type": "pad_test", "width": 3}).options.width == 3
    finally:
        del tr.BUILTIN_TRANSFORMS["pad_test"]


def test_unflushed_events_of_a_batch_keep_their_position():
    rec = RecordingSink("pos")
    sink = shaped(rec, transforms=[{"type": "exclude", "paths": ["email"]}])
    batch = records(2)
    sink.write(batch)
    assert [(e.source, e.version, e.key_id) for e in rec.written] == [(e.source, e.version, e.key_id)
                                                                      for e in batch.events]
    assert isinstance(batch, Batch)


def test_with_images_drops_stale_raw_images_of_an_event_that_keeps_them():
    """The event keeps raw AttributeValue maps (issue 16): a transformed event must not carry the
    untransformed raw image next to a redacted one (a sink rendering the raw form would undo it)."""
    base = records(1).events[0]
    assert base.raw_new_image is not None
    original = dict(base.after)
    [out] = check_transform({"type": "redact", "paths": ["email"], "mode": "mask"}, [base])
    assert out.after["email"] == "***" and out.raw_new_image["email"] == {"S": "***"}
    assert original["email"] != "***" and base.after["email"] == original["email"]  # the input is unchanged


def test_reindex_opens_a_shaped_opensearch_sink():
    """``opensearch reindex`` fills through the sink's shaping: the wrapper passes its type check
    and forwards the OpenSearch-specific calls (pin, prepare_replay, …) to the wrapped sink."""
    from connectors.app.reindex import _open_sink
    from connectors.opensearch.sink import OpenSearchSink
    from pipeline.config import Settings

    settings = Settings(source={"table": "app"}, checkpoints={"store": "sqlite", "sqlite_path": "/nonexistent/x"},
                        sinks=[{"name": "search", "type": "opensearch",
                                "options": {"hosts": ["http://127.0.0.1:1"], "index": "{table}"},
                                "filter": {"dynamodb": {"Keys": {"pk": {"S": [{"prefix": "ORDER#"}]}}}}}])
    sink = _open_sink(settings, "search", "test", LOG, pin={"app": "app-v2"})
    assert isinstance(sink, ShapedSink) and isinstance(sink.wrapped, OpenSearchSink)
    assert sink.wrapped._pinned == {"app": "app-v2"} and callable(sink.prepare_replay)


def test_a_flush_forgets_only_the_originals_written_before_it():
    """Another shard's thread may write while a flush runs: its events stay mapped to their
    originals, so a later PartialSinkError still dead-letters the stream's change."""
    holder = {}

    class Slow(RecordingSink):
        def flush(self):
            if "during" not in holder:
                holder["during"] = True
                holder["sink"].write(records(1, start=7))  # written while this flush runs
                return super().flush()
            raise PartialSinkError("later", permanent=[(self.written[-1], "lost")])

    sink = shaped(Slow("slow"), transforms=[{"type": "redact", "paths": ["email"], "mode": "mask"}])
    holder["sink"] = sink
    sink.write(records(1))
    sink.flush()
    with pytest.raises(PartialSinkError) as info:
        sink.flush()
    (event, _), = info.value.permanent
    assert event.keys["pk"] == "ORDER#7" and event.after["email"] == "u7@x.test"  # the original
