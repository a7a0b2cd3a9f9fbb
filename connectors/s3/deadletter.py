"""Dead-letter destination in S3: one JSON object per entry at ``s3://bucket/prefix/{id}.json``.

Same entry format and deterministic ids as :class:`pipeline.deadletter.DirectoryDeadLetterQueue`;
``put`` returns after S3 acknowledged the PutObject (durable). Objects are encrypted as the S3
audit sink's are (``dead_letter.sse`` / ``kms_key_id``, the shared model
:class:`pipeline.s3_sse.S3Encryption`): dead letters hold full change events, so they deserve at
least the protection of the audit log.
"""

from __future__ import annotations

from typing import Any, Iterator

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws import make_client
from pipeline.awsconfig import AwsConfig
from pipeline.deadletter import DeadLetterEntry
from pipeline.errors import ConfigError, SinkError
from pipeline.s3_sse import S3Encryption


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without trailing slash). Raises ConfigError."""
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise ConfigError([f"{uri!r} is not an S3 URI; use s3://bucket/prefix"])
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


class S3DeadLetterQueue:
    """Dead-letter entries as S3 objects under ``uri`` (``s3://bucket/prefix``).

    ``encryption`` (any :class:`pipeline.s3_sse.S3Encryption`, e.g. the ``dead_letter`` config
    section; None = no SSE parameters, the bucket's default encryption applies) gives the
    ServerSideEncryption / SSEKMSKeyId parameters of every PutObject.
    """

    def __init__(self, aws: AwsConfig, uri: str, *, client: Any = None, encryption: S3Encryption | None = None):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client or make_client("s3", aws)
        self.sse_params = (encryption or S3Encryption()).sse_put_params()

    def _key(self, entry_id: str) -> str:
        return f"{self.prefix}/{entry_id}.json" if self.prefix else f"{entry_id}.json"

    def put(self, entry: DeadLetterEntry) -> str:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(entry.id),
                                   Body=orjson.dumps(entry.to_dict(), option=orjson.OPT_INDENT_2),
                                   ContentType="application/json", **self.sse_params)
        except (ClientError, BotoCoreError) as exc:
            raise SinkError(f"cannot write dead-letter entry to s3://{self.bucket}/{self._key(entry.id)}: {exc}") from None
        return entry.id

    def list(self) -> Iterator[DeadLetterEntry]:
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(".json"):
                    body = self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                    yield DeadLetterEntry.from_dict(orjson.loads(body))

    def get(self, entry_id: str) -> DeadLetterEntry | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(entry_id))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return DeadLetterEntry.from_dict(orjson.loads(body))

    def delete(self, entry_id: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(entry_id))
