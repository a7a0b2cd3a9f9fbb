"""Configuration and CLI: YAML + DDB_CDC_* env overrides, one-line errors, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_settings
from pipeline.errors import ConfigError
from pipeline.registry import build_sinks

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "connectors.app.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=str(ROOT), timeout=120)


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


GOOD = {
    "source": {"table": "orders"},
    "sinks": [{"name": "cache", "type": "redis_cache",
               "options": {"url": "redis://127.0.0.1:6379/0", "key_templates": ["order:{pk}"]}}],
}


def test_example_config_is_valid():
    result = run_cli("config", "check", "--config", "examples/config.yaml")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout and "3 sink(s)" in result.stdout


def test_env_overrides_yaml(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("DDB_CDC_SOURCE__START_POSITION", "LATEST")
    monkeypatch.setenv("DDB_CDC_AWS__ENDPOINT_URL", "http://127.0.0.1:4566")
    monkeypatch.setenv("DDB_CDC_CHECKPOINTS__STORE", "sqlite")
    settings = load_settings(path)
    assert settings.source.table == "orders"  # from the file
    assert settings.source.start_position == "LATEST"  # from the environment
    assert settings.aws.endpoint_for("dynamodbstreams") == "http://127.0.0.1:4566"
    assert settings.checkpoints.store == "sqlite"


def test_env_only_configuration(monkeypatch):
    monkeypatch.setenv("DDB_CDC_SOURCE__TABLE", "envtable")
    monkeypatch.setenv("DDB_CDC_SINKS", '[{"name": "c", "type": "redis_cache", '
                                        '"options": {"url": "redis://x", "key_templates": ["k:{pk}"]}}]')
    settings = load_settings(None)
    assert settings.source.table == "envtable" and settings.sinks[0].name == "c"


@pytest.mark.parametrize("data, expected", [
    ({**GOOD, "source": {}}, "source: set source.table"),
    ({**GOOD, "source": {"table": "t", "max_records_per_call": 5000}}, "source.max_records_per_call"),
    ({**GOOD, "surprise": 1}, "surprise: Extra inputs are not permitted"),
    ({**GOOD, "sinks": []}, "sinks: List should have at least 1 item"),
    ({**GOOD, "sinks": GOOD["sinks"] * 2}, "used twice"),
    ({**GOOD, "checkpoints": {"store": "etcd"}}, "checkpoints.store"),
])
def test_invalid_settings_name_the_field(tmp_path, data, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, data))
    assert any(expected in line for line in info.value.problems), info.value.problems
    assert all(line.startswith(str(tmp_path)) for line in info.value.problems)


def test_sink_option_errors_name_sink_and_field(tmp_path):
    data = {**GOOD, "sinks": [
        {"name": "search", "type": "opensearch", "options": {"index": "x"}},
        {"name": "cache", "type": "redis_cache", "options": {"url": "redis://h", "key_templates": ["a:{"]}},
        {"name": "audit", "type": "s3_audit", "options": {"bucket": "b", "colour": "red"}},
    ]}
    settings = load_settings(write(tmp_path, data))
    with pytest.raises(ConfigError) as info:
        build_sinks(settings.sinks, "cfg.yaml")
    problems = info.value.problems
    assert "cfg.yaml: sinks[0] (search, type opensearch): options.hosts: Field required" in problems
    assert any(p.startswith("cfg.yaml: sinks[1] (cache, type redis_cache): options.key_templates") for p in problems)
    assert any(p.startswith("cfg.yaml: sinks[2] (audit, type s3_audit): options.colour") for p in problems)


def test_cli_config_errors_exit_2_one_line_each_no_traceback(tmp_path):
    data = {**GOOD, "sinks": [
        {"name": "x", "type": "no_such_sink"},
        {"name": "search", "type": "opensearch", "options": {"hosts": []}},
    ]}
    path = write(tmp_path, data)
    for command in (["config", "check"], ["run"]):
        result = run_cli(*command, "--config", str(path))
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 2, lines
        assert "unknown sink type 'no_such_sink'" in lines[0] and "sinks[0] (x" in lines[0]
        assert "sinks[1] (search, type opensearch): options.hosts" in lines[1]
        assert "Traceback" not in result.stderr


def test_cli_bad_yaml_and_missing_file(tmp_path):
    result = run_cli("config", "check", "--config", str(write(tmp_path, "source: [unclosed\n")))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "file not found" in result.stderr


def test_secrets_are_not_echoed_in_errors(tmp_path):
    data = {**GOOD, "sinks": [{"name": "search", "type": "opensearch",
                               "options": {"hosts": ["http://h:9200"],
                                           "auth": {"type": "basic", "username": "u", "password": 12345678}}}]}
    result = run_cli("config", "check", "--config", str(write(tmp_path, data)))
    assert result.returncode == 2
    assert "12345678" not in result.stderr


def test_sinks_command_lists_builtins():
    result = run_cli("sinks")
    assert result.returncode == 0
    names = {line.split("\t")[0] for line in result.stdout.splitlines()}
    assert {"opensearch", "s3_audit", "redis_cache"} <= names


def test_run_against_missing_table_is_one_line(tmp_path, dynamodb_local, aws_env):
    data = {**GOOD, "source": {"table": "does-not-exist"},
            "aws": {"region": "us-east-1", "dynamodb_endpoint_url": dynamodb_local.endpoint},
            "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "c.sqlite")}}
    result = run_cli("run", "--config", str(write(tmp_path, data)),
                     env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "table 'does-not-exist' not found" in lines[0], result.stderr
