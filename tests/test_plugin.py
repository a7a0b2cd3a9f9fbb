"""The example sink plugin (examples/custom_sink, type ``jsonl_file``) as a user would use it.

The session fixture ``plugin_installed`` pip-installs the example distribution into the running
environment (editable, ``--no-deps``), exactly as the plugin README tells users to, and makes it
importable in this process too. Registry and CLI checks then run in fresh subprocesses, so the
entry points come from the installed metadata and nothing is cached from before the install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import structlog

from pipeline.config import SinkConfig
from pipeline.errors import ConfigError, FatalSinkError
from pipeline.registry import build_sinks
from pipeline.render import event_from_record_dict, event_to_json_line
from pipeline.sink import Sink, SinkContext
from pipeline.testing import check_sink_contract, make_batch, make_stream_record, sample_batch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "custom_sink"
DIST_NAME = "ddb-cdc-jsonl-sink"
ENTRY_POINT_VALUE = "ddb_cdc_jsonl_sink.sink:JsonlFileSink"
PIP_TIMEOUT_S = 300


# -- installing the plugin -------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _can_build_without_isolation() -> bool:
    """True when this environment's setuptools can build an editable wheel on its own.

    PEP 660 editable installs need setuptools >= 64; before 70.1 setuptools also needs the
    ``wheel`` package. With ``--no-build-isolation`` pip then needs no index at all (offline);
    otherwise pip fetches setuptools from the configured index into an isolated build env.
    """
    try:
        version = _version_tuple(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:
        return False
    if version >= (70, 1):
        return True
    return version >= (64,) and importlib.util.find_spec("wheel") is not None


def _pip_install(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q"]
    if _can_build_without_isolation():
        cmd.append("--no-build-isolation")
    cmd.extend(args)
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)


def _activate_in_this_process(dist_name: str, module: str) -> None:
    """Make a just-installed distribution importable here (site only reads .pth files at start-up)."""
    importlib.invalidate_caches()
    if importlib.util.find_spec(module) is not None:
        return
    dist = importlib.metadata.distribution(dist_name)
    for file in dist.files or ():
        if file.suffix != ".pth":
            continue
        pth = Path(dist.locate_file(file))
        for line in pth.read_text(encoding="utf-8").splitlines():
            if line.startswith(("import ", "import\t")):
                exec(line)  # what site.py does with such a line
            elif line.strip() and not line.startswith("#"):
                entry = str((pth.parent / line.strip()).resolve())
                if entry not in sys.path:
                    sys.path.append(entry)
    importlib.invalidate_caches()


def ensure_plugin_installed() -> importlib.metadata.Distribution:
    """pip-install examples/custom_sink (editable, no deps) and return its distribution.

    Installs the main project first (editable, no deps) only if ``ddb-cdc`` is not installed as a
    distribution, since the plugin's metadata depends on it and its entry points list the built-ins.

    Concurrent test processes (pytest-xdist workers, other checkouts on the machine) share one
    site-packages: a reinstall while another process imports the plugin removes it for a moment.
    So the install runs under an exclusive file lock, and is skipped when the plugin is already
    installed editable from this very directory.
    """
    import fcntl

    lock_path = Path(sys.prefix) / ".ddb-cdc-test-plugin-install.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                importlib.metadata.distribution("ddb-cdc")
            except importlib.metadata.PackageNotFoundError:
                _pip_install("-e", str(ROOT))
            if not _installed_from(DIST_NAME, EXAMPLE_DIR):
                _pip_install("-e", str(EXAMPLE_DIR))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _activate_in_this_process(DIST_NAME, "ddb_cdc_jsonl_sink")
    return importlib.metadata.distribution(DIST_NAME)


def _installed_from(dist_name: str, directory: Path) -> bool:
    """True when ``dist_name`` is installed editable from ``directory`` (PEP 610 direct_url.json)."""
    try:
        text = importlib.metadata.distribution(dist_name).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not text:
        return False
    info = json.loads(text)
    return (info.get("dir_info", {}).get("editable", False)
            and info.get("url", "").rstrip("/") == directory.resolve().as_uri().rstrip("/"))


@pytest.fixture(scope="session")
def plugin_installed() -> importlib.metadata.Distribution:
    return ensure_plugin_installed()


def _clean_env() -> dict[str, str]:
    """The environment for subprocesses: no DDB_CDC_* overrides, this checkout's code first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDB_CDC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=_clean_env())


def _config(tmp_path: Path, sinks_yaml: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        source:
          table: orders
        checkpoints:
          store: sqlite
          sqlite_path: {db}
        sinks:
        """).format(db=tmp_path / "checkpoints.sqlite") + textwrap.dedent(sinks_yaml), encoding="utf-8")
    return path


# -- 1. installed, registered, listed, validated ---------------------------------------------


def test_installed_distribution_registers_the_entry_point(plugin_installed):
    assert plugin_installed.metadata["Name"] == DIST_NAME
    assert any(req.startswith("ddb-cdc") for req in plugin_installed.requires or ())
    eps = [ep for ep in plugin_installed.entry_points if ep.group == "ddb_cdc.sinks"]
    assert [(ep.name, ep.value) for ep in eps] == [("jsonl_file", ENTRY_POINT_VALUE)]


def test_registry_finds_the_plugin_in_a_fresh_process(plugin_installed, tmp_path):
    code = textwrap.dedent("""\
        import json, ddb_cdc_jsonl_sink
        from pipeline.registry import available_sink_types, load_sink_class
        from pipeline.sink import Sink
        cls = load_sink_class("jsonl_file")
        print(json.dumps({"types": available_sink_types(), "cls": f"{cls.__module__}:{cls.__qualname__}",
                          "is_sink": issubclass(cls, Sink), "thread_safe": cls.thread_safe,
                          "file": ddb_cdc_jsonl_sink.__file__}))
        """)
    proc = _python(["-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["types"]["jsonl_file"] == ENTRY_POINT_VALUE
    assert {"opensearch", "s3_audit", "redis_cache"} <= set(out["types"])
    assert out["cls"] == ENTRY_POINT_VALUE
    assert out["is_sink"] is True and out["thread_safe"] is False
    # the editable install points at this checkout's example, not at some other copy
    assert Path(out["file"]).resolve().is_relative_to(EXAMPLE_DIR)


def test_cli_sinks_lists_the_plugin(plugin_installed, tmp_path):
    proc = _python(["-m", "connectors.app.cli", "sinks"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"jsonl_file\t{ENTRY_POINT_VALUE}" in lines
    assert {line.split("\t")[0] for line in lines} >= {"jsonl_file", "opensearch", "s3_audit", "redis_cache"}


def test_config_check_accepts_a_valid_plugin_sink(plugin_installed, tmp_path):
    config = _config(tmp_path, f"""\
        - name: files
          type: jsonl_file
          options:
            directory: {tmp_path / 'out'}
            fsync: false
        """)
    proc = _python(["-m", "connectors.app.cli", "config", "check", "--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "files (jsonl_file)" in proc.stdout
    assert not (tmp_path / "out").exists()  # a check starts nothing


@pytest.mark.parametrize(
    "sinks_yaml, expected",
    [
        pytest.param("""\
            - name: files
              type: jsonl_file
              options:
                fsync: true
            """, ["sinks[0] (files, type jsonl_file)", "options.directory", "Field required"],
            id="missing-directory"),
        pytest.param("""\
            - name: files
              type: jsonl_file
              options:
                directory: out
                fsnyc: false
            """, ["sinks[0] (files, type jsonl_file)", "options.fsnyc", "Extra inputs are not permitted"],
            id="misspelt-option"),
        pytest.param("""\
            - name: files
              type: jsonl_file
              options:
                directory: ""
            """, ["sinks[0] (files, type jsonl_file)", "options.directory"],
            id="empty-directory"),
        pytest.param("""\
            - name: elsewhere
              type: no_such_sink
            """, ["sinks[0] (elsewhere, type no_such_sink)", "unknown sink type 'no_such_sink'", "jsonl_file"],
            id="unknown-type"),
    ],
)
def test_config_check_reports_plugin_config_errors_in_one_line(plugin_installed, tmp_path, sinks_yaml, expected):
    config = _config(tmp_path, sinks_yaml)
    proc = _python(["-m", "connectors.app.cli", "config", "check", "--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    line = lines[0]
    assert line.startswith("ddb-cdc: config error: ") and str(config) in line
    for part in expected:
        assert part in line, line
    assert proc.stdout == ""


# -- 2. the installed plugin receives changes ------------------------------------------------


def _build(directory: Path, **options) -> Sink:
    [sink] = build_sinks([SinkConfig(name="files", type="jsonl_file",
                                     options={"directory": str(directory), **options})])
    return sink


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_installed_plugin_receives_changes_once(plugin_installed, tmp_path):
    sink = _build(tmp_path / "out")
    assert type(sink).__module__ == "ddb_cdc_jsonl_sink.sink"
    assert sink.name == "files" and sink.options.directory == str(tmp_path / "out") and sink.options.fsync is True

    check_sink_contract(lambda: sink)  # the sample batch written, flushed, written again, flushed

    expected = sample_batch().events
    data = tmp_path / "out" / "demo-table.jsonl"
    lines = _lines(data)
    assert lines == [event_to_json_line(e) for e in expected]  # each event exactly once, in order
    assert [event_from_record_dict(orjson.loads(line)) for line in lines] == list(expected)
    assert [orjson.loads(line)["op"] for line in lines] == ["c", "u", "d"]
    assert sink.skipped == len(expected)  # the second write added nothing

    state = orjson.loads((tmp_path / "out" / "demo-table.jsonl.state").read_bytes())
    assert state["committed_bytes"] == data.stat().st_size
    assert state["shards"] == {expected[0].source.stream_arn: {expected[0].source.shard_id: expected[-1].sequence_number}}

    from ddb_cdc_jsonl_sink import read_events

    assert list(read_events(tmp_path / "out", "demo-table")) == list(expected)


def _context() -> SinkContext:
    return SinkContext(sink_name="files", worker_id="test", logger=structlog.get_logger())


def test_restart_after_crash_keeps_each_change_once(plugin_installed, tmp_path):
    """A worker killed between write and flush, with a torn last line, then a replay from the checkpoint."""
    out = tmp_path / "out"
    child = textwrap.dedent(f"""\
        import os
        from dataclasses import replace
        from pipeline.config import SinkConfig
        from pipeline.registry import build_sinks
        from pipeline.sink import SinkContext
        from pipeline.testing import sample_batch
        [sink] = build_sinks([SinkConfig(name="files", type="jsonl_file", options={{"directory": {str(out)!r}}})])
        sink.open(SinkContext(sink_name="files", worker_id="child", logger=None))
        batch = sample_batch()
        sink.write(replace(batch, events=batch.events[:1]))
        sink.flush()                                          # INSERT committed (checkpoint may move)
        sink.write(replace(batch, events=batch.events[1:]))   # MODIFY, REMOVE appended, never flushed
        with open({str(out / 'demo-table.jsonl')!r}, "ab") as fh:
            fh.write(b'{{"op":"u","operation":"MOD')        # a torn line, as from a crash mid-write
        os._exit(9)                                           # killed: no flush, no close
        """)
    proc = _python(["-c", child], cwd=tmp_path)
    assert proc.returncode == 9, proc.stderr
    data = out / "demo-table.jsonl"
    events = sample_batch().events
    assert len(_lines(data)) == 4  # INSERT, MODIFY, REMOVE and the torn line

    # The next worker replays from the checkpoint (here: from the start, the worst case).
    sink = _build(out)
    check_sink_contract(lambda: sink)
    assert _lines(data) == [event_to_json_line(e) for e in events]
    assert sink.skipped == len(events) + 1  # INSERT in the first write, all three in the second


def test_lost_state_file_is_rebuilt_from_the_data(plugin_installed, tmp_path):
    out = tmp_path / "out"
    check_sink_contract(lambda: _build(out))
    (out / "demo-table.jsonl.state").unlink()
    sink = _build(out)
    check_sink_contract(lambda: sink)
    assert _lines(out / "demo-table.jsonl") == [event_to_json_line(e) for e in sample_batch().events]
    assert sink.skipped == 2 * len(sample_batch().events)
    state = orjson.loads((out / "demo-table.jsonl.state").read_bytes())
    assert state["committed_bytes"] == (out / "demo-table.jsonl").stat().st_size


def test_shards_and_tables_are_tracked_apart_with_numeric_sequence_order(plugin_installed, tmp_path):
    out = tmp_path / "out"
    k = {"pk": "a"}
    # 21 digits, then 22 digits: as text "1000…" < "9000…", as numbers it is the later record
    shard_a = make_batch([
        make_stream_record(keys=k, new_image={"pk": "a", "v": 1}, sequence_number="900000000000000000000"),
        make_stream_record(event_name="MODIFY", keys=k, new_image={"pk": "a", "v": 2},
                           sequence_number="1000000000000000000000"),
    ], shard_id="shardId-A")
    # another shard with lower sequence numbers than shard A's: must not be skipped
    shard_b = make_batch([
        make_stream_record(keys={"pk": "b"}, new_image={"pk": "b"}, sequence_number="100000000000000000001"),
    ], shard_id="shardId-B")
    other_table = make_batch([
        make_stream_record(keys={"pk": "c"}, new_image={"pk": "c"}, sequence_number="100000000000000000001"),
    ], table="other-table", shard_id="shardId-A")

    sink = _build(out, fsync=False)
    sink.open(_context())
    for batch in (shard_a, shard_b, other_table, shard_a, shard_b):  # with repeats
        sink.write(batch)
    sink.flush()
    sink.write(shard_a)
    sink.close()

    assert _lines(out / "demo-table.jsonl") == [event_to_json_line(e) for e in (*shard_a.events, *shard_b.events)]
    assert _lines(out / "other-table.jsonl") == [event_to_json_line(e) for e in other_table.events]


def test_one_directory_one_sink(plugin_installed, tmp_path):
    first = _build(tmp_path / "out")
    first.open(_context())
    try:
        second = _build(tmp_path / "out")
        with pytest.raises(FatalSinkError, match="in use by another sink"):
            second.open(_context())
    finally:
        first.close()
    third = _build(tmp_path / "out")  # released by close
    third.open(_context())
    third.close()


def test_options_are_validated_by_the_plugin_model(plugin_installed):
    with pytest.raises(ConfigError) as info:
        build_sinks([SinkConfig(name="files", type="jsonl_file", options={"fsync": "sometimes"})])
    text = "\n".join(info.value.problems)
    assert "sinks[0] (files, type jsonl_file): options.directory: Field required" in text
    assert "options.fsync" in text
