"""Exit codes of every ``ddb-cdc`` command (README "Exit codes"; issue 14 item 4): a usage or
configuration mistake exits 2 with one line on stderr and no traceback; a failure at run time
exits 1. In process, with nothing listening on the addresses the configs name."""

from __future__ import annotations

import pytest

from connectors.app.cli import main
from connectors.embedded.servers import free_port

STREAM_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/orders/stream/2026-11-21T23:02:22.922"


def _config(tmp_path, extra: str = "") -> str:
    dead = free_port()  # nothing listens here
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"source: {{stream_arn: '{STREAM_ARN}'}}\n"
        f"aws: {{region: us-east-1, endpoint_url: 'http://127.0.0.1:{dead}', max_attempts: 1}}\n"
        f"checkpoints: {{store: sqlite, sqlite_path: '{tmp_path / 'l.sqlite'}'}}\n"
        f"dead_letter: {{directory: '{tmp_path / 'dlq'}'}}\n"
        "sinks:\n"
        f"  - {{name: cache, type: redis_cache, options: {{url: 'redis://127.0.0.1:{dead}/0', key_templates: ['k:{{pk}}']}}}}\n"
        f"  - {{name: search, type: opensearch, options: {{url: 'http://127.0.0.1:{dead}', index: orders}}}}\n"
        + extra)
    return str(cfg)


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr().err


USAGE = {
    "run": lambda c, t: ["run", "--config", str(t / "missing.yaml")],
    "config check": lambda c, t: ["config", "check", "--config", str(t / "missing.yaml")],
    "sinks": lambda c, t: ["sinks", "--no-such-flag"],
    "status": lambda c, t: ["status", "--config", str(t / "missing.yaml")],
    "demo": lambda c, t: ["demo", "--changes", "many"],
    "dlq list": lambda c, t: ["dlq", "list", "--config", str(t / "missing.yaml")],
    "dlq redrive": lambda c, t: ["dlq", "redrive", "--config", c, "--sink", "nope"],
    "checkpoints set": lambda c, t: ["checkpoints", "set", "--config", c, "--all", "--to", "000123"],
    "checkpoints set --shard": lambda c, t: ["checkpoints", "set", "--config", c, "--to", "yesterday", "--all"],
    "replay": lambda c, t: ["replay", "--config", c, "--sink", "cache"],
    "replay --from-archive --until": lambda c, t: ["replay", "--config", c, "--from-archive", "s3://b/p",
                                                   "--from", "trim-horizon", "--sink", "cache"],
    "workload": lambda c, t: ["workload", "--config", c, "--table", "orders", "--changes", "-3"],
    "opensearch reindex": lambda c, t: ["opensearch", "reindex", "--config", c, "--sink", "cache"],
}


@pytest.mark.parametrize("command", sorted(USAGE))
def test_a_usage_mistake_exits_2_with_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DDB_CDC_CONFIG", raising=False)
    code, err = _run(USAGE[command](_config(tmp_path), tmp_path), capsys)
    assert code == 2, (command, code, err)
    assert "Traceback" not in err
    if command != "sinks" and command != "demo":  # argparse prints its usage block, then one line
        assert len(err.strip().splitlines()) == 1, err


RUNTIME = {
    # the stream's endpoint does not answer: the source cannot be resolved
    "status": lambda c, t: ["status", "--config", c],
    # the archive's S3 endpoint does not answer
    "replay --from-archive": lambda c, t: ["replay", "--config", c, "--from-archive", "s3://bucket/prefix",
                                           "--sink", "cache", "--no-progress"],
    # a file named on the command line that cannot be read (InputFileError)
    "checkpoints import": lambda c, t: ["checkpoints", "import", "--config", c, str(t / "absent.json")],
    "replay --from checkpoint-file": lambda c, t: ["replay", "--config", c, "--from", "checkpoint-file",
                                                   str(t / "absent.json"), "--sink", "cache", "--no-progress"],
    # the table's endpoint does not answer
    "workload": lambda c, t: ["workload", "--config", c, "--table", "orders", "--changes", "3"],
}


@pytest.mark.parametrize("command", sorted(RUNTIME))
def test_a_failure_at_run_time_exits_1_with_one_line(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DDB_CDC_CONFIG", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    code, err = _run(RUNTIME[command](_config(tmp_path), tmp_path), capsys)
    assert code == 1, (command, code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
