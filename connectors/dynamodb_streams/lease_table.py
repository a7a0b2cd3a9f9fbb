"""The lease table in DynamoDB, with KCL's attribute names.

One item per shard, hash key ``leaseKey`` (S)::

    leaseKey                      "orders:2026-11-21T23:02:22.922:shardId-0000…"
    leaseOwner                    "host:pid:abcd1234"         (absent when free)
    leaseCounter                  17                          (N, +1 on every write)
    checkpoint                    "000000000000000001234" | TRIM_HORIZON | LATEST | SHARD_END
    checkpointSubSequenceNumber   0
    ownerSwitchesSinceCheckpoint  0
    parentShardId                 {"shardId-…"}               (SS, absent for root shards)
    streamArn, shardId, tableName (ours, for readers and for status)

Every write is a conditional write (ConditionExpression on leaseOwner and leaseCounter), as
DESIGN.md requires; a failed condition raises :class:`pipeline.errors.LeaseLostError`.
The table is created on first start (on-demand billing) if absent.
"""

from __future__ import annotations

import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from connectors.aws import make_client
from pipeline.awsconfig import AwsConfig
from pipeline.checkpoint import Gap, Lease, WorkerInfo
from pipeline.errors import CheckpointStoreError, LeaseLostError


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def lease_to_item(lease: Lease) -> dict[str, Any]:
    """A :class:`Lease` as a DynamoDB item (AttributeValue map)."""
    item: dict[str, Any] = {
        "leaseKey": _s(lease.lease_key),
        "leaseCounter": _n(lease.counter),
        "checkpoint": _s(lease.checkpoint),
        "checkpointSubSequenceNumber": _n(lease.sub_sequence_number),
        "ownerSwitchesSinceCheckpoint": _n(lease.owner_switches_since_checkpoint),
        "streamArn": _s(lease.stream_arn),
        "shardId": _s(lease.shard_id),
        "tableName": _s(lease.table),
    }
    if lease.owner:
        item["leaseOwner"] = _s(lease.owner)
    if lease.parent_shard_ids:
        item["parentShardId"] = {"SS": sorted(lease.parent_shard_ids)}
    if lease.behind_ms is not None:
        item["millisBehindLatest"] = _n(lease.behind_ms)
    return item


def item_to_lease(item: dict[str, Any]) -> Lease:
    """A DynamoDB item of the lease table → :class:`Lease`."""
    def s(name: str, default: str | None = None) -> str | None:
        return item[name]["S"] if name in item else default

    def n(name: str) -> int:
        return int(item[name]["N"]) if name in item else 0

    return Lease(
        lease_key=item["leaseKey"]["S"],
        table=s("tableName", "") or "",
        stream_arn=s("streamArn", "") or "",
        shard_id=s("shardId", "") or "",
        owner=s("leaseOwner"),
        counter=n("leaseCounter"),
        checkpoint=s("checkpoint", "TRIM_HORIZON") or "TRIM_HORIZON",
        sub_sequence_number=n("checkpointSubSequenceNumber"),
        owner_switches_since_checkpoint=n("ownerSwitchesSinceCheckpoint"),
        parent_shard_ids=tuple(sorted(item.get("parentShardId", {}).get("SS", []))),
        behind_ms=int(item["millisBehindLatest"]["N"]) if "millisBehindLatest" in item else None,
    )


#: Worker announcements share the lease table, under lease keys with this prefix (never a shard).
WORKER_KEY_PREFIX = "__worker__:"
#: Recorded gaps (trimmed data) share the lease table too, under this prefix.
GAP_KEY_PREFIX = "__gap__:"


class DynamoDBLeaseStore:
    """:class:`pipeline.checkpoint.LeaseStore` on a DynamoDB table (``table_name``)."""

    def __init__(self, aws: AwsConfig, table_name: str, *, client: Any = None):
        self.table_name = table_name
        self.client = client or make_client("dynamodb", aws)

    # -- table --------------------------------------------------------------------------------

    def ensure_table(self, timeout_s: float = 120.0) -> None:
        """Create the lease table if absent (PAY_PER_REQUEST) and wait until ACTIVE."""
        try:
            self.client.create_table(
                TableName=self.table_name,
                KeySchema=[{"AttributeName": "leaseKey", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "leaseKey", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as exc:
            if self._code(exc) not in ("ResourceInUseException",):
                raise CheckpointStoreError(f"cannot create lease table {self.table_name!r}: "
                                           f"{self._code(exc)}: {exc}") from None
        except BotoCoreError as exc:
            raise CheckpointStoreError(f"cannot reach DynamoDB for lease table {self.table_name!r}: {exc}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = self.client.describe_table(TableName=self.table_name)["Table"]["TableStatus"]
            except ClientError as exc:
                raise CheckpointStoreError(f"cannot describe lease table {self.table_name!r}: {exc}") from None
            if status == "ACTIVE":
                return
            if time.monotonic() > deadline:
                raise CheckpointStoreError(f"lease table {self.table_name!r} not ACTIVE after {timeout_s} s")
            time.sleep(0.5)

    # -- reads --------------------------------------------------------------------------------

    def list_leases(self) -> list[Lease]:
        """Every lease (consistent Scan, all pages)."""
        leases = []
        kwargs: dict[str, Any] = {"TableName": self.table_name, "ConsistentRead": True}
        while True:
            try:
                page = self.client.scan(**kwargs)
            except (ClientError, BotoCoreError) as exc:
                raise CheckpointStoreError(f"cannot scan lease table {self.table_name!r}: {exc}") from None
            leases.extend(item_to_lease(item) for item in page.get("Items", [])
                          if not item["leaseKey"]["S"].startswith((WORKER_KEY_PREFIX, GAP_KEY_PREFIX)))
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def get_lease(self, lease_key: str) -> Lease | None:
        try:
            item = self.client.get_item(TableName=self.table_name, Key={"leaseKey": _s(lease_key)},
                                        ConsistentRead=True).get("Item")
        except (ClientError, BotoCoreError) as exc:
            raise CheckpointStoreError(f"cannot read lease {lease_key}: {exc}") from None
        return item_to_lease(item) if item else None

    # -- conditional writes ---------------------------------------------------------------------

    def create_lease_if_absent(self, lease: Lease) -> bool:
        try:
            self.client.put_item(TableName=self.table_name, Item=lease_to_item(lease),
                                 ConditionExpression="attribute_not_exists(leaseKey)")
            return True
        except ClientError as exc:
            if self._code(exc) == "ConditionalCheckFailedException":
                return False
            raise CheckpointStoreError(f"cannot create lease {lease.lease_key}: {exc}") from None
        except BotoCoreError as exc:
            raise CheckpointStoreError(f"cannot reach the lease table {self.table_name!r}: {exc}") from None

    def take_lease(self, lease: Lease, owner: str) -> Lease:
        # KCL counts a switch only when another worker owned it (DynamoDBLeaseRefresher.takeLease)
        switches = lease.owner_switches_since_checkpoint + (1 if lease.owner is not None and lease.owner != owner else 0)
        new = lease.with_(owner=owner, counter=lease.counter + 1, owner_switches_since_checkpoint=switches)
        self._update(lease, new, "SET leaseOwner = :owner, leaseCounter = :next, "
                                 "ownerSwitchesSinceCheckpoint = :switches",
                     {":owner": _s(owner), ":switches": _n(switches)}, check_owner=False)
        return new

    def renew_lease(self, lease: Lease, *, behind_ms: int | None = None) -> Lease:
        if behind_ms is None:
            new = lease.with_(counter=lease.counter + 1)
            self._update(lease, new, "SET leaseCounter = :next", {})
        else:
            new = lease.with_(counter=lease.counter + 1, behind_ms=behind_ms)
            self._update(lease, new, "SET leaseCounter = :next, millisBehindLatest = :behind",
                         {":behind": _n(behind_ms)})
        return new

    def checkpoint(self, lease: Lease, checkpoint: str, sub_sequence_number: int = 0, *,
                   behind_ms: int | None = None) -> Lease:
        new = lease.with_(counter=lease.counter + 1, checkpoint=checkpoint,
                          sub_sequence_number=sub_sequence_number, owner_switches_since_checkpoint=0,
                          behind_ms=lease.behind_ms if behind_ms is None else behind_ms)
        update = ("SET leaseCounter = :next, checkpoint = :cp, "
                  "checkpointSubSequenceNumber = :sub, ownerSwitchesSinceCheckpoint = :zero")
        values = {":cp": _s(checkpoint), ":sub": _n(sub_sequence_number), ":zero": _n(0)}
        if behind_ms is not None:
            update += ", millisBehindLatest = :behind"
            values[":behind"] = _n(behind_ms)
        self._update(lease, new, update, values)
        return new

    def release_lease(self, lease: Lease) -> Lease:
        new = lease.with_(owner=None, counter=lease.counter + 1)
        self._update(lease, new, "SET leaseCounter = :next REMOVE leaseOwner", {})
        return new

    def delete_lease(self, lease: Lease) -> None:
        try:
            self.client.delete_item(
                TableName=self.table_name, Key={"leaseKey": _s(lease.lease_key)},
                ConditionExpression="leaseCounter = :counter",
                ExpressionAttributeValues={":counter": _n(lease.counter)})
        except ClientError as exc:
            if self._code(exc) == "ConditionalCheckFailedException":
                raise LeaseLostError(f"lease {lease.lease_key} changed; not deleted") from None
            raise CheckpointStoreError(f"cannot delete lease {lease.lease_key}: {exc}") from None
        except BotoCoreError as exc:
            raise CheckpointStoreError(f"cannot reach the lease table {self.table_name!r}: {exc}") from None

    # -- worker announcements (items under WORKER_KEY_PREFIX) ----------------------------------

    def announce_worker(self, info: WorkerInfo) -> None:
        try:
            self.client.put_item(TableName=self.table_name, Item={
                "leaseKey": _s(WORKER_KEY_PREFIX + info.worker_id), "workerId": _s(info.worker_id),
                "host": _s(info.host), "pid": _n(info.pid), "startedAt": _s(info.started_at),
                "heartbeatAt": _s(info.heartbeat_at), "leases": _n(info.leases)})
        except (ClientError, BotoCoreError) as exc:
            raise CheckpointStoreError(f"cannot announce worker {info.worker_id}: {exc}") from None

    def _scan_prefix(self, prefix: str) -> list[dict[str, Any]]:
        """Every item whose lease key starts with ``prefix`` (consistent Scan, all pages)."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"TableName": self.table_name, "ConsistentRead": True,
                                  "FilterExpression": "begins_with(leaseKey, :p)",
                                  "ExpressionAttributeValues": {":p": _s(prefix)}}
        while True:
            try:
                page = self.client.scan(**kwargs)
            except (ClientError, BotoCoreError) as exc:
                raise CheckpointStoreError(f"cannot scan lease table {self.table_name!r}: {exc}") from None
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def list_workers(self) -> list[WorkerInfo]:
        workers = [WorkerInfo(worker_id=item["workerId"]["S"], host=item["host"]["S"], pid=int(item["pid"]["N"]),
                              started_at=item["startedAt"]["S"], heartbeat_at=item["heartbeatAt"]["S"],
                              leases=int(item["leases"]["N"]))
                   for item in self._scan_prefix(WORKER_KEY_PREFIX)]
        return sorted(workers, key=lambda w: w.worker_id)

    def remove_worker(self, worker_id: str) -> None:
        try:
            self.client.delete_item(TableName=self.table_name, Key={"leaseKey": _s(WORKER_KEY_PREFIX + worker_id)})
        except (ClientError, BotoCoreError) as exc:
            raise CheckpointStoreError(f"cannot remove worker {worker_id}: {exc}") from None

    # -- recorded gaps (items under GAP_KEY_PREFIX) -------------------------------------------

    def record_gap(self, gap: Gap) -> None:
        item = {"leaseKey": _s(GAP_KEY_PREFIX + gap.gap_id), "streamArn": _s(gap.stream_arn),
                "tableName": _s(gap.table), "shardId": _s(gap.shard_id), "lastCheckpoint": _s(gap.last_checkpoint),
                "detectedAt": _s(gap.detected_at), "policy": _s(gap.policy), "error": _s(gap.error)}
        if gap.first_position_after is not None:
            item["firstPositionAfter"] = _s(gap.first_position_after)
        try:
            self.client.put_item(TableName=self.table_name, Item=item)
        except (ClientError, BotoCoreError) as exc:
            raise CheckpointStoreError(f"cannot record gap of shard {gap.shard_id}: {exc}") from None

    def list_gaps(self) -> list[Gap]:
        gaps = [Gap(stream_arn=item["streamArn"]["S"], table=item["tableName"]["S"], shard_id=item["shardId"]["S"],
                    last_checkpoint=item["lastCheckpoint"]["S"],
                    first_position_after=item.get("firstPositionAfter", {}).get("S"),
                    detected_at=item["detectedAt"]["S"], policy=item["policy"]["S"], error=item["error"]["S"])
                for item in self._scan_prefix(GAP_KEY_PREFIX)]
        return sorted(gaps, key=lambda g: g.detected_at)

    def _update(self, old: Lease, new: Lease, update: str, values: dict[str, Any], *, check_owner: bool = True) -> None:
        condition = "leaseCounter = :counter"
        values = {**values, ":counter": _n(old.counter), ":next": _n(new.counter)}
        if check_owner or old.owner is not None:
            if old.owner is None:
                condition += " AND attribute_not_exists(leaseOwner)"
            else:
                condition += " AND leaseOwner = :old_owner"
                values[":old_owner"] = _s(old.owner)
        try:
            self.client.update_item(TableName=self.table_name, Key={"leaseKey": _s(old.lease_key)},
                                    UpdateExpression=update, ConditionExpression=condition,
                                    ExpressionAttributeValues=values)
        except ClientError as exc:
            if self._code(exc) == "ConditionalCheckFailedException":
                raise LeaseLostError(f"lease {old.lease_key} was changed by another worker "
                                     f"(expected owner {old.owner!r}, counter {old.counter})") from None
            raise CheckpointStoreError(f"cannot update lease {old.lease_key}: {self._code(exc)}: {exc}") from None
        except BotoCoreError as exc:
            raise CheckpointStoreError(f"cannot reach the lease table {self.table_name!r}: {exc}") from None

    @staticmethod
    def _code(exc: ClientError) -> str:
        return exc.response.get("Error", {}).get("Code", "")
