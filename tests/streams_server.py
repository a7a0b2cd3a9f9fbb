"""The DynamoDB Streams API double (:class:`connectors.dynamodb_streams.testing.FakeStreams`) served over HTTP.

A worker in another process (``python -m connectors.app.cli run`` with ``aws.streams_endpoint_url``)
then reads shard splits, trims and injected errors that DynamoDB Local cannot produce, while it
can be killed with SIGKILL like a real one. The wire format is the AWS JSON 1.0 protocol of the
DynamoDB Streams API (botocore's ``dynamodbstreams`` service model): ``POST /`` with
``X-Amz-Target: DynamoDBStreams_20120810.<Operation>``; errors as HTTP 400 (client errors) or
500 (InternalServerError) with ``{"__type": "...#<Code>", "message": ...}``.
ApproximateCreationDateTime goes out as epoch seconds, as on the wire.

Bound to 127.0.0.1 on a free port; ``fail_all(code, status, seconds)`` makes every call fail for a
while (a transient AWS error burst).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from botocore.exceptions import ClientError

from connectors.dynamodb_streams.testing import FakeStreams

_OPERATIONS = {"DescribeStream": "describe_stream", "GetShardIterator": "get_shard_iterator",
               "GetRecords": "get_records"}


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(type(value).__name__)


class StreamsServer:
    """``with StreamsServer(fake) as server: server.endpoint`` → ``http://127.0.0.1:PORT``."""

    def __init__(self, fake: FakeStreams):
        self.fake = fake
        self._fail_until = 0.0
        self._fail_code = ("InternalServerError", 500)
        self.failed_calls = 0
        #: every call received (answered or failed)
        self.calls = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = orjson.loads(self.rfile.read(length) or b"{}")
                target = self.headers.get("X-Amz-Target", "")
                operation = target.rsplit(".", 1)[-1]
                status, payload = server._call(operation, body)
                data = orjson.dumps(payload, default=_default)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="streams-server", daemon=True)

    def fail_all(self, seconds: float, code: str = "InternalServerError", status: int = 500) -> None:
        """Every call fails with ``code`` / HTTP ``status`` for the next ``seconds``."""
        self._fail_code = (code, status)
        self._fail_until = time.monotonic() + seconds

    def _call(self, operation: str, body: dict[str, Any]) -> tuple[int, Any]:
        self.calls += 1
        if time.monotonic() < self._fail_until:
            self.failed_calls += 1
            code, status = self._fail_code
            return status, {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": "injected"}
        method = _OPERATIONS.get(operation)
        if method is None:
            return 400, {"__type": "com.amazon.coral.service#UnknownOperationException", "message": operation}
        try:
            response = getattr(self.fake, method)(**body)
        except ClientError as exc:
            error = exc.response["Error"]
            return 400, {"__type": f"com.amazonaws.dynamodb.v20120810#{error['Code']}", "message": error["Message"]}
        except TypeError as exc:  # unknown request parameter
            return 400, {"__type": "com.amazonaws.dynamodb.v20120810#ValidationException", "message": str(exc)}
        response = dict(response)
        response.pop("ResponseMetadata", None)
        return 200, response

    def __enter__(self) -> "StreamsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
