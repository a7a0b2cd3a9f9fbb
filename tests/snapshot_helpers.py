"""Helpers of the snapshot tests: filling a DynamoDB Local table fast, configs, reading results."""

from __future__ import annotations

import gzip
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson


def item(i: int, *, rev: int = 0, pad: int = 40) -> dict[str, Any]:
    """Item number ``i`` as AttributeValue map (pk S, sk N, rev N, body S of ``pad`` chars)."""
    return {"pk": {"S": f"user#{i:06d}"}, "sk": {"N": str(i % 7)}, "rev": {"N": str(rev)},
            "body": {"S": ("x" * pad)}, "tags": {"SS": ["a", f"t{i % 5}"]}}


def fill_table(client: Any, table: str, count: int, *, threads: int = 4, pad: int = 40) -> None:
    """Write items 0..count-1 with BatchWriteItem (25 per call, unprocessed items retried)."""
    def write(chunk: list[int]) -> None:
        requests = [{"PutRequest": {"Item": item(i, pad=pad)}} for i in chunk]
        while requests:
            resp = client.batch_write_item(RequestItems={table: requests})
            requests = resp.get("UnprocessedItems", {}).get(table, [])

    chunks = [list(range(n, min(n + 25, count))) for n in range(0, count, 25)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, chunks))


def scan_all(client: Any, table: str) -> dict[str, dict[str, Any]]:
    """Every item of ``table`` (consistent Scan), by ``pk|sk`` key id."""
    out: dict[str, dict[str, Any]] = {}
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        resp = client.scan(**kwargs)
        for it in resp["Items"]:
            out[f"{it['pk']['S']}|{it['sk']['N']}"] = it
        if "LastEvaluatedKey" not in resp:
            return out
        kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]


def audit_lines(s3: Any, bucket: str, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    """(key, parsed line) of every audit object under ``prefix``."""
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", ()):
            body = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            for line in gzip.decompress(body).splitlines():
                if line.strip():
                    out.append((entry["Key"], orjson.loads(line)))
    return out


def os_docs(url: str, index: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """{_id: (_version, _source)} of every document of ``index`` (refreshed first)."""
    import urllib.request

    def call(path: str, body: Any = None) -> Any:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    call(f"/{index}/_refresh", {})
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    after = None
    while True:
        body: dict[str, Any] = {"query": {"match_all": {}}, "size": 5000, "version": True, "sort": [{"_id": "asc"}]}
        if after is not None:
            body["search_after"] = after
        hits = call(f"/{index}/_search", body)["hits"]["hits"]
        if not hits:
            return out
        for h in hits:
            out[h["_id"]] = (h["_version"], h["_source"])
        after = hits[-1]["sort"]
        if len(hits) < 5000:
            return out


class Stopper:
    """A flag for background writer threads."""

    def __init__(self) -> None:
        self.event = threading.Event()
