"""A realistic, seeded, mixed workload of DynamoDB changes (used by ``ddb-cdc demo``, tests and benchmarks).

Items have a composite key (``pk`` S, ``sk`` N) and attributes of every DynamoDB type: strings
with unicode and emoji, empty strings, integers, 38-digit numbers, decimals with negative
exponents, binary (and empty binary), string / number / binary sets, nested maps and lists,
NULL and BOOL. Changes are puts (inserts and overwrites), UpdateItem calls (SET, REMOVE, ADD to
sets) and deletes, in a seeded random order, so the same seed gives the same changes.

Each attribute name always carries one type, so that OpenSearch's dynamic mapping accepts every
document (mixed types per attribute are issue 8's mapping modes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterator

from pipeline.codec import encode_item, encode_value

TABLE_KEY_SCHEMA = [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}]
TABLE_ATTRIBUTES = [{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "N"}]

#: Cache key templates matching the workload's items (for the Redis sink).
CACHE_KEY_TEMPLATES = ["item:{pk}:{sk}", "email:{email}", "user:{pk}"]

_NAMES = ["Ada", "Grace", "Линус", "東京", "Zoë", "🦄 unicorn", "O'Brien", "Ω-ω", "naïve café", ""]
_TAGS = ["red", "green", "blue", "🍕", "élan", "tag with space", "x" * 40]


def create_table(client: Any, table: str, view_type: str = "NEW_AND_OLD_IMAGES") -> str:
    """Create the workload table with a stream; wait until ACTIVE; return its LatestStreamArn."""
    client.create_table(
        TableName=table,
        KeySchema=TABLE_KEY_SCHEMA,
        AttributeDefinitions=TABLE_ATTRIBUTES,
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": view_type},
    )
    client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 0.2, "MaxAttempts": 300})
    return client.describe_table(TableName=table)["Table"]["LatestStreamArn"]


@dataclass
class Change:
    """One planned change: ``kind`` put | update | delete, the key, and the request arguments."""

    kind: str
    key: dict[str, Any]
    request: dict[str, Any]


class Workload:
    """Seeded generator of changes over ``items`` distinct items."""

    def __init__(self, seed: int = 7, items: int = 200):
        self.rng = random.Random(seed)
        self.items = items
        self.live: set[int] = set()

    def key(self, index: int) -> dict[str, Any]:
        return {"pk": f"user#{index:05d}-{_NAMES[index % len(_NAMES)][:3]}", "sk": Decimal(index % 7)}

    def item(self, index: int) -> dict[str, Any]:
        """A full item of every type for item ``index``."""
        rng = self.rng
        key = self.key(index)
        item: dict[str, Any] = dict(key)
        item.update({
            "name": rng.choice(_NAMES),
            "email": f"u{index}.{rng.randint(0, 3)}@example.com",
            "count": Decimal(rng.randint(-10**12, 10**12)),
            "big": Decimal(str(rng.randint(10**36, 10**38 - 1))),
            "price": Decimal(rng.randint(0, 10**6)) / Decimal(100),
            "tiny": Decimal(f"{rng.randint(1, 9)}.{rng.randint(0, 9)}E-{rng.randint(20, 120)}"),
            "blob": bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 48))),
            "active": rng.random() < 0.5,
            "nothing": None,
            "tags": set(rng.sample(_TAGS, rng.randint(1, 4))),
            "scores": {Decimal(rng.randint(0, 10**9)) for _ in range(rng.randint(1, 4))},
            "keys_bin": {bytes([rng.randint(0, 255), n]) for n in range(rng.randint(1, 3))},
            "profile": {
                "city": rng.choice(["Paris", "Zürich", "São Paulo", "京都"]),
                "visits": Decimal(rng.randint(0, 10**6)),
                "address": {"line1": f"{rng.randint(1, 999)} Main St", "zip": f"{rng.randint(0, 99999):05d}",
                            "geo": {"lat": Decimal("48.8566"), "lon": Decimal("2.3522")}},
                "prefs": [{"k": "theme", "v": rng.choice(["dark", "light"])}, {"k": "lang", "v": "fr"}],
            },
            "history": [{"at": Decimal(1_700_000_000 + rng.randint(0, 10**7)), "what": rng.choice(_TAGS)}
                        for _ in range(rng.randint(0, 3))],
            "note": rng.choice(["", "plain", "emoji 🎉🎉", "line\nbreak", "quote \" and \\ backslash"]),
        })
        return item

    def changes(self, count: int) -> Iterator[Change]:
        """``count`` changes: about 45% puts, 35% updates, 20% deletes (updates and deletes only on live items)."""
        for _ in range(count):
            index = self.rng.randrange(self.items)
            roll = self.rng.random()
            key = self.key(index)
            if index not in self.live or roll < 0.45:
                self.live.add(index)
                yield Change("put", key, {"Item": encode_item(self.item(index))})
            elif roll < 0.80:
                yield Change("update", key, self._update(index))
            else:
                self.live.discard(index)
                yield Change("delete", key, {"Key": encode_item(key)})

    def _update(self, index: int) -> dict[str, Any]:
        rng = self.rng
        names = {"#c": "count", "#n": "name", "#p": "profile", "#v": "visits", "#t": "tags", "#e": "email"}
        values = {
            ":c": encode_value(Decimal(rng.randint(-10**6, 10**6))),
            ":n": encode_value(rng.choice(_NAMES)),
            ":v": encode_value(Decimal(rng.randint(0, 10**6))),
            ":t": encode_value({rng.choice(_TAGS)}),
            ":e": encode_value(f"u{index}.{rng.randint(4, 9)}@example.com"),
        }
        expression = "SET #c = :c, #n = :n, #p.#v = :v, #e = :e ADD #t :t"
        if rng.random() < 0.3:
            names["#o"] = "note"
            expression += " REMOVE #o"
        return {"Key": encode_item(self.key(index)), "UpdateExpression": expression,
                "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}


def apply_change(client: Any, table: str, change: Change) -> None:
    """Send one change to DynamoDB (PutItem, UpdateItem or DeleteItem), B values as bytes."""
    request = _b64_to_bytes(change.request)
    if change.kind == "put":
        client.put_item(TableName=table, **request)
    elif change.kind == "update":
        client.update_item(TableName=table, **request)
    else:
        client.delete_item(TableName=table, **request)


def write_changes(client: Any, table: str, workload: Workload, count: int,
                  on_change: Callable[[int], None] | None = None, rate_per_s: float | None = None) -> int:
    """Apply ``count`` changes from ``workload`` (optionally at ``rate_per_s``); returns the count."""
    import time

    started = time.monotonic()
    n = 0
    for n, change in enumerate(workload.changes(count), start=1):
        apply_change(client, table, change)
        if on_change:
            on_change(n)
        if rate_per_s:
            delay = started + n / rate_per_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return n


def scan_items(client: Any, table: str) -> list[dict[str, Any]]:
    """Every item of ``table`` (consistent Scan, all pages), decoded."""
    from pipeline.codec import decode_item

    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    while True:
        page = client.scan(**kwargs)
        items.extend(decode_item(i) for i in page.get("Items", []))
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _b64_to_bytes(value: Any) -> Any:
    """AttributeValue JSON with base64 B/BS text → boto3's shape with raw bytes."""
    import base64

    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "B" and isinstance(v, str) and len(value) == 1:
                return {"B": base64.b64decode(v)}
            if k == "BS" and isinstance(v, list) and len(value) == 1:
                return {"BS": [base64.b64decode(x) for x in v]}
            out[k] = _b64_to_bytes(v)
        return out
    if isinstance(value, list):
        return [_b64_to_bytes(v) for v in value]
    return value
