"""Secrets never reach the logs: not through exception tracebacks (frame locals), not through
library loggers' plain-text lines, not through URLs — and one redactor that never echoes
credentials, even for URLs it cannot parse."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import structlog
import yaml

from pipeline.logs import configure_logging, get_logger, register_secrets_of
from pipeline.redact import UNPARSABLE, redact_url

ROOT = Path(__file__).resolve().parent.parent
AWS_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
OS_PASSWORD = "os-Pa55word-that-is-long"
REDIS_PASSWORD = "redis-hunter2-very-secret"


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    yield stream
    configure_logging("INFO", "auto")
    structlog.reset_defaults()


def _fail_with_locals(aws_secret_access_key: str) -> None:
    password = OS_PASSWORD  # noqa: F841 — a local a traceback renderer could show
    raise RuntimeError("the shard failed")


def test_tracebacks_and_library_lines_carry_no_secret(log_stream):
    register_secrets_of({"aws": {"secret_access_key": AWS_SECRET},
                         "sinks": [{"options": {"url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"}}]})
    log = get_logger(worker_id="w1")
    try:
        _fail_with_locals(AWS_SECRET)
    except RuntimeError:
        log.exception("shard_failed", error="RuntimeError: the shard failed")
    logging.getLogger("botocore.credentials").warning("loaded key %s for redis://:%s@h", AWS_SECRET, REDIS_PASSWORD)
    text = log_stream.getvalue()
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert any(line.get("event") == "shard_failed" for line in lines)
    assert any(line.get("logger") == "botocore.credentials" for line in lines), text  # JSON, not plain text
    for secret in (AWS_SECRET, OS_PASSWORD, REDIS_PASSWORD):
        assert secret not in text, secret
    assert '"locals"' not in text


@pytest.mark.parametrize("secret", ["Pässwört-2024!-long", 'quo"te\\back-slash-pw', "пароль-секрет-123"])
def test_a_secret_with_non_ascii_quotes_or_backslashes_is_scrubbed_in_every_renderer(log_stream, secret):
    """structlog's JSON renderer and the stdlib formatter escape non-ASCII as \\uXXXX and quote
    ``"`` and ``\\``: the scrubber knows those forms too (a reviewer found the secret readable)."""
    register_secrets_of({"aws": {"secret_access_key": secret}})
    log = get_logger(worker_id="w1")
    log.warning("connect_failed", detail=f"key={secret}")
    try:
        raise RuntimeError(f"bad key {secret}")
    except RuntimeError:
        log.exception("shard_failed")
    logging.getLogger("botocore.credentials").warning("loaded key %s", secret)
    text = log_stream.getvalue()
    import json as _json

    for form in {secret, _json.dumps(secret)[1:-1], orjson.dumps(secret).decode()[1:-1], repr(secret)[1:-1]}:
        assert form not in text, (form, text)
    assert "connect_failed" in text and "shard_failed" in text


@pytest.mark.parametrize("url,leak", [
    ("redis://:hunter2hunter2@127.0.0.1:6379/0", "hunter2hunter2"),
    ("redis://127.0.0.1:6379/0?password=hunter2hunter2", "hunter2hunter2"),
    ("rediss://user:p%40ss%2Fword@[::1]:6380/1", "p%40ss%2Fword"),
    ("https://admin:s3cr3t-pw@[fe80::1]:9200", "s3cr3t-pw"),
    ("redis://:pa/ss-word-x@host:6379", "ss-word-x"),          # unencoded / in the password
    ("http://user:pw-123456@[::1:9200", "pw-123456"),           # unclosed IPv6 bracket
    ("http://user:pw-123456@host:99999999", "pw-123456"),       # bad port
    ("https://TOKEN-abcdef123456@host/x", "TOKEN-abcdef123456"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Signature=abcdef987654&X-Amz-Credential=AKIAXYZ", "abcdef987654"),
])
def test_the_redactor_never_returns_a_credential(url, leak):
    out = redact_url(url)
    assert leak not in out
    assert out == UNPARSABLE or "***" in out


def test_the_redactor_keeps_what_is_not_secret():
    assert redact_url("https://search.example.com:443/path?refresh=true") == \
        "https://search.example.com:443/path?refresh=true"
    assert redact_url("redis://:pw-x@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


@pytest.mark.e2e
def test_a_failing_worker_run_logs_no_configured_secret(tmp_path):
    """The real CLI, every sink configured with credentials and nothing reachable: it fails, and
    not one of its log lines holds a secret."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"stream_arn": "arn:aws:dynamodb:us-east-1:000000000000:table/orders/stream/2026-01-01T00:00:00.000"},
        "aws": {"region": "us-east-1", "streams_endpoint_url": "http://127.0.0.1:9", "max_attempts": 1,
                "access_key_id": "AKIAEXAMPLEEXAMPLE", "secret_access_key": AWS_SECRET, "connect_timeout_s": 1},
        "checkpoints": {"store": "sqlite", "sqlite_path": str(tmp_path / "l.sqlite")},
        "dead_letter": {"directory": str(tmp_path / "dlq")},
        "log": {"format": "json", "level": "DEBUG"},
        "worker": {"sink_open_timeout_s": 2, "shutdown_grace_s": 5},
        "sinks": [
            {"name": "search", "type": "opensearch",
             "options": {"hosts": [f"http://admin:{OS_PASSWORD}@127.0.0.1:9"], "timeout_s": 1, "max_retries": 0}},
            {"name": "cache", "type": "redis_cache",
             "options": {"url": f"redis://127.0.0.1:9/0?password={REDIS_PASSWORD}", "key_templates": ["k:{pk}"]}},
        ],
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDB_CDC_", "AWS_"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "connectors.app.cli", "run", "--config", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.strip()
    for secret in (AWS_SECRET, OS_PASSWORD, REDIS_PASSWORD):
        assert secret not in out, f"{secret} leaked: {out[-2000:]}"
