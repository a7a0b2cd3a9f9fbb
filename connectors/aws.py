"""botocore clients built from :class:`pipeline.awsconfig.AwsConfig`.

botocore does the signing, endpoint resolution and retries: ``standard`` retry mode retries
throttling (ThrottlingException, ProvisionedThroughputExceededException, LimitExceededException, …)
and transient 5xx errors with jittered exponential backoff (botocore/retries/standard.py).
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from pipeline.awsconfig import AwsConfig


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

    ``endpoint_url`` overrides the configured one. Region falls back to the session's, then
    ``us-east-1``.
    """
    session = make_session(aws)
    region = aws.region or session.region_name or "us-east-1"
    config = Config(
        # total_max_attempts counts the first request too (botocore's max_attempts counts retries only)
        retries={"mode": "standard", "total_max_attempts": aws.max_attempts},
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
