"""Shared fixtures: real servers on free loopback ports (DESIGN.md, "Running the real thing in tests").

Session-scoped servers (started on first use, stopped at the end of the session):

- ``dynamodb_local`` — Amazon DynamoDB Local (``.endpoint``; DynamoDB and Streams on one port,
  ``-sharedDb`` so any credentials/region see the same tables).
- ``moto_server`` — moto (``.endpoint``; for S3).
- ``opensearch_server`` — osmem-server (``.url``); writable, shared by every test: use unique
  index names.
- ``redis_server`` — function-scoped view of a session Redis (``.url``, ``.port``, ``.kind``,
  ``stop()``, ``start()``): running and empty at the start of every test, restarted after a test
  that stopped it.

Per-test helpers: ``opensearch_url`` (a fresh, empty osmem clone per test), ``aws_env`` (dummy AWS
credentials in the environment), ``aws_client`` (boto3 client factory with test credentials),
``make_table`` (creates a DynamoDB Local table with a stream).

When a service cannot start, its fixture skips the test — or fails it when ``CI=true``, since CI
must never silently skip the real-server tests.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Iterator, NamedTuple

import boto3
import pytest
from botocore.config import Config
from hypothesis import settings as hypothesis_settings

# CLI subprocesses render rich tables at the terminal's width; pytest-xdist workers have no
# terminal, so give every run the same wide one (tests look for whole ids in those tables)
os.environ["COLUMNS"] = "200"

# Under CI the property tests run the same examples every time (a failure found locally is pinned
# with @example); elsewhere hypothesis explores new ones on each run.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI", "").lower() == "true":
    hypothesis_settings.load_profile("ci")

from connectors.embedded.servers import (
    DynamoDBLocal,
    EmbeddedServerError,
    MotoServer,
    OpenSearchServer,
    RedisServer,
)

TEST_REGION = "us-east-1"
TEST_ACCESS_KEY_ID = "testing"
TEST_SECRET_ACCESS_KEY = "testing"


def service_unavailable(reason: str) -> None:
    """Skip the test (``pytest.skip``), or fail it (``pytest.fail``) when the ``CI`` env var is "true"."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def _start(what: str, factory: Callable[[], Any]) -> Any:
    try:
        return factory()
    except (EmbeddedServerError, OSError) as exc:
        reason = f"{what} unavailable: {exc}"
    service_unavailable(reason)  # outside the except block: no chained traceback in the report


def _boto_client(service: str, endpoint: str, **config: Any) -> Any:
    """A boto3 client for ``service`` at ``endpoint`` with the test credentials and region."""
    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint,
        region_name=TEST_REGION,
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        config=Config(retries={"mode": "standard", "max_attempts": 3}, **config),
    )


# --------------------------------------------------------------------------------------------
# servers


@pytest.fixture(scope="session")
def dynamodb_local() -> Iterator[DynamoDBLocal]:
    """DynamoDB Local for the session: ``.endpoint`` ("http://127.0.0.1:PORT"), ``.port``."""
    server = _start("DynamoDB Local", DynamoDBLocal)
    yield server
    server.close()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto server for the session (S3): ``.endpoint``, ``.port``, ``.reset()``."""
    server = _start("moto server", MotoServer)
    yield server
    server.close()


@pytest.fixture(scope="session")
def opensearch_server() -> Iterator[OpenSearchServer]:
    """osmem-server for the session, writable (never cloned): ``.url``, ``.port``, ``.version``."""
    server = _start("osmem-server", lambda: OpenSearchServer(japanese=False, freeze=False))
    yield server
    server.close()


@pytest.fixture(scope="session")
def _opensearch_clone_base() -> Iterator[OpenSearchServer]:
    """A second, empty osmem-server that only serves as the base of per-test clones.

    osmem freezes a base on its first clone (writes to it then get 403 ``osmem_base_frozen``), so
    clones come from this server and ``opensearch_server`` stays writable.
    """
    server = _start("osmem-server", lambda: OpenSearchServer(japanese=False, freeze=True))
    yield server
    server.close()


@pytest.fixture
def opensearch_url(_opensearch_clone_base: OpenSearchServer) -> Iterator[str]:
    """Base URL of a fresh, empty OpenSearch API (an osmem clone) for this test only; closed afterwards."""
    try:
        clone = _opensearch_clone_base.clone()
    except EmbeddedServerError as exc:
        clone, reason = None, f"osmem clone unavailable: {exc}"
    if clone is None:
        service_unavailable(reason)
    try:
        yield clone.url.rstrip("/")
    finally:
        clone.close()


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[RedisServer]:
    server = _start("Redis", RedisServer)
    yield server
    server.close()


@pytest.fixture
def redis_server(_redis_session: RedisServer) -> Iterator[RedisServer]:
    """The session Redis, running and flushed: ``.url``, ``.port``, ``.kind``, ``.stop()``, ``.start()``.

    A test may ``stop()`` it to simulate an outage; it is started again after the test.
    """
    server = _redis_session
    reason = None
    try:
        server.start()  # no-op when running
        _flushall(server.port)
    except (EmbeddedServerError, OSError) as exc:
        reason = f"Redis unavailable: {exc}"
    if reason is not None:
        service_unavailable(reason)
    yield server
    if not server.running:
        server.start()


def _flushall(port: int) -> None:
    import redis

    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as client:
        client.flushall()


# --------------------------------------------------------------------------------------------
# AWS helpers


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> dict[str, str]:
    """Dummy AWS credentials and region in the environment, and no profile or shared config.

    Sets AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY = "testing", AWS_DEFAULT_REGION (and AWS_REGION)
    = "us-east-1", AWS_EC2_METADATA_DISABLED = "true"; points AWS_CONFIG_FILE and
    AWS_SHARED_CREDENTIALS_FILE at missing files; unsets AWS_PROFILE, AWS_DEFAULT_PROFILE,
    AWS_SESSION_TOKEN, AWS_SECURITY_TOKEN and AWS_ENDPOINT_URL. Returns the variables set.
    """
    values = {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_REGION": TEST_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return values


@pytest.fixture
def aws_client() -> Callable[..., Any]:
    """Factory: ``aws_client(service, endpoint, **botocore_config) -> boto3 client``.

    The client uses region us-east-1 and the dummy credentials "testing"/"testing" explicitly
    (no environment needed) and botocore standard retries (3 attempts); extra keyword arguments
    go to ``botocore.config.Config`` (e.g. ``read_timeout=5``).
    """
    return _boto_client


class MadeTable(NamedTuple):
    """What ``make_table`` returns; unpacks as ``client, table_name, stream_arn``."""

    client: Any
    table_name: str
    stream_arn: str


@pytest.fixture
def make_table(dynamodb_local: DynamoDBLocal) -> Iterator[Callable[..., MadeTable]]:
    """Factory creating DynamoDB Local tables with a stream; the tables are deleted after the test.

    ``make_table(name="cdc", *, hash_key=("pk", "S"), range_key=None,
    stream_view_type="NEW_AND_OLD_IMAGES", unique=True) -> MadeTable(client, table_name, stream_arn)``

    - ``hash_key`` / ``range_key``: ``(attribute name, type)`` with type "S", "N" or "B".
    - ``stream_view_type``: NEW_AND_OLD_IMAGES, NEW_IMAGE, OLD_IMAGE or KEYS_ONLY.
    - ``unique``: append "-<8 hex>" to ``name`` so tests sharing the session server never clash
      (``table_name`` is the final name); with ``unique=False`` the name is used as is.
    - ``client`` is a boto3 ``dynamodb`` client for ``dynamodb_local.endpoint``; the table is
      ACTIVE (PAY_PER_REQUEST) and ``stream_arn`` is its LatestStreamArn.

    Raises ValueError for a name shorter than 3 characters (DynamoDB's minimum).
    """
    client = _boto_client("dynamodb", dynamodb_local.endpoint)
    created: list[str] = []

    def make(
        name: str = "cdc",
        *,
        hash_key: tuple[str, str] = ("pk", "S"),
        range_key: tuple[str, str] | None = None,
        stream_view_type: str = "NEW_AND_OLD_IMAGES",
        unique: bool = True,
    ) -> MadeTable:
        table_name = f"{name}-{uuid.uuid4().hex[:8]}" if unique else name
        if not 3 <= len(table_name) <= 255:
            raise ValueError(f"table name {table_name!r} must be 3-255 characters")
        keys = [(hash_key, "HASH")] + ([(range_key, "RANGE")] if range_key else [])
        client.create_table(
            TableName=table_name,
            AttributeDefinitions=[{"AttributeName": n, "AttributeType": t} for (n, t), _ in keys],
            KeySchema=[{"AttributeName": n, "KeyType": kind} for (n, _t), kind in keys],
            BillingMode="PAY_PER_REQUEST",
            StreamSpecification={"StreamEnabled": True, "StreamViewType": stream_view_type},
        )
        created.append(table_name)
        client.get_waiter("table_exists").wait(TableName=table_name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100})
        stream_arn = client.describe_table(TableName=table_name)["Table"]["LatestStreamArn"]
        return MadeTable(client, table_name, stream_arn)

    yield make
    for table_name in created:
        try:
            client.delete_table(TableName=table_name)
        except client.exceptions.ResourceNotFoundException:
            pass
