"""AWS connection settings shared by the source, the lease table and AWS-backed sinks.

Plain pydantic (no boto3 here); :mod:`connectors.aws` turns it into botocore clients.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class AwsConfig(BaseModel):
    """Region, credentials and endpoint overrides.

    - ``region``: AWS region name (default from the environment / profile, else ``us-east-1``).
    - ``endpoint_url``: one endpoint for every AWS service (LocalStack, moto server);
      ``dynamodb_endpoint_url`` / ``streams_endpoint_url`` / ``s3_endpoint_url`` override it per
      service (DynamoDB Local serves both DynamoDB and DynamoDB Streams on one port).
    - ``access_key_id`` / ``secret_access_key`` / ``session_token``: static credentials; leave
      them out to use botocore's default chain (env, profile, container or instance role).
    - ``max_attempts``: attempts per call, the first included (throttling and 5xx are retried with
      jittered exponential backoff by botocore). Unset: the ``AWS_MAX_ATTEMPTS`` environment
      variable, else 10 (the AWS SDKs' convention — "Retry behavior", AWS SDKs and Tools
      reference guide). The retry mode is ``AWS_RETRY_MODE`` when set (``standard`` /
      ``adaptive`` / ``legacy``), else ``standard``.
    """

    model_config = ConfigDict(extra="forbid")

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    dynamodb_endpoint_url: str | None = None
    streams_endpoint_url: str | None = None
    s3_endpoint_url: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    max_attempts: int | None = Field(None, ge=1)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0

    def endpoint_for(self, service: str) -> str | None:
        """The endpoint URL for ``dynamodb``, ``dynamodbstreams`` or ``s3`` (None = AWS default)."""
        specific = {
            "dynamodb": self.dynamodb_endpoint_url,
            "dynamodbstreams": self.streams_endpoint_url or self.dynamodb_endpoint_url,
            "s3": self.s3_endpoint_url,
        }.get(service)
        return specific or self.endpoint_url
