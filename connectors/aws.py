"""botocore clients built from :class:`pipeline.awsconfig.AwsConfig`.

botocore does the signing, endpoint resolution and retries: ``standard`` retry mode retries
throttling (ThrottlingException, ProvisionedThroughputExceededException, LimitExceededException, …)
and transient 5xx errors with jittered exponential backoff (botocore/retries/standard.py).
"""

from __future__ import annotations

import os
from typing import Any

import structlog

import boto3
from botocore.config import Config

from pipeline.awsconfig import AwsConfig


_RETRY_MODES = ("standard", "adaptive", "legacy")
_warned: set[str] = set()


def max_attempts(aws: AwsConfig) -> int:
    """Attempts per call: ``aws.max_attempts``, else ``AWS_MAX_ATTEMPTS``, else 10."""
    if aws.max_attempts is not None:
        return aws.max_attempts
    text = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    return 10


def retry_mode() -> str:
    """botocore's retry mode: ``AWS_RETRY_MODE`` when it names one, else ``standard``."""
    mode = os.environ.get("AWS_RETRY_MODE", "").strip().lower()
    return mode if mode in _RETRY_MODES else "standard"


def _warn_default_region() -> None:
    if "region" not in _warned:
        _warned.add("region")
        structlog.get_logger().warning(
            "aws_region_defaulted", region="us-east-1",
            hint="no AWS region configured (aws.region, AWS_DEFAULT_REGION or the profile): "
                 "using us-east-1; set aws.region if your table lives elsewhere")


def make_session(aws: AwsConfig) -> boto3.session.Session:
    """A boto3 session with the configured profile, region and static credentials (if any)."""
    kwargs: dict[str, Any] = {}
    if aws.profile:
        kwargs["profile_name"] = aws.profile
    if aws.access_key_id is not None:
        kwargs["aws_access_key_id"] = aws.access_key_id.get_secret_value()
    if aws.secret_access_key is not None:
        kwargs["aws_secret_access_key"] = aws.secret_access_key.get_secret_value()
    if aws.session_token is not None:
        kwargs["aws_session_token"] = aws.session_token.get_secret_value()
    session = boto3.session.Session(**kwargs)
    return session


def make_client(service: str, aws: AwsConfig, *, endpoint_url: str | None = None,
                max_pool_connections: int = 10) -> Any:
    """A botocore client for ``service`` (``dynamodb``, ``dynamodbstreams``, ``s3``).

    ``endpoint_url`` overrides the configured one. Region falls back to the session's
    (``AWS_DEFAULT_REGION`` or the profile), then ``us-east-1`` with a logged
    warning (``aws_region_defaulted``), never silently. Retries: :func:`max_attempts`,
    :func:`retry_mode`.
    """
    session = make_session(aws)
    region = aws.region or session.region_name
    if not region:
        region = "us-east-1"
        _warn_default_region()
    config = Config(
        # total_max_attempts counts the first request too (botocore's max_attempts counts retries only)
        retries={"mode": retry_mode(), "total_max_attempts": max_attempts(aws)},
        connect_timeout=aws.connect_timeout_s,
        read_timeout=aws.read_timeout_s,
        max_pool_connections=max_pool_connections,
    )
    return session.client(
        service,
        region_name=region,
        endpoint_url=endpoint_url or aws.endpoint_for(service),
        config=config,
    )
