"""``ddb-cdc snapshot --from-export``: a DynamoDB export (DYNAMODB_JSON) the test writes to moto S3
in the documented layout is delivered item by item, with the version of the export time."""

from __future__ import annotations

import base64
import gzip
import uuid
from datetime import datetime, timedelta, timezone

import boto3
import orjson

from connectors.app.cli import main
from pipeline.snapshot.version import snapshot_version
from tests.snapshot_helpers import audit_lines, os_docs
from tests.test_snapshot_scan import CREDS, run_cli, write_config


def write_export(s3, bucket: str, export_prefix: str, table_arn: str, files: list[list[dict]], export_time: datetime) -> str:
    export_id = f"01700000000000-{uuid.uuid4().hex[:8]}"
    base = f"{export_prefix}/AWSDynamoDB/{export_id}/"
    s3.put_object(Bucket=bucket, Key=base + "_started", Body=b"")
    manifest_lines = []
    for n, items in enumerate(files):
        key = f"{base}data/{uuid.uuid4().hex[:20]}.json.gz"
        body = gzip.compress(b"".join(orjson.dumps({"Item": it}) + b"\n" for it in items))
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        manifest_lines.append(orjson.dumps({"itemCount": len(items), "md5Checksum": "x", "etag": "y",
                                            "dataFileS3Key": key}))
    s3.put_object(Bucket=bucket, Key=base + "manifest-files.json", Body=b"\n".join(manifest_lines) + b"\n")
    summary = {"version": "2020-06-30", "exportArn": f"{table_arn}/export/{export_id}",
               "startTime": export_time.isoformat().replace("+00:00", "Z"),
               "endTime": (export_time + timedelta(minutes=5)).isoformat().replace("+00:00", "Z"),
               "tableArn": table_arn, "tableId": str(uuid.uuid4()),
               "exportTime": export_time.isoformat().replace("+00:00", "Z"),
               "s3Bucket": bucket, "s3Prefix": export_prefix, "s3SseAlgorithm": "AES256", "s3SseKmsKeyId": None,
               "manifestFilesS3Key": base + "manifest-files.json", "billedSizeBytes": 0,
               "itemCount": sum(len(f) for f in files), "outputFormat": "DYNAMODB_JSON", "exportType": "FULL_EXPORT"}
    s3.put_object(Bucket=bucket, Key=base + "manifest-summary.json", Body=orjson.dumps(summary))
    return f"s3://{bucket}/{base}"


def test_from_export_delivers_every_item_with_the_export_time_version(tmp_path, aws_env, make_table, moto_server,
                                                                      opensearch_url, capsys):
    made = make_table("export", range_key=("sk", "N"))
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
    bucket = f"exp-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    index = f"exp-{uuid.uuid4().hex[:6]}"
    cfg = write_config(tmp_path, table=made.table_name, ddb=made.client.meta.endpoint_url, s3=moto_server.endpoint,
                       bucket=bucket, os_url=opensearch_url, index=index)
    items = [{"pk": {"S": f"p{i}"}, "sk": {"N": str(i)}, "blob": {"B": base64.b64encode(bytes([i % 256, 1])).decode()},
              "n": {"N": "12345678901234567890.123"}, "m": {"M": {"a": {"L": [{"S": "x"}, {"BOOL": True}]}}}}
             for i in range(2500)]
    files = [items[:1200], items[1200:2499], [], items[2499:]]  # an empty partition file too
    export_time = datetime(2026, 11, 30, 8, 15, 0, tzinfo=timezone.utc)
    table_arn = f"arn:aws:dynamodb:us-east-1:000000000000:table/{made.table_name}"
    uri = write_export(s3, bucket, "exports", table_arn, files, export_time)

    code, report = run_cli(["snapshot", "--config", str(cfg), "--from-export", uri, "--json"], capsys)
    assert code == 0, report
    assert report["source"] == "export" and report["segments"] == 4 and report["items"] == 2500, report
    assert report["version"] == snapshot_version(export_time) and report["started_at"].startswith("2026-11-30T08:15")
    docs = os_docs(opensearch_url, index)
    assert set(docs) == {f"p{i}|{i}" for i in range(2500)}
    assert {v for v, _ in docs.values()} == {report["version"]}
    from connectors.embedded.verify import restore_document, values_match
    from pipeline.codec import decode_item

    for i in (0, 7, 1200, 2499):  # numbers exact, binary and nested maps as the table holds them
        assert values_match(decode_item(items[i]), restore_document(docs[f"p{i}|{i}"][1])), docs[f"p{i}|{i}"]
    lines = [line for key, line in audit_lines(s3, bucket, "audit/") if "/snapshot=" in key]
    assert len(lines) == 2500 and {line["op"] for line in lines} == {"r"}

    # a rerun of the same export resumes nothing (it is done): a new snapshot with the same version
    code, again = run_cli(["snapshot", "--config", str(cfg), "--from-export", uri, "--json", "--sink", "search"], capsys)
    assert code == 0 and again["version"] == report["version"]


def test_not_an_export_is_one_line(tmp_path, aws_env, make_table, moto_server, capsys):
    made = make_table("export", range_key=("sk", "N"))
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, **CREDS)
    bucket = f"exp-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    cfg = write_config(tmp_path, table=made.table_name, ddb=made.client.meta.endpoint_url, s3=moto_server.endpoint,
                       bucket=bucket, os_url=None)
    assert main(["snapshot", "--config", str(cfg), "--from-export", f"s3://{bucket}/nothing/"]) == 2
    assert main(["snapshot", "--config", str(cfg), "--from-export", f"s3://{bucket}/x/AWSDynamoDB/123/"]) == 1
    err = capsys.readouterr().err
    assert "manifest-summary.json" in err and err.count("\n") <= 3
