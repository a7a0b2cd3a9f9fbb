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
    millisBehindLatest            (ours: the owner's lag in ms)
    moveCheckpoint, moveRequestId, moveRequestedBy, moveRequestedAt
                                  (ours: a checkpoint move waiting for the owner; see pipeline.checkpoint)
    versionFloor, versionHigh     (ours: N, see pipeline.codec.record_version)
    startingSequenceNumber, retainedSince
                                  (ours: S / N, the head check; see pipeline.checkpoint.Lease)

A store with a ``namespace`` (a replay) prefixes every key it writes with ``{namespace}#`` and
sees only those; the store without one never sees prefixed keys.

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
from pipeline.checkpoint import NAMESPACE_SEPARATOR, Gap, Lease, MoveRequest, WorkerInfo, keeps_head_check
from connectors.dynamodb_streams.errors import store_error
from pipeline.errors import CheckpointStoreError, LeaseLostError, LeaseNotFoundError


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


_MOVE_ATTRIBUTES = ("moveCheckpoint", "moveRequestId", "moveRequestedBy", "moveRequestedAt")
#: what the head check of a lease needs (cleared by checkpoint writes: pipeline.checkpoint.keeps_head_check)
_HEAD_ATTRIBUTES = ("startingSequenceNumber", "retainedSince")


def move_from_item(item: dict[str, Any]) -> MoveRequest | None:
    """The move request stored in a lease item, or None."""
    if "moveCheckpoint" not in item or "moveRequestId" not in item:
        return None
    return MoveRequest(checkpoint=item["moveCheckpoint"]["S"], request_id=item["moveRequestId"]["S"],
                       requested_by=item.get("moveRequestedBy", {}).get("S", ""),
                       requested_at=item.get("moveRequestedAt", {}).get("S", ""))


def lease_to_item(lease: Lease, key_prefix: str = "") -> dict[str, Any]:
    """A :class:`Lease` as a DynamoDB item (AttributeValue map); ``key_prefix``: the namespace part."""
    item: dict[str, Any] = {
        "leaseKey": _s(key_prefix + lease.lease_key),
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
    if lease.move is not None:
        item.update(moveCheckpoint=_s(lease.move.checkpoint), moveRequestId=_s(lease.move.request_id),
                    moveRequestedBy=_s(lease.move.requested_by), moveRequestedAt=_s(lease.move.requested_at))
    if lease.version_floor is not None:
        item["versionFloor"] = _n(lease.version_floor)
    if lease.version_high is not None:
        item["versionHigh"] = _n(lease.version_high)
    if lease.starting_sequence_number is not None:
        item["startingSequenceNumber"] = _s(lease.starting_sequence_number)
    if lease.retained_since is not None:
        item["retainedSince"] = _n(lease.retained_since)
    return item


def item_to_lease(item: dict[str, Any], key_prefix: str = "") -> Lease:
    """A DynamoDB item of the lease table → :class:`Lease` (``key_prefix`` stripped from the key)."""
    def s(name: str, default: str | None = None) -> str | None:
        return item[name]["S"] if name in item else default

    def n(name: str) -> int:
        return int(item[name]["N"]) if name in item else 0

    return Lease(
        lease_key=item["leaseKey"]["S"][len(key_prefix):],
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
        move=move_from_item(item),
        version_floor=int(item["versionFloor"]["N"]) if "versionFloor" in item else None,
        version_high=int(item["versionHigh"]["N"]) if "versionHigh" in item else None,
        starting_sequence_number=s("startingSequenceNumber"),
        retained_since=int(item["retainedSince"]["N"]) if "retainedSince" in item else None,
    )


#: Worker announcements share the lease table, under lease keys with this prefix (never a shard).
WORKER_KEY_PREFIX = "__worker__:"
#: Recorded gaps (trimmed data) share the lease table too, under this prefix.
GAP_KEY_PREFIX = "__gap__:"


class DynamoDBLeaseStore:
    """:class:`pipeline.checkpoint.LeaseStore` on a DynamoDB table (``table_name``); with
    ``namespace`` (e.g. ``replay-20261122T101500-ab12``), only that namespace's items."""

    def __init__(self, aws: AwsConfig, table_name: str, *, client: Any = None, namespace: str = ""):
        if NAMESPACE_SEPARATOR in namespace:
            raise ValueError(f"a lease namespace cannot contain {NAMESPACE_SEPARATOR!r}: {namespace!r}")
        self.table_name = table_name
        self.namespace = namespace
        self.prefix = f"{namespace}{NAMESPACE_SEPARATOR}" if namespace else ""
        self.client = client or make_client("dynamodb", aws)
        self._aws = aws

    def in_namespace(self, namespace: str = "") -> "DynamoDBLeaseStore":
        """The same table seen through another namespace ("" = the live consumer's), same client."""
        return DynamoDBLeaseStore(self._aws, self.table_name, client=self.client, namespace=namespace)

    def _key(self, lease_key: str) -> dict[str, Any]:
        return {"leaseKey": _s(self.prefix + lease_key)}

    def _mine(self, stored_key: str) -> bool:
        """True for a stored key of this store's namespace (no namespace: keys without one)."""
        if self.prefix:
            return stored_key.startswith(self.prefix)
        return NAMESPACE_SEPARATOR not in stored_key

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
                raise store_error(exc, "lease_table_create", f"cannot create lease table {self.table_name!r}") from None
        except BotoCoreError as exc:
            raise store_error(exc, "lease_table_create", f"cannot reach DynamoDB for lease table {self.table_name!r}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = self.client.describe_table(TableName=self.table_name)["Table"]["TableStatus"]
            except (ClientError, BotoCoreError) as exc:
                raise store_error(exc, "lease_table_describe", f"cannot describe lease table {self.table_name!r}") from None
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
                raise store_error(exc, "lease_scan", f"cannot scan lease table {self.table_name!r}") from None
            special = (self.prefix + WORKER_KEY_PREFIX, self.prefix + GAP_KEY_PREFIX)
            leases.extend(item_to_lease(item, self.prefix) for item in page.get("Items", [])
                          if self._mine(item["leaseKey"]["S"]) and not item["leaseKey"]["S"].startswith(special))
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def get_lease(self, lease_key: str) -> Lease | None:
        try:
            item = self.client.get_item(TableName=self.table_name, Key=self._key(lease_key),
                                        ConsistentRead=True).get("Item")
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, "lease_get", f"cannot read lease {lease_key}") from None
        return item_to_lease(item, self.prefix) if item else None

    # -- conditional writes ---------------------------------------------------------------------

    def create_lease_if_absent(self, lease: Lease) -> bool:
        try:
            self.client.put_item(TableName=self.table_name, Item=lease_to_item(lease, self.prefix),
                                 ConditionExpression="attribute_not_exists(leaseKey)")
            return True
        except ClientError as exc:
            if self._code(exc) == "ConditionalCheckFailedException":
                return False
            raise store_error(exc, "lease_create", f"cannot create lease {lease.lease_key}") from None
        except BotoCoreError as exc:
            raise store_error(exc, "lease_create", f"cannot reach the lease table {self.table_name!r}") from None

    def take_lease(self, lease: Lease, owner: str) -> Lease:
        # KCL counts a switch only when another worker owned it (DynamoDBLeaseRefresher.takeLease)
        switches = lease.owner_switches_since_checkpoint + (1 if lease.owner is not None and lease.owner != owner else 0)
        new = lease.with_(owner=owner, counter=lease.counter + 1, owner_switches_since_checkpoint=switches)
        return self._update(lease, new, "SET leaseOwner = :owner, leaseCounter = :next, "
                                        "ownerSwitchesSinceCheckpoint = :switches",
                            {":owner": _s(owner), ":switches": _n(switches)}, check_owner=False,
                            operation="lease_take")

    def renew_lease(self, lease: Lease, *, behind_ms: int | None = None) -> Lease:
        if behind_ms is None:
            new = lease.with_(counter=lease.counter + 1)
            return self._update(lease, new, "SET leaseCounter = :next", {}, operation="lease_renew")
        new = lease.with_(counter=lease.counter + 1, behind_ms=behind_ms)
        return self._update(lease, new, "SET leaseCounter = :next, millisBehindLatest = :behind",
                            {":behind": _n(behind_ms)}, operation="lease_renew")

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
        if lease.version_floor is not None:
            update += ", versionFloor = :floor"
            values[":floor"] = _n(lease.version_floor)
        if lease.version_high is not None:
            update += ", versionHigh = :high"
            values[":high"] = _n(lease.version_high)
        if not keeps_head_check(checkpoint):  # the head was read and checked (pipeline.checkpoint)
            update += " REMOVE " + ", ".join(_HEAD_ATTRIBUTES)
            new = new.with_(starting_sequence_number=None, retained_since=None)
        return self._update(lease, new, update, values, operation="checkpoint")

    def release_lease(self, lease: Lease) -> Lease:
        new = lease.with_(owner=None, counter=lease.counter + 1)
        return self._update(lease, new, "SET leaseCounter = :next REMOVE leaseOwner", {}, operation="lease_release")

    # -- checkpoint moves -----------------------------------------------------------------------

    def request_move(self, lease_key: str, move: MoveRequest) -> Lease:
        try:
            attrs = self.client.update_item(
                TableName=self.table_name, Key=self._key(lease_key),
                UpdateExpression="SET moveCheckpoint = :cp, moveRequestId = :id, moveRequestedBy = :by, "
                                 "moveRequestedAt = :at",
                ConditionExpression="attribute_exists(leaseKey)",
                ExpressionAttributeValues={":cp": _s(move.checkpoint), ":id": _s(move.request_id),
                                           ":by": _s(move.requested_by), ":at": _s(move.requested_at)},
                ReturnValues="ALL_NEW")["Attributes"]
        except ClientError as exc:
            if self._code(exc) == "ConditionalCheckFailedException":
                raise LeaseNotFoundError(f"no lease {lease_key} in table {self.table_name!r}") from None
            raise store_error(exc, "lease_move_request", f"cannot request a move of lease {lease_key}") from None
        except BotoCoreError as exc:
            raise store_error(exc, "lease_move_request", f"cannot reach the lease table {self.table_name!r}") from None
        return item_to_lease(attrs, self.prefix)

    def set_checkpoint(self, lease: Lease, checkpoint: str) -> Lease:
        # conditional on having no owner, whatever ``lease`` says (an owner applies a request instead)
        return self._move(lease.with_(owner=None), checkpoint)

    def apply_move(self, lease: Lease, move: MoveRequest) -> Lease:
        return self._move(lease, move.checkpoint, request_id=move.request_id)

    def _move(self, lease: Lease, checkpoint: str, request_id: str | None = None) -> Lease:
        """Set the checkpoint and clear any move request (conditional on counter and owner, and
        with ``request_id`` on that request still being the stored one)."""
        new = lease.with_(counter=lease.counter + 1, checkpoint=checkpoint, sub_sequence_number=0,
                          owner_switches_since_checkpoint=0, move=None)
        removed = _MOVE_ATTRIBUTES
        if not keeps_head_check(checkpoint):  # e.g. TRIM_HORIZON: "the oldest retained" (pipeline.checkpoint)
            removed += _HEAD_ATTRIBUTES
            new = new.with_(starting_sequence_number=None, retained_since=None)
        update = ("SET leaseCounter = :next, checkpoint = :cp, checkpointSubSequenceNumber = :zero, "
                  "ownerSwitchesSinceCheckpoint = :zero REMOVE " + ", ".join(removed))
        values = {":cp": _s(checkpoint), ":zero": _n(0)}
        if request_id is None:
            return self._update(lease, new, update, values, operation="checkpoint")
        return self._update(lease, new, update, {**values, ":request": _s(request_id)},
                            extra_condition="moveRequestId = :request", operation="checkpoint")

    def delete_lease(self, lease: Lease) -> None:
        try:
            self.client.delete_item(
                TableName=self.table_name, Key=self._key(lease.lease_key),
                ConditionExpression="leaseCounter = :counter",
                ExpressionAttributeValues={":counter": _n(lease.counter)})
        except ClientError as exc:
            if self._code(exc) == "ConditionalCheckFailedException":
                raise LeaseLostError(f"lease {lease.lease_key} changed; not deleted") from None
            raise store_error(exc, "lease_delete", f"cannot delete lease {lease.lease_key}") from None
        except BotoCoreError as exc:
            raise store_error(exc, "lease_delete", f"cannot reach the lease table {self.table_name!r}") from None

    def drop_namespace(self) -> int:
        """Delete every item of this store's namespace (leases, workers, gaps); returns how many.
        Only for a namespaced store (a finished replay): raises ValueError without a namespace."""
        if not self.prefix:
            raise ValueError("drop_namespace is only for a namespaced store (the live leases stay)")
        deleted = 0
        for item in self._scan_prefix(self.prefix):
            try:
                self.client.delete_item(TableName=self.table_name, Key={"leaseKey": item["leaseKey"]})
            except (ClientError, BotoCoreError) as exc:
                raise store_error(exc, "lease_delete", f"cannot delete {item['leaseKey']['S']}") from None
            deleted += 1
        return deleted

    # -- worker announcements (items under WORKER_KEY_PREFIX) ----------------------------------

    def announce_worker(self, info: WorkerInfo) -> None:
        item = {"leaseKey": _s(self.prefix + WORKER_KEY_PREFIX + info.worker_id), "workerId": _s(info.worker_id),
                "host": _s(info.host), "pid": _n(info.pid), "startedAt": _s(info.started_at),
                "heartbeatAt": _s(info.heartbeat_at), "leases": _n(info.leases)}
        if info.sink_lanes:
            item["sinkLanes"] = _s(info.sink_lanes)  # per-sink lanes (issue 15), for ddb-cdc status
        try:
            self.client.put_item(TableName=self.table_name, Item=item)
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, "worker_announce", f"cannot announce worker {info.worker_id}") from None

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
                raise store_error(exc, "lease_scan", f"cannot scan lease table {self.table_name!r}") from None
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def list_workers(self) -> list[WorkerInfo]:
        workers = [WorkerInfo(worker_id=item["workerId"]["S"], host=item["host"]["S"], pid=int(item["pid"]["N"]),
                              started_at=item["startedAt"]["S"], heartbeat_at=item["heartbeatAt"]["S"],
                              leases=int(item["leases"]["N"]),
                              sink_lanes=item["sinkLanes"]["S"] if "sinkLanes" in item else None)
                   for item in self._scan_prefix(self.prefix + WORKER_KEY_PREFIX)]
        return sorted(workers, key=lambda w: w.worker_id)

    def remove_worker(self, worker_id: str) -> None:
        try:
            self.client.delete_item(TableName=self.table_name, Key=self._key(WORKER_KEY_PREFIX + worker_id))
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, "worker_remove", f"cannot remove worker {worker_id}") from None

    # -- recorded gaps (items under GAP_KEY_PREFIX) -------------------------------------------

    def record_gap(self, gap: Gap) -> None:
        item = {"leaseKey": _s(self.prefix + GAP_KEY_PREFIX + gap.gap_id), "streamArn": _s(gap.stream_arn),
                "tableName": _s(gap.table), "shardId": _s(gap.shard_id), "lastCheckpoint": _s(gap.last_checkpoint),
                "detectedAt": _s(gap.detected_at), "policy": _s(gap.policy), "error": _s(gap.error)}
        if gap.first_position_after is not None:
            item["firstPositionAfter"] = _s(gap.first_position_after)
        try:
            self.client.put_item(TableName=self.table_name, Item=item)
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, "gap_record", f"cannot record gap of shard {gap.shard_id}") from None

    def list_gaps(self) -> list[Gap]:
        gaps = [Gap(stream_arn=item["streamArn"]["S"], table=item["tableName"]["S"], shard_id=item["shardId"]["S"],
                    last_checkpoint=item["lastCheckpoint"]["S"],
                    first_position_after=item.get("firstPositionAfter", {}).get("S"),
                    detected_at=item["detectedAt"]["S"], policy=item["policy"]["S"], error=item["error"]["S"])
                for item in self._scan_prefix(self.prefix + GAP_KEY_PREFIX)]
        return sorted(gaps, key=lambda g: g.detected_at)

    def _update(self, old: Lease, new: Lease, update: str, values: dict[str, Any], *, check_owner: bool = True,
                extra_condition: str = "", operation: str = "lease_update") -> Lease:
        """One conditional UpdateItem; returns ``new`` with the move request as stored afterwards."""
        condition = "leaseCounter = :counter"
        if extra_condition:
            condition += f" AND {extra_condition}"
        values = {**values, ":counter": _n(old.counter), ":next": _n(new.counter)}
        if check_owner or old.owner is not None:
            if old.owner is None:
                condition += " AND attribute_not_exists(leaseOwner)"
            else:
                condition += " AND leaseOwner = :old_owner"
                values[":old_owner"] = _s(old.owner)
        try:
            attrs = self.client.update_item(TableName=self.table_name, Key=self._key(old.lease_key),
                                            UpdateExpression=update, ConditionExpression=condition,
                                            ExpressionAttributeValues=values,
                                            ReturnValues="ALL_NEW").get("Attributes", {})
        except ClientError as exc:
            if self._code(exc) == "ConditionalCheckFailedException":
                raise LeaseLostError(f"lease {old.lease_key} was changed by another worker "
                                     f"(expected owner {old.owner!r}, counter {old.counter})") from None
            raise store_error(exc, operation, f"cannot update lease {old.lease_key}") from None
        except BotoCoreError as exc:
            raise store_error(exc, operation, f"cannot reach the lease table {self.table_name!r}") from None
        return new.with_(move=move_from_item(attrs))

    @staticmethod
    def _code(exc: ClientError) -> str:
        return exc.response.get("Error", {}).get("Code", "")
