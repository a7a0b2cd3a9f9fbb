"""Deterministic, realistic benchmark inputs, and a DynamoDB Streams double at the HTTP boundary.

**Items.** :func:`make_image` builds one item image in DynamoDB's wire JSON (AttributeValues, B
as base64 text — what GetRecords sends) from a seeded :class:`random.Random`: 10–40 attributes
(partition key ``pk`` S, sort key ``sk`` N, then attributes of an orders-like table whose names
keep one type each, as in a real table), always at least one nested map (maps in lists in maps,
up to 3 levels), one list, one set (SS, NS or BS; all three occur across a corpus) and one binary
value; numbers include 38-significant-digit integers and decimals and negative/fractional ones;
strings include non-ASCII text. Each image's compact JSON is exactly the drawn target size,
1,024–4,096 bytes (skewed to the small end: ``1024 + 3072·u⁴``, mean ≈ 1.6 KB), hit by sizing a
free-text ``notes`` attribute.

**Records.** :func:`make_records`: NEW_AND_OLD_IMAGES stream records — 50 % MODIFY (old image +
a new one with 1–3 attributes changed), 40 % INSERT, 10 % REMOVE (a quarter of them TTL deletes,
with ``userIdentity``) — with increasing sequence numbers, ApproximateCreationDateTime as epoch
seconds (as the wire sends it), eventID, SizeBytes. Same seed → same bytes.

**Responses.** :func:`recorded_stream` turns records into GetRecords response bodies (``bytes``
exactly as DynamoDB Streams sends them: ``{"Records": [...], "NextShardIterator": ...}``), 1,000
records per page, the last page of a closed shard without ``NextShardIterator``. A pool of
distinct records is generated once and cycled, each copy with its own key, sequence number,
eventID and time, so 50,000 records cost about as much to build as the pool.

**The double.** :class:`StreamsHTTPDouble` answers a *real* botocore ``dynamodbstreams`` client
from memory: a ``before-send`` handler returns the recorded response bytes as the HTTP response,
so SigV4 signing, botocore's retry handler, its response parser (or the fast path's
``before-parse`` hook) and :class:`~connectors.dynamodb_streams.source.DynamoDBStreamSource` all
run as in production; only the socket is missing.
"""

from __future__ import annotations

import base64
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson

SEED = 20260107
REGION = "us-east-1"
MIN_IMAGE_BYTES = 1024
MAX_IMAGE_BYTES = 4096
RECORDS_PER_PAGE = 1000

_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
          "quebec romeo sierra tango uniform victor whiskey xray yankee zulu order parcel invoice refund "
          "pending shipped delivered cancelled returned priority standard express warehouse north south "
          "east west central customer account premium basic trial annual monthly weekly blue green red "
          "large small medium fragile heavy light cold frozen ambient").split()
_UNICODE = ("Zürich", "São Paulo", "Kraków", "東京", "Αθήνα", "café", "naïve", "Ωmega", "💡 idea", "✓ ok")
_STATUSES = ("pending", "paid", "packed", "shipped", "delivered", "cancelled", "returned")
_CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF")

# attribute name → kind; a real table keeps one type per attribute name
_SCHEMA: tuple[tuple[str, str], ...] = (
    ("customerId", "id"), ("orderId", "id"), ("status", "status"), ("createdAt", "ts"), ("updatedAt", "ts"),
    ("version", "int"), ("total", "price"), ("currency", "currency"), ("email", "email"), ("city", "city"),
    ("quantity", "int"), ("weightKg", "decimal"), ("ledgerBalance", "bigint"), ("exactRate", "bigdec"),
    ("tinyFactor", "tiny"), ("delta", "negative"), ("isGift", "bool"), ("isPriority", "bool"),
    ("cancelReason", "null"), ("couponCode", "null_or_word"), ("checksum", "bin"), ("signature", "bin"),
    ("thumbnail", "bin"), ("tags", "ss"), ("channels", "ss"), ("scores", "ns"), ("binRefs", "bs"),
    ("fingerprints", "bs"), ("shippingAddress", "address"), ("billingAddress", "address"),
    ("lineItems", "lines"), ("history", "history"), ("attributes", "map"), ("preferences", "map"),
    ("metrics", "nested"), ("labels", "list"), ("matrix", "nestedlist"), ("sessionToken", "id"),
    ("region", "word"), ("warehouse", "word"), ("carrier", "word"), ("trackingNo", "id"),
    ("note", "phrase"), ("subtitle", "phrase"), ("rating", "decimal"), ("visits", "int"),
    ("loyaltyPoints", "bigint"), ("discount", "price"), ("taxRate", "tiny"), ("origin", "city"),
)
_FORCED = {"map": ("shippingAddress", "attributes", "preferences", "metrics"),
           "list": ("lineItems", "labels", "history", "matrix"),
           "set": ("tags", "channels", "scores", "binRefs", "fingerprints"),
           "bin": ("checksum", "signature", "thumbnail")}
_OPTIONAL = [name for name, _ in _SCHEMA]
_FORCED_NAMES = frozenset(n for group in _FORCED.values() for n in group)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _num_text(rng: random.Random, kind: str) -> str:
    if kind == "int":
        return str(rng.randint(0, 100_000))
    if kind == "price":
        return f"{rng.randint(0, 99_999)}.{rng.randint(1, 99):02d}".rstrip("0")
    if kind == "decimal":
        return f"{rng.randint(0, 999)}.{rng.randint(1, 9999):04d}".rstrip("0")
    if kind == "bigint":  # up to 38 significant digits, exact
        digits = rng.randint(20, 38)
        return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    if kind == "bigdec":  # 38 significant digits with a fraction
        whole = rng.randint(1, 18)
        text = str(rng.randint(10 ** 37, 10 ** 38 - 1))
        return (text[:whole] + "." + text[whole:]).rstrip("0").rstrip(".")
    if kind == "tiny":  # small fractions (negative exponents in scientific form)
        return "0." + "0" * rng.randint(1, 12) + str(rng.randint(1, 99_999)).rstrip("0")
    if kind == "negative":
        return f"-{rng.randint(1, 10 ** rng.randint(1, 15))}"
    raise ValueError(kind)


def _word_phrase(rng: random.Random, n: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    if rng.random() < 0.15:
        words.append(rng.choice(_UNICODE))
    return " ".join(words)


def _ts(rng: random.Random) -> str:
    return (f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z")


def _scalar(rng: random.Random) -> dict[str, Any]:
    pick = rng.random()
    if pick < 0.35:
        return {"S": _word_phrase(rng, rng.randint(1, 3))}
    if pick < 0.65:
        return {"N": _num_text(rng, rng.choice(("int", "price", "decimal", "bigint", "tiny", "negative")))}
    if pick < 0.75:
        return {"BOOL": rng.random() < 0.5}
    if pick < 0.8:
        return {"NULL": True}
    if pick < 0.9:
        return {"B": _b64(rng.randbytes(rng.randint(4, 24)))}
    return {"S": _ts(rng)}


def _nested(rng: random.Random, depth: int) -> dict[str, Any]:
    """A map or list value nested up to ``depth`` more levels (maps in lists in maps …)."""
    if depth <= 0 or rng.random() < 0.45:
        return _scalar(rng)
    if rng.random() < 0.55:
        return {"M": {rng.choice(_WORDS) + str(i): _nested(rng, depth - 1) for i in range(rng.randint(1, 4))}}
    return {"L": [_nested(rng, depth - 1) for _ in range(rng.randint(1, 4))]}


def _value(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind == "id":
        return {"S": rng.randbytes(12).hex()}
    if kind == "status":
        return {"S": rng.choice(_STATUSES)}
    if kind == "ts":
        return {"S": _ts(rng)}
    if kind in ("int", "price", "decimal", "bigint", "bigdec", "tiny", "negative"):
        return {"N": _num_text(rng, kind)}
    if kind == "currency":
        return {"S": rng.choice(_CURRENCIES)}
    if kind == "email":
        return {"S": f"{rng.choice(_WORDS)}.{rng.choice(_WORDS)}{rng.randint(1, 999)}@example.com"}
    if kind == "city":
        return {"S": rng.choice(_UNICODE[:5] + ("Berlin", "Lyon", "Austin", "Osaka", "Porto"))}
    if kind == "bool":
        return {"BOOL": rng.random() < 0.5}
    if kind == "null":
        return {"NULL": True}
    if kind == "null_or_word":
        return {"NULL": True} if rng.random() < 0.5 else {"S": rng.choice(_WORDS).upper() + str(rng.randint(10, 99))}
    if kind == "bin":
        return {"B": _b64(rng.randbytes(rng.randint(8, 48)))}
    if kind == "ss":
        return {"SS": sorted({rng.choice(_WORDS) for _ in range(rng.randint(1, 5))})}
    if kind == "ns":
        return {"NS": sorted({_num_text(rng, rng.choice(("int", "decimal", "bigint", "negative")))
                              for _ in range(rng.randint(1, 5))})}
    if kind == "bs":
        return {"BS": sorted({_b64(rng.randbytes(rng.randint(4, 16))) for _ in range(rng.randint(1, 3))})}
    if kind == "word":
        return {"S": rng.choice(_WORDS)}
    if kind == "phrase":
        return {"S": _word_phrase(rng, rng.randint(2, 8))}
    if kind == "address":
        return {"M": {"street": {"S": f"{rng.randint(1, 300)} {rng.choice(_WORDS).title()} Street"},
                      "city": _value(rng, "city"), "zip": {"S": f"{rng.randint(10000, 99999)}"},
                      "geo": {"M": {"lat": {"N": f"{rng.uniform(-90, 90):.6f}".rstrip("0")},
                                    "lon": {"N": f"{rng.uniform(-180, 180):.6f}".rstrip("0")}}}}}
    if kind == "lines":
        return {"L": [{"M": {"sku": {"S": rng.randbytes(4).hex()}, "qty": {"N": str(rng.randint(1, 9))},
                             "price": {"N": _num_text(rng, "price")},
                             "options": {"SS": sorted({rng.choice(_WORDS) for _ in range(rng.randint(1, 3))})}}}
                      for _ in range(rng.randint(1, 4))]}
    if kind == "history":
        return {"L": [{"M": {"at": {"S": _ts(rng)}, "status": {"S": rng.choice(_STATUSES)}}}
                      for _ in range(rng.randint(1, 3))]}
    if kind == "map":
        return {"M": {rng.choice(_WORDS): _scalar(rng) for _ in range(rng.randint(2, 6))}}
    if kind == "nested":
        return {"M": {rng.choice(_WORDS) + str(i): _nested(rng, 3) for i in range(rng.randint(2, 4))}}
    if kind == "list":
        return {"L": [_scalar(rng) for _ in range(rng.randint(1, 6))]}
    if kind == "nestedlist":
        return {"L": [{"L": [{"N": str(rng.randint(-99, 99))} for _ in range(rng.randint(1, 4))]}
                      for _ in range(rng.randint(1, 3))]}
    raise ValueError(kind)


_KINDS = dict(_SCHEMA)


def image_size(image: dict[str, Any]) -> int:
    """Bytes of the image's compact wire JSON."""
    return len(orjson.dumps(image))


def _fill(image: dict[str, Any], target: int, rng: random.Random) -> bool:
    """Set ``notes`` so the image's JSON is exactly ``target`` bytes; False (and no ``notes``) if
    the image is already too big for that."""
    image["notes"] = {"S": ""}
    room = target - image_size(image)
    if room < 0:
        del image["notes"]
        return False
    text = ""
    while len(text) < room:
        text += rng.choice(_WORDS) + " "
    image["notes"] = {"S": text[:room]}
    return True


def _fit(image: dict[str, Any], target: int, rng: random.Random, *, protected: Sequence[str],
         prefer_drop: bool) -> None:
    """Make the image exactly ``target`` bytes (within 1–4 KB) with ``notes``: if it is too big,
    drop optional attributes (``prefer_drop``, never below 10 attributes) or raise the target."""
    while not _fill(image, target, rng):
        droppable = [n for n in image if n not in protected]
        need = image_size(image) + 32  # room for the notes attribute
        if droppable and len(image) > 10 and (prefer_drop or need > MAX_IMAGE_BYTES):
            del image[droppable[-1]]
        elif need <= MAX_IMAGE_BYTES:
            target = max(target, need)
        else:
            raise AssertionError("an image cannot be fitted into 4 KB")  # not reached with _SCHEMA's sizes


def draw_image_size(rng: random.Random) -> int:
    """1,024–4,096 bytes, skewed to the small end (mean ≈ 1.6 KB)."""
    return MIN_IMAGE_BYTES + int((MAX_IMAGE_BYTES - MIN_IMAGE_BYTES) * rng.random() ** 4)


def make_image(rng: random.Random, keys: dict[str, Any], target: int | None = None) -> dict[str, Any]:
    """One item image (wire JSON) with ``keys``; 10–40 attributes; exactly ``target`` bytes."""
    target = draw_image_size(rng) if target is None else target
    count = rng.randint(10, 40)
    forced = [rng.choice(_FORCED[group]) for group in ("map", "list", "set", "bin")]
    others = [name for name in _OPTIONAL if name not in forced]
    rng.shuffle(others)
    names = forced + others[:max(0, count - len(keys) - len(forced) - 1)]  # − 1: the notes attribute
    image = dict(keys)
    for name in names:
        image[name] = _value(rng, _KINDS[name])
    _fit(image, target, rng, protected=[*keys, *forced], prefer_drop=True)
    return image


def _modified(rng: random.Random, old: dict[str, Any]) -> dict[str, Any]:
    """A MODIFY's new image: ``old`` with 1–3 attributes changed (status, updatedAt, version, …)."""
    new = dict(old)
    candidates = [n for n in new if n not in ("pk", "sk", "notes")]
    for name in rng.sample(candidates, min(len(candidates), rng.randint(1, 3))):
        new[name] = _value(rng, _KINDS[name])
    target = max(MIN_IMAGE_BYTES, min(MAX_IMAGE_BYTES, image_size(old) + rng.randint(-64, 64)))
    new.pop("notes", None)
    _fit(new, target, rng, protected=[n for n in old if n in ("pk", "sk") or n in _FORCED_NAMES], prefer_drop=False)
    return new


def sequence_number(shard_no: int, index: int) -> str:
    """21-digit sequence numbers, increasing along a shard, disjoint between shards."""
    return f"{(shard_no + 1) * 10 ** 17 + index * 100:021d}"


STREAM_LABEL = "2026-01-01T00:00:00.000"


def stream_arn(table: str) -> str:
    return f"arn:aws:dynamodb:{REGION}:123456789012:table/{table}/stream/{STREAM_LABEL}"


def shard_id(shard_no: int) -> str:
    return f"shardId-00000001767225600000-{shard_no:08x}"


def iterator_token(shard: str, position: int) -> str:
    """An opaque-looking shard iterator (real ones are ~250 characters) naming (shard, position)."""
    return f"{shard}|{position}|" + "AAAAAAAAAAGVvZ2xlLWJlbmNobWFyay1pdGVyYXRvci10b2tlbi1wYWRkaW5n" * 3


def parse_token(token: str) -> tuple[str, int]:
    shard, position, _ = token.split("|", 2)
    return shard, int(position)


def make_records(n: int, *, seed: int = SEED, shard_no: int = 0, start_index: int = 0,
                 start_time: float = 1_767_225_600.0) -> list[dict[str, Any]]:
    """``n`` NEW_AND_OLD_IMAGES stream records in the wire (raw JSON) shape; deterministic."""
    rng = random.Random(f"{seed}/{shard_no}/{start_index}")
    records = []
    for j in range(n):
        i = start_index + j
        keys = {"pk": {"S": f"tenant-{rng.randint(1, 50):04d}#order-{rng.randbytes(6).hex()}"},
                "sk": {"N": str(rng.randint(1, 10 ** 6))}}
        pick = rng.random()
        if pick < 0.5:
            name, old = "MODIFY", make_image(rng, keys)
            new = _modified(rng, old)
        elif pick < 0.9:
            name, old, new = "INSERT", None, make_image(rng, keys)
        else:
            name, old, new = "REMOVE", make_image(rng, keys), None
        records.append(_record(name, keys, old, new, shard_no=shard_no, index=i, created=start_time + i / 1000.0,
                               ttl=name == "REMOVE" and rng.random() < 0.25, event_id=rng.randbytes(16).hex()))
    return records


def _record(name: str, keys: dict, old: dict | None, new: dict | None, *, shard_no: int, index: int,
            created: float, ttl: bool, event_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"ApproximateCreationDateTime": float(int(created)), "Keys": keys}
    if new is not None:
        body["NewImage"] = new
    if old is not None:
        body["OldImage"] = old
    # SizeBytes: DynamoDB counts names and values, not the JSON around them; roughly 60 % of the wire size
    size = (image_size(new) if new else 0) + (image_size(old) if old else 0) + image_size(keys)
    body.update({"SequenceNumber": sequence_number(shard_no, index), "SizeBytes": int(size * 0.6),
                 "StreamViewType": "NEW_AND_OLD_IMAGES"})
    record: dict[str, Any] = {"awsRegion": REGION, "dynamodb": body, "eventID": event_id, "eventName": name,
                              "eventSource": "aws:dynamodb", "eventVersion": "1.1"}
    if ttl:
        record["userIdentity"] = {"PrincipalId": "dynamodb.amazonaws.com", "Type": "Service"}
    return record


def restamp(record: dict[str, Any], *, shard_no: int, index: int, created: float, copy_no: int) -> dict[str, Any]:
    """A copy of a pool record as a different change: its own key, sequence number, eventID, time.

    Shallow copies only (the images' other attribute values are shared, which serialising does
    not care about)."""
    body = record["dynamodb"]
    pk = {"S": f"{body['Keys']['pk']['S']}~{copy_no}"}
    keys = {"pk": pk, "sk": body["Keys"]["sk"]}
    new_body = dict(body, Keys=keys, SequenceNumber=sequence_number(shard_no, index),
                    ApproximateCreationDateTime=float(int(created)))
    for image in ("NewImage", "OldImage"):
        if image in body:
            new_body[image] = dict(body[image], pk=pk)
    return dict(record, dynamodb=new_body, eventID=f"{copy_no:08x}{record['eventID'][8:]}")


@dataclass
class RecordedShard:
    """A closed shard's GetRecords response bodies, in order (the last without NextShardIterator)."""

    shard_id: str
    bodies: list[bytes]
    records: int
    first_sequence_number: str
    last_sequence_number: str


@dataclass
class RecordedStream:
    table: str
    stream_arn: str
    shards: list[RecordedShard] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def body_bytes(self) -> int:
        return sum(len(b) for s in self.shards for b in s.bodies)


_POOLS: dict[tuple[int, int], list[dict[str, Any]]] = {}


def record_pool(size: int, seed: int = SEED) -> list[dict[str, Any]]:
    """``size`` distinct generated records (cached per process)."""
    key = (size, seed)
    if key not in _POOLS:
        _POOLS[key] = make_records(size, seed=seed)
    return _POOLS[key]


def release_pool() -> None:
    """Drop the cached pools: a benchmark must not hold millions of parsed objects, which would make
    every full garbage collection (and so every parse) slower than in a real worker."""
    _POOLS.clear()
    import gc

    gc.collect()


def recorded_stream(table: str, *, shards: int, records_per_shard: int, pool_size: int = 5000,
                    seed: int = SEED, page_size: int = RECORDS_PER_PAGE) -> RecordedStream:
    """A stream of closed shards recorded as GetRecords response bodies (see module doc)."""
    pool = record_pool(pool_size, seed)
    stream = RecordedStream(table=table, stream_arn=stream_arn(table))
    copies = itertools.count()
    for shard_no in range(shards):
        sid = shard_id(shard_no)
        bodies = []
        offset = shard_no * records_per_shard  # shards start at different places in the pool
        for page_no, start in enumerate(range(0, records_per_shard, page_size)):
            page = []
            for index in range(start, min(start + page_size, records_per_shard)):
                k = offset + index
                record = pool[k % pool_size]
                if k >= pool_size:  # a cycled copy: make it a different change
                    record = restamp(record, shard_no=shard_no, index=index, created=1_767_225_600.0 + index / 1000.0,
                                     copy_no=next(copies) + 1)
                else:
                    record = restamp(record, shard_no=shard_no, index=index, created=1_767_225_600.0 + index / 1000.0,
                                     copy_no=0) if shard_no else record
                page.append(record)
            response: dict[str, Any] = {"Records": page}
            if start + page_size < records_per_shard:
                response["NextShardIterator"] = iterator_token(sid, page_no + 1)
            bodies.append(orjson.dumps(response))
        stream.shards.append(RecordedShard(sid, bodies, records_per_shard, sequence_number(shard_no, 0),
                                           sequence_number(shard_no, records_per_shard - 1)))
    return stream


def decode_bodies(pages: int, *, seed: int = SEED) -> list[bytes]:
    """``pages`` GetRecords bodies of 1,000 distinct records each (all with NextShardIterator)."""
    pool = record_pool(max(5000, pages * RECORDS_PER_PAGE), seed)
    return [orjson.dumps({"Records": pool[p * RECORDS_PER_PAGE:(p + 1) * RECORDS_PER_PAGE],
                          "NextShardIterator": iterator_token(shard_id(0), p + 1)}) for p in range(pages)]


# -- the HTTP-boundary double ---------------------------------------------------------------------


class _Raw:
    """What botocore reads an HTTP response body from (``AWSResponse.raw.stream()``)."""

    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_: Any):
        yield self._body


class LiveShard:
    """An open shard whose records appear at ``rate`` per second while :attr:`flowing` (for the
    memory run): pages are built on demand from a pool of records, nothing is retained."""

    def __init__(self, shard_no: int, pool: Sequence[dict[str, Any]], rate: float):
        self.shard_no = shard_no
        self.shard_id = shard_id(shard_no)
        self.pool = pool
        self.rate = rate
        self._lock = threading.Lock()
        self._base = 0  # records made available before the current flowing period
        self._since: float | None = None
        self.served = 0

    def set_flowing(self, flowing: bool) -> None:
        with self._lock:
            now = time.monotonic()
            if flowing and self._since is None:
                self._since = now
            elif not flowing and self._since is not None:
                self._base += int(self.rate * (now - self._since))
                self._since = None

    def add_backlog(self, records: int) -> None:
        """Make ``records`` more records available at once (a shard that fell behind)."""
        with self._lock:
            self._base += records

    def available(self) -> int:
        with self._lock:
            extra = int(self.rate * (time.monotonic() - self._since)) if self._since is not None else 0
            return self._base + extra

    def page(self, position: int, limit: int) -> bytes:
        end = min(self.available(), position + limit)
        records = [restamp(self.pool[(self.shard_no * 7919 + i) % len(self.pool)], shard_no=self.shard_no, index=i,
                           created=time.time(), copy_no=i + 1) for i in range(position, end)]
        self.served += len(records)
        return orjson.dumps({"Records": records, "NextShardIterator": iterator_token(self.shard_id, end)})


class StreamsHTTPDouble:
    """Answers a real botocore ``dynamodbstreams`` client's DescribeStream, GetShardIterator and
    GetRecords from memory (``before-send`` handler; see module doc). ``recorded``: closed shards
    of recorded bodies; ``live``: open :class:`LiveShard` s."""

    def __init__(self, arn: str, *, recorded: RecordedStream | None = None, live: Sequence[LiveShard] = ()):
        self.stream_arn = arn
        self.recorded = {s.shard_id: s for s in (recorded.shards if recorded else [])}
        self.live = {s.shard_id: s for s in live}
        self.calls: dict[str, int] = {}

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.dynamodb-streams", self._on_send,
                                    unique_id=f"bench-double-{id(self)}")
        return client

    def _on_send(self, request: Any, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse, HeadersDict

        target = request.headers.get("X-Amz-Target", b"")
        target = target.decode() if isinstance(target, bytes) else target
        operation = target.rsplit(".", 1)[-1]
        self.calls[operation] = self.calls.get(operation, 0) + 1
        params = orjson.loads(request.body or b"{}")
        status, body = getattr(self, f"_{operation}")(params)
        headers = HeadersDict({"Content-Type": "application/x-amz-json-1.0", "Content-Length": str(len(body)),
                               "x-amzn-RequestId": "BENCHMARK0000000000000000000000000000000000000000000000"})
        return AWSResponse(request.url, status, headers, _Raw(body))

    @staticmethod
    def _error(code: str, message: str) -> tuple[int, bytes]:
        return 400, orjson.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message})

    def _DescribeStream(self, params: dict[str, Any]) -> tuple[int, bytes]:
        shards = []
        for s in self.recorded.values():
            shards.append({"ShardId": s.shard_id, "SequenceNumberRange": {
                "StartingSequenceNumber": s.first_sequence_number, "EndingSequenceNumber": s.last_sequence_number}})
        for s in self.live.values():
            shards.append({"ShardId": s.shard_id,
                           "SequenceNumberRange": {"StartingSequenceNumber": sequence_number(s.shard_no, 0)}})
        start = 0
        if params.get("ExclusiveStartShardId"):
            start = [s["ShardId"] for s in shards].index(params["ExclusiveStartShardId"]) + 1
        limit = min(params.get("Limit") or 100, 100)
        page = shards[start:start + limit]
        table = self.stream_arn.split(":table/", 1)[1].split("/", 1)[0]
        desc: dict[str, Any] = {"StreamArn": self.stream_arn, "StreamLabel": STREAM_LABEL, "StreamStatus": "ENABLED",
                                "StreamViewType": "NEW_AND_OLD_IMAGES", "CreationRequestDateTime": 1_767_225_600.0,
                                "TableName": table, "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"},
                                                                  {"AttributeName": "sk", "KeyType": "RANGE"}],
                                "Shards": page}
        if start + limit < len(shards):
            desc["LastEvaluatedShardId"] = page[-1]["ShardId"]
        return 200, orjson.dumps({"StreamDescription": desc})

    def _GetShardIterator(self, params: dict[str, Any]) -> tuple[int, bytes]:
        sid, kind = params.get("ShardId"), params.get("ShardIteratorType")
        if sid in self.recorded and kind == "TRIM_HORIZON":
            return 200, orjson.dumps({"ShardIterator": iterator_token(sid, 0)})
        if sid in self.live and kind in ("TRIM_HORIZON", "LATEST"):
            position = 0 if kind == "TRIM_HORIZON" else self.live[sid].available()
            return 200, orjson.dumps({"ShardIterator": iterator_token(sid, position)})
        return self._error("ValidationException", f"the benchmark double does not serve {kind} for {sid}")

    def _GetRecords(self, params: dict[str, Any]) -> tuple[int, bytes]:
        sid, position = parse_token(params["ShardIterator"])
        if sid in self.recorded:
            return 200, self.recorded[sid].bodies[position]
        if sid in self.live:
            return 200, self.live[sid].page(position, int(params.get("Limit") or 1000))
        return self._error("ResourceNotFoundException", f"Requested resource not found: Shard: {sid}")


def bench_aws_config(table: str = "bench") -> Any:
    """An AwsConfig with static dummy credentials and an endpoint that is never dialled."""
    from pipeline.awsconfig import AwsConfig

    return AwsConfig(region=REGION, endpoint_url="https://streams.benchmark.invalid",
                     access_key_id="AKIABENCHMARK", secret_access_key="benchmark-secret")


def make_source(double: StreamsHTTPDouble, *, read_path: str = "fast") -> Any:
    """A real DynamoDBStreamSource over a real botocore client answered by ``double``."""
    from connectors.aws import make_client
    from connectors.dynamodb_streams.source import DynamoDBStreamSource

    aws = bench_aws_config()
    client = double.attach(make_client("dynamodbstreams", aws, max_pool_connections=50))
    try:
        return DynamoDBStreamSource(aws, stream_arn=double.stream_arn, streams=client, read_path=read_path)
    except TypeError:  # a DynamoDBStreamSource without read paths: the boto3 path only
        if read_path != "boto3":
            raise RuntimeError("DynamoDBStreamSource has no read_path (fast path missing)") from None
        return DynamoDBStreamSource(aws, stream_arn=double.stream_arn, streams=client)
