"""Server-side encryption options for the objects this project writes to S3, in one model.

Used by the S3 audit sink (``sinks[].options.sse`` / ``kms_key_id``,
:class:`connectors.s3.audit.S3AuditOptions`) and by the S3 dead-letter destination
(``dead_letter.sse`` / ``kms_key_id``, :class:`pipeline.config.DeadLetterConfig`,
:class:`connectors.s3.deadletter.S3DeadLetterQueue`), so both accept the same values and send
the same PutObject parameters. Plain pydantic: no boto3 here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, field_validator, model_validator


class S3Encryption(BaseModel):
    """``sse`` and ``kms_key_id``, mixed into an options model.

    - ``sse``: server-side encryption sent with each PutObject: ``None`` / ``"none"`` (send no
      header — the bucket's default encryption applies; S3 encrypts every new object with SSE-S3
      by default since 2023-01-05, AWS S3 user guide, "Setting default server-side encryption
      behavior"), ``"AES256"`` (SSE-S3) or ``"aws:kms"`` (SSE-KMS).
    - ``kms_key_id``: KMS key id / ARN / alias for ``sse: aws:kms`` only. Leaving it out with
      ``aws:kms`` is allowed and means the AWS managed key ``aws/s3`` (AWS S3 user guide,
      "Specifying server-side encryption with AWS KMS (SSE-KMS)"). Set with any other ``sse``
      it is a validation error. Writing needs ``kms:GenerateDataKey`` on the key.
    """

    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None

    @field_validator("sse", mode="before")
    @classmethod
    def _none_word(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            return None
        return value

    @model_validator(mode="after")
    def _kms_key_needs_kms(self) -> "S3Encryption":
        if self.kms_key_id is not None and self.sse != "aws:kms":
            raise ValueError("kms_key_id is only allowed with sse: aws:kms")
        return self

    def sse_put_params(self) -> dict[str, str]:
        """The PutObject parameters for these options: ``{}``, ``{"ServerSideEncryption": ...}``
        and, for SSE-KMS with a key, ``"SSEKMSKeyId"`` (S3 API reference, PutObject)."""
        params: dict[str, str] = {}
        if self.sse is not None:
            params["ServerSideEncryption"] = self.sse
            if self.kms_key_id is not None:
                params["SSEKMSKeyId"] = self.kms_key_id
        return params
