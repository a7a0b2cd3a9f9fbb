"""Failure injection at the AWS API boundary, for the transient-error tests (issue 13 item 9).

Kept apart from ``connectors/dynamodb_streams/testing.py`` (whose stream layout changes separately): this module
only adds failures on top of it.

- :class:`FailurePlan` — rules "make operation X fail with error E", for the next ``times`` calls,
  for ``seconds`` from now, or until :meth:`Rule.stop`; optionally *after* the call was applied
  (a write that landed although its response was lost: the ambiguous timeout).
- :class:`FlakyStreams` — :class:`connectors.dynamodb_streams.testing.FakeStreams` whose ``describe_stream``,
  ``get_shard_iterator`` and ``get_records`` consult a plan first (operation names as in the API:
  ``DescribeStream``, ``GetShardIterator``, ``GetRecords``).
- :class:`FlakyClient` — wraps any boto3 client (a DynamoDB Local ``dynamodb`` client for the lease
  table or DescribeTable): every API method consults the plan under its API name
  (``UpdateItem``, ``Scan``, ``DescribeTable`` …), so the real error mapping of the connectors runs.
- Error factories with botocore's real types: :func:`internal_server_error` (HTTP 500),
  :func:`service_unavailable` (HTTP 503), :func:`access_denied` (HTTP 400),
  :func:`read_timeout` (``ReadTimeoutError``), :func:`connection_closed` (``ConnectionClosedError``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from connectors.dynamodb_streams.testing import FakeStreams

ENDPOINT = "http://127.0.0.1:1"  # for messages only; nothing connects to it


def _client_error(code: str, status: int, operation: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


def internal_server_error(operation: str) -> BaseException:
    """``InternalServerError`` with HTTP 500, as DynamoDB / Streams return it."""
    return _client_error("InternalServerError", 500, operation, "Internal server error (injected)")


def service_unavailable(operation: str) -> BaseException:
    """HTTP 503 ``ServiceUnavailable``."""
    return _client_error("ServiceUnavailable", 503, operation, "Service unavailable (injected)")


def access_denied(operation: str) -> BaseException:
    """``AccessDeniedException`` (HTTP 400): an error that cannot pass."""
    return _client_error("AccessDeniedException", 400, operation,
                         "User: arn:aws:iam::000000000000:user/cdc is not authorized (injected)")


def read_timeout(operation: str) -> BaseException:
    """botocore's ``ReadTimeoutError`` (the response did not come within read_timeout)."""
    return ReadTimeoutError(endpoint_url=ENDPOINT)


def connection_closed(operation: str) -> BaseException:
    """botocore's ``ConnectionClosedError`` (connection reset before a valid response)."""
    return ConnectionClosedError(endpoint_url=ENDPOINT)


@dataclass
class Rule:
    """One injected failure; see :meth:`FailurePlan.fail`."""

    operation: str
    error: Callable[[str], BaseException]
    times: int | None = None
    until: float | None = None  # monotonic deadline
    after_call: bool = False
    stopped: bool = False
    raised: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stop(self) -> None:
        """End this rule now (calls succeed again)."""
        self.stopped = True

    def take(self) -> bool:
        """True (and counted) when this call must fail."""
        with self._lock:
            if self.stopped:
                return False
            if self.until is not None and time.monotonic() >= self.until:
                return False
            if self.times is not None:
                if self.times <= 0:
                    return False
                self.times -= 1
            self.raised += 1
            return True


class FailurePlan:
    """The rules of one test; thread-safe."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self._lock = threading.Lock()

    def fail(self, operation: str, error: Callable[[str], BaseException], *, times: int | None = None,
             seconds: float | None = None, after_call: bool = False) -> Rule:
        """Make ``operation`` fail with ``error(operation)``: the next ``times`` calls, or every call
        for ``seconds`` from now, or (neither given) every call until ``rule.stop()``. With
        ``after_call`` the call is made first (a write lands) and then the error is raised."""
        rule = Rule(operation, error, times=times,
                    until=None if seconds is None else time.monotonic() + seconds, after_call=after_call)
        with self._lock:
            self.rules.append(rule)
        return rule

    def raised(self, operation: str | None = None) -> int:
        """How many failures were injected (for ``operation``, or in all)."""
        return sum(r.raised for r in self.rules if operation is None or r.operation == operation)

    def call(self, operation: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` for ``operation`` under the plan's rules."""
        with self._lock:
            rules = [r for r in self.rules if r.operation == operation]
        for rule in rules:
            if rule.take():
                if rule.after_call:
                    fn()
                raise rule.error(operation)
        return fn()


class FlakyStreams(FakeStreams):
    """:class:`FakeStreams` whose API methods fail as ``self.plan`` says."""

    def __init__(self, *args: Any, plan: FailurePlan | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plan = plan or FailurePlan()

    def describe_stream(self, **kwargs: Any) -> dict[str, Any]:
        return self.plan.call("DescribeStream", lambda: super(FlakyStreams, self).describe_stream(**kwargs))

    def get_shard_iterator(self, **kwargs: Any) -> dict[str, Any]:
        return self.plan.call("GetShardIterator", lambda: super(FlakyStreams, self).get_shard_iterator(**kwargs))

    def get_records(self, **kwargs: Any) -> dict[str, Any]:
        return self.plan.call("GetRecords", lambda: super(FlakyStreams, self).get_records(**kwargs))


def _api_name(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_"))


class FlakyClient:
    """A boto3 client whose API methods (``update_item`` → ``UpdateItem``) fail as ``plan`` says;
    everything else (``meta``, ``exceptions``, waiters) is the real client's."""

    def __init__(self, client: Any, plan: FailurePlan):
        self._client = client
        self.plan = plan

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if name.startswith("_") or name in ("meta", "exceptions", "get_waiter", "get_paginator") or not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.plan.call(_api_name(name), lambda: value(*args, **kwargs))

        return call
