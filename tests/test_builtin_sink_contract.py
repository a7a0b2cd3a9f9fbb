"""Every built-in sink passes ``pipeline.testing.check_sink_contract`` — the same check a plugin
author runs — against its real server, and ends in the state the contract's batch asks for
(INSERT, MODIFY, REMOVE of one item, written twice: idempotent). Issue 14 item 5."""

from __future__ import annotations

import gzip
import uuid

import boto3
import redis
import structlog

from connectors.opensearch.sink import OpenSearchSink
from connectors.redis_cache import RedisCacheSink
from connectors.s3.audit import S3AuditSink
from pipeline.awsconfig import AwsConfig
from pipeline.sink import SinkContext
from pipeline.testing import check_sink_contract, sample_batch

REGION = "us-east-1"


def _context(name: str, aws: AwsConfig | None = None) -> SinkContext:
    return SinkContext(sink_name=name, worker_id="contract-test", logger=structlog.get_logger(), aws=aws)


def test_opensearch_sink_passes_the_contract(opensearch_url):
    from opensearchpy import OpenSearch

    index = f"contract-{uuid.uuid4().hex[:8]}"
    sink = OpenSearchSink("search", OpenSearchSink.Options(hosts=[opensearch_url], index=index, refresh=True))
    client = OpenSearch(hosts=[opensearch_url])
    check_sink_contract(lambda: sink, context=_context("search"))
    client.indices.refresh(index=index)
    assert client.count(index=index)["count"] == 0  # INSERT, MODIFY, REMOVE twice: the item is gone


def test_s3_audit_sink_passes_the_contract(moto_server, aws_env):
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_server.endpoint)
    bucket = f"contract-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    sink = S3AuditSink("audit", S3AuditSink.Options(bucket=bucket, prefix="c"))
    check_sink_contract(lambda: sink, context=_context("audit", AwsConfig(region=REGION,
                                                                          endpoint_url=moto_server.endpoint)))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    lines = [line for key in keys
             for line in gzip.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).splitlines()]
    assert len(keys) == 1, keys  # the second write of the same batch wrote the same object again
    assert len(lines) == 3


def test_redis_cache_sink_passes_the_contract(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.set("user:user#1", "cached")
    client.set("other", "kept")
    sink = RedisCacheSink("cache", RedisCacheSink.Options(url=redis_server.url, key_templates=["user:{pk}"]))
    check_sink_contract(lambda: sink, context=_context("cache"))
    assert client.get("user:user#1") is None and client.get("other") == b"kept"
