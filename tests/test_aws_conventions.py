"""AWS conventions: AWS_MAX_ATTEMPTS / AWS_RETRY_MODE are honoured when the config sets no
retries, and a missing region is never a silent us-east-1."""

from __future__ import annotations

import io

import structlog

from connectors.aws import make_client
from pipeline.awsconfig import AwsConfig
from pipeline.logs import configure_logging


def _retries(client):
    return client.meta.config.retries


def test_environment_retry_settings_apply_when_the_config_sets_none(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    retries = _retries(make_client("dynamodb", AwsConfig(region="eu-west-1")))
    assert retries["total_max_attempts"] == 4 and retries["mode"] == "adaptive"
    # the configuration wins over the environment
    retries = _retries(make_client("dynamodb", AwsConfig(region="eu-west-1", max_attempts=2)))
    assert retries["total_max_attempts"] == 2


def test_defaults_without_environment(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    retries = _retries(make_client("s3", AwsConfig(region="eu-west-1")))
    assert retries["total_max_attempts"] == 10 and retries["mode"] == "standard"


def test_no_region_anywhere_is_a_logged_warning_not_silence(monkeypatch, tmp_path):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import connectors.aws as aws_mod

    monkeypatch.setattr(aws_mod, "_warned", set())
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    try:
        client = make_client("dynamodb", AwsConfig())
    finally:
        configure_logging("INFO", "auto")
        structlog.reset_defaults()
    assert client.meta.region_name == "us-east-1"
    assert "aws_region_defaulted" in stream.getvalue()
    # with a region from the environment nothing is said
    monkeypatch.setattr(aws_mod, "_warned", set())
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    try:
        assert make_client("dynamodb", AwsConfig()).meta.region_name == "ap-south-1"
    finally:
        configure_logging("INFO", "auto")
        structlog.reset_defaults()
    assert "aws_region_defaulted" not in stream.getvalue()
