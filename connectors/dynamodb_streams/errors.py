"""One place that decides which DynamoDB / DynamoDB Streams errors pass and which do not.

:func:`classify` maps an exception raised by a botocore call to ``"throttled"``,
``"transient"`` or ``"permanent"``; :func:`source_error` and :func:`store_error` turn it into the
typed pipeline error the core acts on (a transient one is retried with backoff, a permanent one
stops the shard or the worker with one line). Every transient error is counted in
``ddb_cdc_aws_transient_errors_total{operation}`` here, where it is classified.

What passes (retried by the worker after botocore's own ``standard``-mode attempts):

- HTTP 5xx, and the service codes of one: ``InternalServerError`` (DynamoDB / Streams API
  references, "Common errors": "The server encountered an internal error trying to fulfill the
  request", HTTP 500), ``ServiceUnavailable`` (HTTP 503), ``InternalFailure``, ``RequestTimeout``;
- throttling (``LimitExceededException``, ``ProvisionedThroughputExceededException``,
  ``ThrottlingException``, ``RequestLimitExceeded``; "throttled"), and ``TransactionConflict``;
- botocore's connection-level errors: :class:`~botocore.exceptions.ReadTimeoutError`,
  :class:`~botocore.exceptions.ConnectTimeoutError`,
  :class:`~botocore.exceptions.EndpointConnectionError`,
  :class:`~botocore.exceptions.ConnectionClosedError` (reset connection), any other
  :class:`~botocore.exceptions.HTTPClientError` / :class:`~botocore.exceptions.ConnectionError`
  (except certificate failures), :class:`~botocore.exceptions.IncompleteReadError`, and
  :class:`~botocore.exceptions.CredentialRetrievalError` (the container / instance credential
  endpoint did not answer).

What does not (everything else), notably: ``AccessDeniedException``,
``UnrecognizedClientException``, ``InvalidSignatureException``, ``ExpiredTokenException``,
``ResourceNotFoundException`` (table, stream or lease table gone), ``ValidationException``,
certificate errors (:class:`~botocore.exceptions.SSLError`), missing credentials / region and
parameter validation.
"""

from __future__ import annotations

from typing import Literal

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)

from pipeline import metrics
from pipeline.errors import CheckpointStoreError, SourceError, TransientCheckpointStoreError, TransientSourceError

Kind = Literal["throttled", "transient", "permanent"]

#: Throttling codes (DynamoDB Streams API reference: LimitExceededException; the others are the
#: common throttling codes botocore's standard retry mode also retries).
THROTTLING_CODES = frozenset({"LimitExceededException", "ProvisionedThroughputExceededException",
                              "ThrottlingException", "RequestLimitExceeded", "Throttling",
                              "TooManyRequestsException"})
#: Service codes of a server-side failure that passes (AWS "Common errors"; botocore's standard
#: retry mode retries the same set as "transient").
TRANSIENT_CODES = frozenset({"InternalServerError", "InternalFailure", "ServiceUnavailable",
                             "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException",
                             "TransactionConflict", "PriorRequestNotComplete"})


def error_code(exc: ClientError) -> str:
    """The ``Error.Code`` of a ClientError ("" when absent)."""
    return exc.response.get("Error", {}).get("Code", "") or ""


def http_status(exc: ClientError) -> int | None:
    """The HTTP status of a ClientError's response, when botocore recorded one."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def classify(exc: BaseException) -> Kind:
    """``throttled``, ``transient`` or ``permanent`` for an exception of a botocore call (see the
    module doc for the lists). Anything that is neither a ClientError nor a BotoCoreError is
    ``permanent``."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in THROTTLING_CODES:
            return "throttled"
        if code in TRANSIENT_CODES:
            return "transient"
        status = http_status(exc)
        if status is not None and status >= 500:
            return "transient"
        return "permanent"
    if isinstance(exc, SSLError):
        return "permanent"  # a certificate that does not validate will not start validating
    if isinstance(exc, (HTTPClientError, BotoConnectionError, IncompleteReadError, CredentialRetrievalError)):
        return "transient"
    return "permanent"


def describe(exc: BaseException) -> str:
    """One line for an AWS error: ``Code (HTTP n): message`` or ``ReadTimeoutError: …``."""
    if isinstance(exc, ClientError):
        status = http_status(exc)
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        return f"{error_code(exc) or 'error'}{f' (HTTP {status})' if status else ''}: {message}"
    return f"{type(exc).__name__}: {exc}"


def count_transient(operation: str) -> None:
    """Count one transient (or throttled) failure of ``operation`` after botocore's retries."""
    metrics.AWS_TRANSIENT_ERRORS.labels(operation=operation).inc()


def source_error(exc: BaseException, operation: str, what: str) -> SourceError:
    """The pipeline error for a failed DynamoDB / Streams call: TransientSourceError for one that
    passes (counted), else SourceError. ``what``: the one-line context ("DescribeStream ARN")."""
    kind = classify(exc)
    if kind == "permanent":
        return SourceError(f"{what}: {describe(exc)}")
    count_transient(operation)
    return TransientSourceError(f"{what}: {describe(exc)} (transient)", operation=operation)


def store_error(exc: BaseException, operation: str, what: str) -> CheckpointStoreError:
    """The pipeline error for a failed lease-table call (a conditional-check failure is handled by
    the caller before): TransientCheckpointStoreError for one that passes (counted), else
    CheckpointStoreError."""
    kind = classify(exc)
    if kind == "permanent":
        return CheckpointStoreError(f"{what}: {describe(exc)}")
    count_transient(operation)
    return TransientCheckpointStoreError(f"{what}: {describe(exc)} (transient)", operation=operation)
