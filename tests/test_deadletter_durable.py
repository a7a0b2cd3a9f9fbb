"""Dead letters are durable (issue 13, item 8):

- the directory destination fsyncs the directory after the rename (and the parent of a directory
  it had to create), so an entry survives a power loss;
- the image declares the default dead-letter directory a VOLUME (checked offline by parsing the
  Dockerfile: no docker engine runs here), created and owned by the image's user before it is
  declared;
- S3 dead-letter objects get the same SSE options as the audit sink (one model,
  pipeline.s3_sse.S3Encryption), checked with head_object on a real moto S3 server.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import stat
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError

from connectors.s3.deadletter import S3DeadLetterQueue
from connectors.app.wiring import build_dead_letter
from connectors.s3.audit import S3AuditOptions
from pipeline.awsconfig import AwsConfig
from pipeline.config import DeadLetterConfig, Settings
from pipeline.deadletter import DirectoryDeadLetterQueue, delivery_entry
from pipeline.s3_sse import S3Encryption
from tests.test_packaging_files import final_stage
from pipeline.testing import make_batch, make_stream_record

ROOT = Path(__file__).resolve().parent.parent


def an_entry(i: int = 1):
    k = {"pk": f"item-{i}"}
    batch = make_batch([make_stream_record(keys=k, new_image={**k, "n": Decimal(i)},
                                           sequence_number=f"{i:021d}")])
    now = datetime.now(timezone.utc)
    return delivery_entry(batch.events[0], sink="audit", error="refused", attempts=3,
                          first_failure=now, last_failure=now)


# -- fsync of the directory ---------------------------------------------------------------------


@pytest.fixture
def io_calls(monkeypatch):
    """Every os.replace and os.fsync, in order: ("replace", target) / ("fsync", path, is_dir)."""
    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(mode)))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        calls.append(("replace", str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_put_fsyncs_the_directory_after_the_rename(tmp_path, io_calls):
    dlq_dir = tmp_path / "dlq"
    dlq_dir.mkdir()
    dlq = DirectoryDeadLetterQueue(dlq_dir)
    entry_id = dlq.put(an_entry())

    target = str(dlq_dir / f"{entry_id}.json")
    renames = [i for i, c in enumerate(io_calls) if c == ("replace", target)]
    assert len(renames) == 1
    before, after = io_calls[:renames[0]], io_calls[renames[0] + 1:]
    assert [c for c in before if c[0] == "fsync" and not c[2]]  # the file's data first
    assert ("fsync", str(dlq_dir), True) in after  # then the directory holding the new name
    assert dlq.get(entry_id).sequence_number == an_entry().sequence_number


def test_put_into_a_new_directory_also_fsyncs_its_parent(tmp_path, io_calls):
    dlq_dir = tmp_path / "new" / "dlq"
    DirectoryDeadLetterQueue(dlq_dir).put(an_entry())
    synced_dirs = [c[1] for c in io_calls if c[0] == "fsync" and c[2]]
    assert synced_dirs == [str(dlq_dir.parent), str(dlq_dir)]


# -- the image's dead-letter volume ------------------------------------------------------------


def volume_paths(args: str) -> list[str]:
    """VOLUME takes a JSON array or space-separated paths (Dockerfile reference, VOLUME)."""
    return json.loads(args) if args.startswith("[") else args.split()


def test_image_declares_the_default_dead_letter_directory_a_volume_owned_by_its_user():
    stage = final_stage()
    workdir = [args for ins, args in stage if ins == "WORKDIR"][-1]
    user = [args for ins, args in stage if ins == "USER"][-1].split(":")[0]
    default_dir = posixpath.join(workdir, DeadLetterConfig().directory)  # where the worker writes
    volumes = [(i, p) for i, (ins, args) in enumerate(stage) if ins == "VOLUME" for p in volume_paths(args)]
    assert default_dir in [p for _, p in volumes], f"{default_dir} is not a VOLUME of the image"

    # created and chowned to the image's user by a RUN before the VOLUME (later build steps would
    # be discarded; a new named volume copies the owner from the image)
    volume_at = next(i for i, p in volumes if p == default_dir)
    runs = [shlex.split(args.replace("&&", " && ")) for i, (ins, args) in enumerate(stage)
            if ins == "RUN" and i < volume_at]
    words = [w for run in runs for w in run]
    assert default_dir in words[words.index("mkdir"):], "the directory is not created in the image"
    chown_at = [i for i, w in enumerate(words) if w == "chown"]
    assert any(words[i + 1].split(":")[0] == user and default_dir in words[i + 2:i + 3] for i in chown_at), \
        f"{default_dir} is not owned by the image's user {user}"
    assert not [ins for ins, _ in stage[volume_at + 1:] if ins == "RUN"]


# -- SSE of S3 dead-letter objects (moto) -------------------------------------------------------


@pytest.fixture
def bucket(moto_server, aws_env):
    name = f"dlq-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client, name


@pytest.mark.parametrize("sse, key, expected", [
    ("AES256", None, {"ServerSideEncryption": "AES256"}),
    ("aws:kms", "alias/ddb-cdc-dlq", {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/ddb-cdc-dlq"}),
])
def test_s3_dead_letter_objects_are_encrypted_as_configured(moto_server, bucket, sse, key, expected):
    client, name = bucket
    settings = Settings(source={"table": "orders"}, sinks=[{"name": "s", "type": "s3_audit", "options": {"bucket": "b"}}],
                        aws={"region": "us-east-1", "s3_endpoint_url": moto_server.endpoint},
                        dead_letter={"s3_uri": f"s3://{name}/dlq", "sse": sse, "kms_key_id": key})
    dlq = build_dead_letter(settings)  # the worker's own wiring, config → destination
    assert isinstance(dlq, S3DeadLetterQueue)
    entry_id = dlq.put(an_entry())
    head = client.head_object(Bucket=name, Key=f"dlq/{entry_id}.json")
    assert {k: head.get(k) for k in expected} == expected
    assert dlq.get(entry_id).sequence_number == an_entry().sequence_number


def test_s3_dead_letter_without_sse_sends_no_encryption_header(moto_server, bucket):
    client, name = bucket
    dlq = S3DeadLetterQueue(AwsConfig(region="us-east-1", s3_endpoint_url=moto_server.endpoint), f"s3://{name}")
    entry_id = dlq.put(an_entry())
    assert "ServerSideEncryption" not in client.head_object(Bucket=name, Key=f"{entry_id}.json")


def test_dead_letter_and_audit_sink_share_one_encryption_model():
    assert issubclass(DeadLetterConfig, S3Encryption) and issubclass(S3AuditOptions, S3Encryption)
    for model in (lambda **kw: DeadLetterConfig(s3_uri="s3://b/p", **kw), lambda **kw: S3AuditOptions(bucket="b", **kw)):
        assert model(sse="none").sse is None
        assert model(sse="aws:kms").sse_put_params() == {"ServerSideEncryption": "aws:kms"}
        with pytest.raises(ValidationError, match="kms_key_id is only allowed with sse: aws:kms"):
            model(sse="AES256", kms_key_id="k")
    with pytest.raises(ValidationError, match="dead_letter.s3_uri"):
        DeadLetterConfig(sse="AES256")  # a local directory: ddb-cdc does not encrypt it
