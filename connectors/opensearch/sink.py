"""OpenSearch sink: one document per DynamoDB item, written with bulk index/delete and external versioning.

What it writes
--------------
- INSERT / MODIFY / SNAPSHOT → a bulk ``index`` action whose ``_source`` is the new image
  (``event.after``) in :mod:`pipeline.render`'s *plain* rendering (numbers exact and never
  converted through float: 64-bit integers as JSON integers, float-exact decimals as JSON numbers,
  anything else — e.g. a 38-digit number — as a JSON string; binary as base64; sets as sorted
  arrays; an integer beyond 64 bits is first put in exponent form, so ``1E+37``, which DynamoDB
  returns as ``10000…0``, becomes the JSON number ``1E+37`` and not an integer literal OpenSearch
  would refuse as a ``long``), with attribute names escaped and over-deep values flattened as described below, plus
  a ``_cdc`` object::

      "_cdc": {"sequence_number": "4000…" (string), "shard_id": "shardId-…", "stream_arn": "arn:…",
               "table": "Orders", "event_time": "2024-05-01T12:00:00Z" (ISO 8601 UTC, the record's
               ApproximateCreationDateTime) | null, "operation": "INSERT" | "MODIFY" | "SNAPSHOT",
               "version": 123 (the external version)}

  (plus ``"image": "keys_only"`` for a keys-only document, below). An item attribute named
  ``_cdc`` is kept, escaped as ``_ddb_cdc``.
- REMOVE → a bulk ``delete`` action (it needs only the keys, so it works with every view type).
- Index name: ``Options.index`` with ``{table}`` replaced by the table name, then lower-cased.
  It is an alias: documents live in its versions ``{name}-v{N}``, created from the index template
  ``ddb-cdc-{name}`` (:mod:`connectors.opensearch.indices`); index actions carry
  ``require_alias`` so a bare index is never auto-created.
- Mapping modes (``Options.mapping``: ``typed`` | ``explicit`` | ``dynamic``) decide the shape of
  ``_source`` and the mappings (:mod:`connectors.opensearch.mapping`); the *plain* rendering
  below is the ``explicit`` / ``dynamic`` one, ``typed`` writes DynamoDB AttributeValue JSON.
- ``_id``: ``event.key_id`` (see :func:`pipeline.codec.key_id`). OpenSearch refuses ids longer
  than 512 bytes, so a key id whose UTF-8 encoding is longer than 512 bytes is replaced by
  ``"sha256:" + hex SHA-256 of its UTF-8 bytes`` (71 characters); see :func:`document_id`.

Streams without new images (KEYS_ONLY, OLD_IMAGE)
-------------------------------------------------
An INSERT / MODIFY whose record says its stream view type is ``KEYS_ONLY`` or ``OLD_IMAGE`` has
no new image by design. It is indexed as a *keys-only document*: the key attributes (rendered and
escaped like an image) plus ``_cdc`` with ``"image": "keys_only"``. So the index still lists
exactly the items that exist (REMOVE deletes them), every change is versioned as usual, and the
worker never stops; search by content needs ``NEW_IMAGE`` or ``NEW_AND_OLD_IMAGES``. (Documents
built from a new image carry no ``image`` field.) An INSERT / MODIFY *without* a new image whose
view type promises one (``NEW_IMAGE``, ``NEW_AND_OLD_IMAGES``, or none given) is a malformed record:
it is a per-event permanent failure (dead-lettered, reason "stream has no new image: use
NEW_IMAGE or NEW_AND_OLD_IMAGES …"), never a fatal error.

Attribute names (a reversible escaping)
---------------------------------------
OpenSearch refuses some names inside ``_source``: its metadata fields at the top level
(``_id``, ``_source``, ``_index``, … — :data:`RESERVED_FIELD_NAMES`; nested, they are ordinary
names), and at any level the empty name and names made only of dots; it expands a dotted name
``a.b`` into the object path ``a`` → ``b``, which collides with an attribute ``a`` holding a
scalar (``mapper_parsing_exception``) and adds mapping depth. DynamoDB allows all of these, so
names are escaped, at every level of maps (also maps inside lists), by this rule:

- a name is escaped when it is empty or whitespace-only, contains ``.``, starts with ``_dd``, or
  — at the top level only — is one of :data:`RESERVED_FIELD_NAMES` (which includes ``_cdc``);
- the escaped name is ``_ddb`` + the name with ``%`` written ``%25`` and ``.`` written ``%2E``:
  ``_id`` → ``_ddb_id``, ``_source`` → ``_ddb_source``, ``a.b`` → ``_ddba%2Eb``, ``""`` →
  ``_ddb``, ``_ddbx`` → ``_ddb_ddbx``;
- every other name (unicode and emoji included) is used as it is.

Names starting with ``_dd`` are always escaped, so the rule is reversible: a name starting with
``_ddb`` is an escaped name (drop ``_ddb``, then ``%2E`` → ``.`` and ``%25`` → ``%``); any other
name is the attribute's own. :func:`unescape_field_name` / :func:`restore_document` undo it.

Depth (``depth_limit``, default 20)
-----------------------------------
OpenSearch rejects a document whose fields are nested deeper than ``index.mapping.depth.limit``
(20 by default; a top-level field has depth 1, a field of a map attribute depth 2, …), while
DynamoDB allows 32 levels. So that every item stays indexable, a map that would hold fields deeper
than ``Options.depth_limit`` — and a list holding such maps — is stored as one JSON *string*: the
plain rendering of that value (with its own attribute names unescaped), under the name ``_ddj`` +
the attribute name percent-escaped as above (``deep`` → ``_ddjdeep``). ``_ddj`` marks it, so
:func:`restore_document` parses it back. Set ``depth_limit`` to the index's
``index.mapping.depth.limit`` if you changed it.

Ordering and idempotency
------------------------
Every action carries ``version=event.version, version_type="external"`` (``external_gte`` with
``Options.version_type`` or a repair replay). The version is
:func:`pipeline.codec.record_version` (time part lifted by the shard's lineage floor, low part the
sequence number's record counter), which increases along the successive changes of one item —
across shard splits too — and is computed from the record and its shard's lease, so it is the
same after restarts, lease hand-offs and replays. OpenSearch applies an external-versioned write
only when its version is *higher* than the
stored one and answers 409 ``version_conflict_engine_exception`` otherwise; this sink counts that
409 as success. Hence:

- an older change never overwrites a newer one (a stale or replayed INSERT/MODIFY is ignored);
- the same event delivered twice gives the same end state (the second write is a 409 no-op);
- a delete of a document that is not there (404 ``not_found``) counts as success.

Deletes, tombstones and replays
-------------------------------
After a delete with external version V, OpenSearch remembers V (a tombstone) for
``index.gc_deletes`` (default 60 s: "the length of time for which a deleted document's version
remains available" — Elasticsearch reference, Delete API, "Versioning"; OpenSearch inherits the
setting). While it remembers, an older INSERT/MODIFY of that item is a 409; afterwards the older
write finds nothing and re-creates ("resurrects") the document. In live delivery changes of one
item arrive in order, so this only matters for writes that arrive late: replays, redriven dead
letters, the reindex fill. What the sink does about it (:meth:`OpenSearchSink.prepare_replay`,
called by ``ddb-cdc replay`` and the reindex fill):

- raises ``index.gc_deletes`` (default ``12h``) on every index the replay writes to while it
  runs and puts the old value back when it closes — so a delete the live worker writes during
  the replay outlives the replay's older writes of that item;
- leaves out events of items that changed after a windowed replay's ``--until`` (their later
  change — possibly a delete whose tombstone is long gone — is already in the index);
- with ``repair``, writes with ``version_type: external_gte`` so replaying the same change
  rewrites its document (``external`` makes that a 409 no-op).

Tested against osmem-server, which honours ``index.gc_deletes`` per index (a test sets it to 1 s).

Errors
------
Per item (the bulk response): 409 version conflict and delete 404 → success; 429 and 5xx →
retriable (re-sent by this sink up to ``max_retries`` times with backoff, then reported);
any other 4xx (``mapper_parsing_exception``, e.g. an attribute whose type differs from earlier
documents, invalid index name, …) → permanent. An event that cannot be built into an action (no
new image although the view type promises one, not renderable) → permanent. Failed items are
reported together as one :class:`pipeline.errors.PartialSinkError` listing only the failed events.
Whole request: connection errors, timeouts, 429 and 5xx → :class:`~pipeline.errors.RetriableSinkError`;
401/403 → :class:`~pipeline.errors.FatalSinkError` (check credentials); 413 → FatalSinkError (lower
``max_bulk_bytes``); a 400 for a whole request (e.g. OpenSearch's request validation) makes the
sink re-send that request's actions one by one, so only the offending events become permanent.

``write`` sends immediately (a bulk request that OpenSearch acknowledged is durable in its
translog), so ``flush`` has nothing to do.

Bulk requests in flight (``max_bulk_in_flight``, default 4): the chunks of one ``write`` are sent
over up to that many connections at once (a thread pool of the sink). OpenSearch may then apply
two versions of one document in either order; with external versioning that does not matter:
a write applies only with a version higher than the stored one (a delete's version is kept as a
tombstone for ``index.gc_deletes``), so the document ends at its highest version whatever the
order — "the document is indexed only if the given version is strictly higher than the version
of the stored document" (OpenSearch documentation, Index document API, version_type external).
The sink's thread waits for every request of the write before it returns, so a ``write`` still
returns only when every event is applied.
"""

from __future__ import annotations

import logging
import random
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from decimal import Context, Decimal
from typing import Annotated, Any, Iterator, Literal, Mapping, Sequence
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connectors.opensearch.mapping import (OVERFLOW_FIELD, MappingSpec, is_field_limit_error, restore_typed, typed_item_from_av,
                                           typed_json_keeps_names)
from connectors.opensearch.names import (  # noqa: F401 (also this module's public names)
    ESCAPE_PREFIX,
    FLATTEN_PREFIX,
    MALFORMED_PREFIX,
    MAX_ID_BYTES,
    RESERVED_FIELD_NAMES,
    _RESERVED_PREFIX,
    document_id,
    escape_field_name,
    percent_escape,
    percent_unescape,
    unescape_field_name,
)
from pipeline.errors import FatalSinkError, PartialSinkError, RetriableSinkError
from pipeline.events import Batch, ChangeEvent, Operation
from pipeline.redact import redact_url
from pipeline.render import plain_json_bytes
from pipeline.sink import Sink, SinkContext, SinkOptions

__all__ = [
    "OpenSearchSink",
    "OpenSearchOptions",
    "NoAuth",
    "BasicAuth",
    "AwsSigV4Auth",
    "document_id",
    "MAX_ID_BYTES",
    "RESERVED_FIELD_NAMES",
    "escape_field_name",
    "unescape_field_name",
    "restore_document",
]

_MIB = 1024 * 1024
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_INVALID_INDEX_CHARS = set(' "*\\<|,>/?#:')
_MAX_BACKOFF_S = 10.0


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


class NoAuth(BaseModel):
    """No authentication (``{"type": "none"}``), e.g. a local cluster or one behind a proxy."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["none"] = "none"


class BasicAuth(BaseModel):
    """HTTP basic authentication: ``{"type": "basic", "username": "...", "password": "..."}``."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: SecretStr

    @field_validator("password")
    @classmethod
    def _password_not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("password must not be empty")
        return value


class AwsSigV4Auth(BaseModel):
    """AWS Signature V4 (Amazon OpenSearch Service ``es`` or Serverless ``aoss``).

    ``{"type": "aws_sigv4", "region": "eu-west-1", "service": "es"}``. Credentials come from a
    boto3 session: the worker's AWS settings (``SinkContext.aws``: profile, static keys) when
    given, else botocore's default chain (environment, profile, container or instance role);
    they are refreshed by botocore as they expire. ``region`` falls back to the worker's AWS
    region, then the session's.
    """

    model_config = ConfigDict(extra="forbid")
    type: Literal["aws_sigv4"]
    region: str | None = Field(default=None, min_length=1)
    service: Literal["es", "aoss"] = "es"


Auth = Annotated[NoAuth | BasicAuth | AwsSigV4Auth, Field(discriminator="type")]


class OpenSearchOptions(SinkOptions):
    """Options of the ``opensearch`` sink.

    - ``hosts``: one or more ``http(s)://host[:port]`` URLs (required, non-empty).
    - ``index``: index name template; ``{table}`` is the DynamoDB table name; the result is
      lower-cased. Default ``"{table}"``.
    - ``auth``: ``{"type": "none"}`` (default) | ``{"type": "basic", "username", "password"}`` |
      ``{"type": "aws_sigv4", "region", "service": "es" | "aoss"}``.
    - ``verify_certs`` (default True) / ``ca_certs`` (path to a PEM bundle, default None = system).
    - ``timeout_s``: per-request timeout in seconds (default 30).
    - ``max_bulk_docs`` (default 500) / ``max_bulk_bytes`` (default 5 MiB): bounds of one bulk
      request (action + source lines). A single action larger than ``max_bulk_bytes`` is sent alone.
    - ``max_bulk_in_flight`` (default 4, 1–64): bulk requests of one write sent at once (module
      doc: external versions make their order irrelevant). 1 sends them one after another.
    - ``refresh``: ask for a refresh after each bulk request (default False; tests set True —
      it is expensive on a real cluster).
    - ``max_retries``: how many times retriable items (429, 5xx) are re-sent inside one ``write``
      before they are reported as retriable in a PartialSinkError; also the client's retries of a
      whole request on connection errors, timeouts and 502/503/504 (default 3).
    - ``retry_backoff_s``: first backoff between item retries in seconds, doubled each time with
      jitter, at most 10 s (default 0.5).
    - ``depth_limit``: the index's ``index.mapping.depth.limit`` (default 20, OpenSearch's
      default); values whose fields would be nested deeper are stored as JSON strings (module doc).
    - ``mapping``: ``dynamic`` | ``explicit`` | ``typed`` (:mod:`connectors.opensearch.mapping`);
      default ``explicit`` when ``fields`` are declared, otherwise ``typed``.
    - ``fields``: explicit mode's indexed fields, dotted attribute path → type name or
      ``{type: ..., <mapping parameters>}`` (types: keyword, text, long, integer, short, byte,
      double, float, boolean, date, flat_object, binary, ip).
    - ``total_fields_limit``: ``index.mapping.total_fields.limit`` set by the index template
      (default 1000, OpenSearch's default).
    - ``index_settings``: more index settings for the template (e.g. ``{"index.number_of_shards": 3}``).
    - ``reindex_check_s``: how often, in seconds, the sink re-reads its template for a reindex in
      progress (then it writes to the old and the new version; default 5).
    - ``version_type``: ``external`` (default: a write applies only with a version *higher* than
      the stored one, so a repeated change is a 409 no-op) or ``external_gte`` (equal or higher:
      a repeated change is written again, so re-delivering a change repairs a document that a bad
      deploy rendered wrong; older changes are still refused). ``ddb-cdc replay --repair`` uses
      ``external_gte`` for one replay without changing the configuration.
    """

    # Inputs may hold passwords (auth, user:password@ in a host URL): keep them out of messages.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    hosts: list[str] = Field(min_length=1)
    index: str = "{table}"
    auth: Auth = Field(default_factory=NoAuth)
    verify_certs: bool = True
    ca_certs: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    max_bulk_docs: int = Field(default=500, ge=1)
    max_bulk_bytes: int = Field(default=5 * _MIB, ge=1)
    max_bulk_in_flight: int = Field(default=4, ge=1, le=64)
    refresh: bool = False
    max_retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    depth_limit: int = Field(default=20, ge=2)
    mapping: Literal["dynamic", "explicit", "typed"] | None = None
    fields: dict[str, Any] = Field(default_factory=dict)
    total_fields_limit: int = Field(default=1000, ge=10)
    index_settings: dict[str, Any] = Field(default_factory=dict)
    reindex_check_s: float = Field(default=5.0, gt=0)
    version_type: Literal["external", "external_gte"] = "external"

    @model_validator(mode="after")
    def _check_mapping(self) -> "OpenSearchOptions":
        self.spec()  # raises MappingSpecError (a ValueError) with the field's name
        return self

    def spec(self) -> MappingSpec:
        """The :class:`~connectors.opensearch.mapping.MappingSpec` these options ask for new index versions."""
        return MappingSpec.build(self.mapping, self.fields, total_fields_limit=self.total_fields_limit,
                                 depth_limit=self.depth_limit)

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, hosts: list[str]) -> list[str]:
        for i, host in enumerate(hosts):
            parts = urlsplit(host) if isinstance(host, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"hosts[{i}] {redact_url(str(host))!r} is not an http(s) URL like https://search.example.com:443"
                )
            try:
                parts.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                raise ValueError(f"hosts[{i}] {redact_url(host)!r} has an invalid port") from None
        return hosts

    @field_validator("index")
    @classmethod
    def _check_index(cls, template: str) -> str:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as exc:
            raise ValueError(f"index template {template!r} is malformed ({exc})") from None
        unknown = sorted({f for f in fields if f != "table"})
        if unknown:
            raise ValueError(f"index template {template!r} uses unknown placeholder(s) {unknown}; only {{table}} is allowed")
        problem = index_name_problem(template.format(table="table").lower())
        if problem:
            raise ValueError(f"index template {template!r} gives an invalid index name: {problem}")
        return template


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def restore_document(source: Any) -> Any:
    """The item a document's ``_source`` holds: escaping and flattening undone, ``_cdc`` left out.

    Names are unescaped at every level; ``_ddj`` values are parsed back from their JSON text
    (non-integer numbers as :class:`decimal.Decimal`). The sink's top-level ``_cdc`` object is not
    part of the item and is dropped (an item attribute named ``_cdc`` comes back from
    ``_ddb_cdc``). Explicit mode's moved-aside ``_ddm`` values come back under their names, and a
    typed-mode document (``_cdc.mapping == "typed"``) is decoded from its AttributeValue JSON. The
    result is the item in the plain rendering (numbers, base64 binary, sets as lists).
    """
    if isinstance(source, dict):
        cdc = source.get("_cdc")
        if isinstance(cdc, dict) and cdc.get("mapping") == "typed":
            from pipeline.render import to_plain

            return to_plain(restore_typed(source))
        return _restore_map(source, top_level=True)
    return _restore_value(source)


def _restore_map(source: Mapping[str, Any], *, top_level: bool) -> dict[str, Any]:
    import json
    from decimal import Decimal

    out: dict[str, Any] = {}
    for name, value in source.items():
        if top_level and name == "_cdc":
            continue
        if name.startswith(FLATTEN_PREFIX):
            text = value if isinstance(value, str) else str(value)
            out[unescape_field_name(name)] = json.loads(text, parse_float=Decimal)
        else:
            out[unescape_field_name(name)] = _restore_value(value)
    return out


def _restore_value(value: Any) -> Any:
    if isinstance(value, dict):
        return _restore_map(value, top_level=False)
    if isinstance(value, list):
        return [_restore_value(v) for v in value]
    return value


def _needs_flattening(value: Any, depth: int, limit: int) -> bool:
    """Would ``value``, held by a field at ``depth``, itself hold fields deeper than ``limit``?

    A map holds fields at ``depth + 1``; a list adds no depth, so it needs flattening when one of
    its members (or members of lists inside it) does.
    """
    if isinstance(value, Mapping):
        return depth + 1 > limit  # deeper maps inside are flattened at their own level
    if isinstance(value, list):
        return any(_needs_flattening(v, depth, limit) for v in value)
    return False


def _big_integer(value: Decimal) -> Decimal:
    """An integer beyond the signed 64-bit range in exponent form (``1E+37``), same value.

    DynamoDB returns ``1E+37`` as the 38-digit text ``10000…0``; rendered as that JSON integer
    literal, OpenSearch maps the field as ``long`` and refuses it (out of range). In exponent form
    the plain rendering gives the JSON number ``1E+37`` (a ``float`` field) when float64 holds it
    exactly, else the exact decimal string — the same rule as for fractions.
    """
    if value.is_finite() and value == value.to_integral_value() and not _INT64_MIN <= value <= _INT64_MAX:
        digits = len(value.as_tuple().digits)
        return value.normalize(Context(prec=max(digits, 1), Emax=999_999, Emin=-999_999))
    return value


def _escape_value(value: Any, depth: int, limit: int) -> Any:
    """``value`` (held by a field at ``depth``) with map names escaped and deep parts flattened."""
    if isinstance(value, Mapping):
        return _escape_map(value, depth + 1, limit, top_level=False)
    if isinstance(value, list):
        return [_escape_value(v, depth, limit) for v in value]
    if isinstance(value, Decimal):
        return _big_integer(value)
    if isinstance(value, (set, frozenset)):
        return {_big_integer(v) if isinstance(v, Decimal) else v for v in value}
    return value


def _escape_map(image: Mapping[str, Any], depth: int, limit: int, *, top_level: bool) -> dict[str, Any]:
    """A map whose fields are at ``depth``: names escaped, over-deep values flattened to JSON text."""
    out: dict[str, Any] = {}
    for name, value in image.items():
        if _needs_flattening(value, depth, limit):
            out[FLATTEN_PREFIX + percent_escape(name)] = plain_json_bytes(value).decode("utf-8")
        else:
            out[escape_field_name(name, top_level=top_level)] = _escape_value(value, depth, limit)
    return out


def index_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid OpenSearch index name (None when it is).

    Rules: non-empty, lower case, at most 255 UTF-8 bytes, none of ``space " * \\ < | , > / ? # :``,
    not starting with ``_``, ``-`` or ``+``, not ``.`` or ``..``.
    """
    if not name:
        return "it is empty"
    if name != name.lower():
        return f"{name!r} is not lower case"
    if len(name.encode("utf-8")) > 255:
        return f"{name[:40]!r}… is longer than 255 bytes"
    bad = sorted(set(name) & _INVALID_INDEX_CHARS)
    if bad:
        return f"{name!r} contains {''.join(bad)!r}"
    if name[0] in "_-+":
        return f"{name!r} starts with {name[0]!r}"
    if name in (".", ".."):
        return f"{name!r} is reserved"
    return None


def _one_line(text: Any, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


@dataclass(slots=True)
class _Action:
    """One bulk action: the event, its NDJSON lines (action + optional source) and their size.

    ``index`` is the target (alias or concrete index); ``spec`` the mapping spec it was rendered
    for; ``overflow`` whether a typed document was put whole under ``_ddo``.
    """

    event: ChangeEvent
    kind: str  # "index" | "delete"
    lines: bytes
    index: str = ""
    spec: MappingSpec | None = None
    overflow: bool = False
    alias: str = ""  # set when ``index`` is the alias (written with require_alias)

    @property
    def size(self) -> int:
        return len(self.lines)


@dataclass(frozen=True)
class ReplayDeletes:
    """What :meth:`OpenSearchSink.prepare_replay` asked for: ``gc_deletes`` (time value or None),
    ``repair`` (external_gte), ``superseded`` ((table, key_id) pairs not to write)."""

    gc_deletes: str | None
    repair: bool
    superseded: frozenset
    tables: tuple = ()


@dataclass
class _Route:
    """Where the documents of one index name go: ``primary`` (the alias, or a pinned index) and,
    while a reindex fills the next version, ``secondary``; each with the spec it renders for."""

    primary: str
    primary_spec: MappingSpec
    secondary: str | None = None
    secondary_spec: MappingSpec | None = None
    checked_at: float = 0.0
    pinned: bool = False
    alias: bool = False  # ``primary`` is the alias (not a pinned or bare index)

    def targets(self) -> list[tuple[str, MappingSpec]]:
        """``(index, spec)`` to write, the reindex target first: right after the alias swap both
        may be the same index, and the first write of a version wins (the second is a 409)."""
        out = [(self.primary, self.primary_spec)]
        if self.secondary and self.secondary_spec is not None and self.secondary != self.primary:
            out.insert(0, (self.secondary, self.secondary_spec))
        return out


# --------------------------------------------------------------------------------------------
# The sink
# --------------------------------------------------------------------------------------------


class OpenSearchSink(Sink):
    """Writes change events to OpenSearch with bulk requests and external versioning.

    ``OpenSearchSink(name, OpenSearchSink.Options(hosts=["https://..."]))``; see the module
    docstring for the document shape, ids, versioning and error mapping, and
    :mod:`connectors.opensearch.mapping` / :mod:`connectors.opensearch.indices` for the mapping
    modes, the index template and the alias. ``client`` is the ``opensearchpy.OpenSearch``
    client once :meth:`open` has run (None before and after :meth:`close`).
    """

    Options = OpenSearchOptions

    @property
    def renders_wire_form(self) -> bool:  # type: ignore[override]
        """True in the ``typed`` mapping (documents from the wire form); the other modes decode."""
        return self.options.spec().mode == "typed"
    options: OpenSearchOptions

    def __init__(self, name: str, options: OpenSearchOptions | None = None):
        if options is None:
            raise TypeError("OpenSearchSink needs options (at least hosts)")
        super().__init__(name, options)
        self.client: Any = None
        self.admin: Any = None
        #: aliases this sink saw vanish (an index action refused by require_alias), see route()
        self._vanished_aliases: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None  # bulk requests in flight (max_bulk_in_flight > 1)
        #: the most bulk requests this sink had in flight at once so far
        self.peak_bulks_in_flight = 0
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._index_cache: dict[str, str] = {}
        self._routes: dict[str, _Route] = {}
        self._routes_lock = threading.Lock()
        self._pinned: dict[str, str] = {}
        self._warned_specs: set[str] = set()
        self._version_type: str = self.options.version_type
        #: What :meth:`prepare_replay` asked for (None: not a replay).
        self.replay_settings: ReplayDeletes | None = None
        self._held: dict[str, str | None] = {}  # concrete index → its gc_deletes before this sink raised it
        self._held_names: set[str] = set()
        #: Events not written because their item changed after the replay's window (see prepare_replay).
        self.superseded_skipped = 0

    def pin(self, targets: Mapping[str, str]) -> None:
        """Write index name → concrete index, bypassing alias and template (used by reindex).

        ``{"orders": "orders-v2"}`` makes every document of ``orders`` go to ``orders-v2`` only,
        rendered for the spec that index recorded. Call before :meth:`open`.
        """
        self._pinned = dict(targets)

    def prepare_replay(self, *, gc_deletes: str | None = "12h", repair: bool = False,
                       superseded: Any = frozenset(), tables: Sequence[str] = ()) -> None:
        """Make this sink instance honest for a replay (``ddb-cdc replay``, the reindex fill); call
        before :meth:`open`.

        - ``gc_deletes`` (an OpenSearch time value; None: leave the indices alone): on the first
          write of each index name, ``index.gc_deletes`` of every concrete index it writes to is
          raised to this value when lower, and :meth:`close` puts the old value back. A delete
          written while the replay runs (by the live worker) then keeps its tombstone — the
          deleted version — for that long, so the replay's older INSERT/MODIFY of that item is a
          409 instead of re-creating it. OpenSearch forgets a tombstone ``index.gc_deletes``
          after the delete (default 60 s; Elasticsearch reference, Delete API, "Versioning").
        - ``repair``: write with ``version_type: external_gte``, so a replayed change whose
          version equals the stored one is written again (a document a bad deploy rendered wrong
          is repaired); a lower version is still refused (409, counted as delivered).
        - ``superseded``: ``(table, key_id)`` pairs of items that changed after a windowed
          replay's ``--until``: their events are not written (counted in
          :attr:`superseded_skipped`) — the index already holds a newer state of the item, or the
          item was deleted and its tombstone may have expired, so writing the window's change
          could only re-create a deleted item (see :func:`pipeline.replay.stream.scan_superseded`).
        - ``tables``: tables whose index names :meth:`open` sets up (and raises ``gc_deletes``
          on) at once, before the replay reads anything; others are set up on first write.
        """
        if gc_deletes is not None:
            from connectors.opensearch.indices import duration_ms

            duration_ms(gc_deletes)  # ValueError for a bad time value, before anything is written
        self.replay_settings = ReplayDeletes(gc_deletes=gc_deletes, repair=repair, superseded=frozenset(superseded),
                                             tables=tuple(tables))
        self._version_type = "external_gte" if repair else self.options.version_type

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self, context: SinkContext) -> None:
        """Create the client and check the cluster answers (``GET /``).

        Index templates and aliases are set up on the first write of each index name.
        Raises FatalSinkError (one line, naming the host(s)) when the cluster cannot be reached,
        refuses the credentials, or the TLS handshake fails.
        """
        from connectors.opensearch.indices import IndexAdmin

        super().open(context)
        self.client = self._make_client(context)
        try:
            self.client.info()
        except Exception as exc:  # classified below, always re-raised as FatalSinkError
            err = self._classify_request_error(exc, request="GET /")
            self.client.close()
            self.client = None
            if isinstance(err, FatalSinkError):
                raise err from None
            raise FatalSinkError(f"{err}; check options.hosts and that the cluster is up") from None
        self.admin = IndexAdmin(self.client, sink_name=self.name)
        self._routes.clear()
        if self.replay_settings is not None:
            for table in self.replay_settings.tables:  # gc_deletes raised before the replay reads
                self.route(table)

    def write(self, batch: Batch) -> None:
        """Index / delete the batch's events now, in order, in bulk requests.

        Each event goes to its index name's alias and, while a reindex fills the next version,
        to that version too. Returns when every event is applied or ignored as stale (409) /
        already deleted (404). Raises PartialSinkError listing only the failed events (retriable:
        429/5xx after ``max_retries`` re-sends; permanent: other 4xx, or an event that cannot be
        rendered), RetriableSinkError for a whole-request failure that may pass (connection,
        timeout, 429, 5xx), FatalSinkError for one that will not (401/403, 413, an invalid index
        name, an index name held by an index or alias ddb-cdc did not create).
        """
        client = self._require_client()
        permanent: dict[int, tuple[ChangeEvent, str]] = {}
        pending: list[_Action] = []
        routes: dict[str, _Route] = {}  # looked up once per table and batch, not per event
        superseded = self.replay_settings.superseded if self.replay_settings is not None else frozenset()
        for event in batch.events:
            table = event.source.table
            if superseded and (table, event.key_id) in superseded:
                self.superseded_skipped += 1
                continue
            route = routes.get(table)
            if route is None:
                route = routes[table] = self.route(table)
            try:
                pending.extend(self._build_actions(event, route))
            except _EventProblem as problem:
                permanent[id(event)] = (event, str(problem))

        retriable: list[tuple[_Action, str]] = []
        attempt = 0
        while pending:
            retriable = []
            overflow: list[_Action] = []
            for results in self._send_chunks(client, list(self._chunks(pending))):
                for action, outcome, reason in results:
                    if outcome == "retriable":
                        retriable.append((action, reason))
                    elif outcome == "permanent" and self._alias_vanished(action, reason):
                        retriable.append((action, reason))  # re-created by _alias_vanished: send again
                    elif outcome == "permanent":
                        if (action.spec is not None and action.spec.mode == "typed" and not action.overflow
                                and is_field_limit_error(reason)):
                            overflow.append(self._render_index(action.event, action.index, action.spec,
                                                               overflow=True, alias=action.alias))
                        else:
                            permanent.setdefault(id(action.event), (action.event, reason))
            if overflow:
                for action, outcome, reason in self._send(client, overflow):
                    if outcome == "retriable":
                        retriable.append((action, reason))
                    elif outcome == "permanent":
                        permanent.setdefault(id(action.event), (action.event, reason))
            if not retriable or attempt >= self.options.max_retries:
                break
            self._sleep_backoff(attempt)
            attempt += 1
            pending = [action for action, _ in retriable]

        if retriable or permanent:
            failed_retriable: dict[int, tuple[ChangeEvent, str]] = {}
            for action, reason in retriable:
                if id(action.event) not in permanent:
                    failed_retriable.setdefault(id(action.event), (action.event, reason))
            first = (list(failed_retriable.values()) or list(permanent.values()))[0][1]
            raise PartialSinkError(
                f"{self._prefix()}: {len(failed_retriable) + len(permanent)} of {len(batch.events)} events failed "
                f"({len(failed_retriable)} retriable, {len(permanent)} permanent); first: {first}",
                retriable=list(failed_retriable.values()),
                permanent=list(permanent.values()),
            )

    def flush(self) -> None:
        """Nothing to do: ``write`` returns only after OpenSearch acknowledged the bulk requests."""

    def close(self) -> None:
        """Put back any ``index.gc_deletes`` raised for a replay, close the client's connections
        (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.client is not None:
            self._release_gc_deletes()
            try:
                self.client.close()
            finally:
                self.client = None
                self.admin = None

    # -- building requests -----------------------------------------------------------------------

    def index_for(self, table: str) -> str:
        """The index name for ``table``: the template with ``{table}`` filled in, lower-cased.

        It is the alias searches use; documents live in its versions ``{name}-v{N}``.
        Raises FatalSinkError when the result is not a valid index name.
        """
        name = self._index_cache.get(table)
        if name is None:
            name = self.options.index.format(table=table).lower()
            problem = index_name_problem(name)
            if problem:
                raise FatalSinkError(
                    f"{self._prefix()}: options.index {self.options.index!r} gives an invalid index name "
                    f"for table {table!r}: {problem}; change the template"
                )
            self._index_cache[table] = name
        return name

    def route(self, table: str) -> _Route:
        """Where ``table``'s documents go now (resolved on first use, the reindex marker re-read
        every ``reindex_check_s``). Raises RetriableSinkError / FatalSinkError like :meth:`write`."""
        name = self.index_for(table)
        now = time.monotonic()
        with self._routes_lock:
            route = self._routes.get(name)
            if route is not None and (route.pinned or now - route.checked_at < self.options.reindex_check_s):
                return route
            try:
                if route is None:
                    route = self._resolve(name)
                else:
                    self._refresh(name, route)
            except (FatalSinkError, RetriableSinkError):
                raise
            except Exception as exc:
                raise self._classify_request_error(exc, request=f"set up index {name!r}") from None
            route.checked_at = now
            self._routes[name] = route
            if self.replay_settings is not None and self.replay_settings.gc_deletes is not None:
                self._hold_gc_deletes(route)
            return route

    def _hold_gc_deletes(self, route: _Route) -> None:
        """Raise ``index.gc_deletes`` on the concrete indices behind ``route``'s targets (once per
        concrete index; an alias moved to a new version is caught on the next route refresh)."""
        assert self.replay_settings is not None and self.replay_settings.gc_deletes is not None
        wanted = self.replay_settings.gc_deletes
        for target, _spec in route.targets():
            try:
                behind = self.admin.gc_deletes(target)
                if not set(behind) - self._held_names:
                    continue
                changed = self.admin.raise_gc_deletes(target, wanted)
            except Exception as exc:
                raise self._classify_request_error(exc, request=f"raise index.gc_deletes of {target!r}") from None
            self._held_names.update(behind)
            for index, previous in changed.items():
                self._held.setdefault(index, previous)
                self._log("opensearch_gc_deletes_raised", index=index, gc_deletes=wanted,
                          previous=previous or "unset (60s)")

    def _release_gc_deletes(self) -> None:
        """Put back the ``index.gc_deletes`` values :meth:`_hold_gc_deletes` changed; a failure is
        logged with the command that does it by hand (the setting is harmless, only kept longer)."""
        if not self._held or self.replay_settings is None or self.replay_settings.gc_deletes is None:
            return
        held, self._held = self._held, {}
        try:
            restored = self.admin.restore_gc_deletes(held, self.replay_settings.gc_deletes)
        except Exception as exc:
            self._log("opensearch_gc_deletes_not_restored", level="warning", indices=sorted(held),
                      error=_one_line(exc, 200),
                      fix='PUT /INDEX/_settings {"index": {"gc_deletes": null}} for each index')
            return
        for index in restored:
            self._log("opensearch_gc_deletes_restored", index=index, gc_deletes=held[index] or "unset (60s)")

    def _resolve(self, name: str) -> _Route:
        admin = self.admin
        if self._pinned:
            index = self._pinned.get(name)
            if index is None:
                raise FatalSinkError(f"{self._prefix()}: index {name!r} is not among the pinned targets "
                                     f"{sorted(self._pinned)}")
            spec = admin.index_spec(index) or self.options.spec()
            return _Route(primary=index, primary_spec=spec, pinned=True)
        wanted = self.options.spec()
        admin.create_template_if_absent(name, wanted, self.options.index_settings)
        state = admin.state(name)
        if state.kind == "missing":
            from opensearchpy.exceptions import RequestError

            try:
                admin.create_version(name, 1, as_write_index=True)
            except RequestError as exc:
                if "already_exists" not in str(exc):
                    raise
            state = admin.state(name)
        route: _Route
        if state.kind == "index" and name in self._vanished_aliases and state.spec is None \
                and admin.reindex_marker(name) is None and admin.count(name) == 0:
            # This sink saw its alias vanish, and now finds an empty index without ddb-cdc's mapping
            # spec under the alias's name (any other bare index is refused below): OpenSearch
            # auto-creates one when a versioned delete reaches the alias after the index behind it
            # was deleted (deletes cannot carry require_alias). It holds no document, only
            # tombstones of deletes that the alias set up again gets anyway: replace it.
            self._log("opensearch_empty_plain_index_replaced", level="warning", index=name)
            admin.client.indices.delete(index=name, ignore=[404])
            try:
                admin.create_version(name, 1, as_write_index=True)
            except Exception as exc:  # noqa: BLE001 - another writer set it up first
                if "already_exists" not in str(exc):
                    raise
            state = admin.state(name)
        if state.kind == "index":
            marker = admin.reindex_marker(name)
            if marker is None:
                raise FatalSinkError(
                    f"{self._prefix()}: {name!r} is a plain index, not the alias this sink writes through; "
                    f"move it behind the alias with `ddb-cdc opensearch reindex --sink {self.name}` "
                    f"(zero downtime), or delete it"
                )
            route = _Route(primary=name, primary_spec=state.spec or MappingSpec.build("dynamic"))
        else:
            if state.write_index is None or state.spec is None:
                raise FatalSinkError(
                    f"{self._prefix()}: alias {name!r} points at {', '.join(state.indices) or 'no index'}, which "
                    f"ddb-cdc did not create (no _meta.ddb_cdc mapping spec); point options.index elsewhere or "
                    f"remove the alias"
                )
            route = _Route(primary=name, primary_spec=state.spec, alias=True)
            if state.spec.digest() != wanted.digest() and name not in self._warned_specs:
                self._warned_specs.add(name)
                self._log("opensearch_mapping_differs", level="warning", index=name, write_index=state.write_index,
                          index_mapping=state.spec.describe(), configured=wanted.describe(),
                          fix=f"ddb-cdc opensearch reindex --sink {self.name}")
        self._refresh_secondary(name, route)
        return route

    def _refresh(self, name: str, route: _Route) -> None:
        """Re-read the alias's write index (a reindex may have swapped it) and the reindex marker."""
        state = self.admin.state(name)
        if state.kind == "alias" and state.spec is not None and (state.spec != route.primary_spec or not route.alias):
            self._log("opensearch_alias_moved", index=name, write_index=state.write_index,
                      mapping=state.spec.describe())
            route.primary_spec, route.alias = state.spec, True  # e.g. a legacy bare index moved behind it
        self._refresh_secondary(name, route)

    def _refresh_secondary(self, name: str, route: _Route) -> None:
        marker = self.admin.reindex_marker(name)
        into = marker.get("into") if marker else None
        if into == route.secondary:
            return
        if into is None:
            route.secondary, route.secondary_spec = None, None
            self._log("opensearch_reindex_target_cleared", index=name)
            return
        spec = self.admin.index_spec(into)
        if spec is None:
            raise FatalSinkError(f"{self._prefix()}: reindex target {into!r} of {name!r} has no ddb-cdc mapping "
                                 "spec; run `ddb-cdc opensearch reindex --abort` and start again")
        route.secondary, route.secondary_spec = into, spec
        self._log("opensearch_reindex_target", index=name, also_writing_to=into, mapping=spec.describe())

    def _alias_vanished(self, action: _Action, reason: str) -> bool:
        """An index action to an alias that no longer exists (``require_alias`` refused it, e.g.
        after someone deleted the index behind it): drop the cached route and set the alias up
        again (a new first version), so the action can be re-sent. False for anything else."""
        if action.kind != "index" or not action.alias or "index_not_found_exception" not in reason:
            return False
        with self._routes_lock:
            self._routes.pop(action.alias, None)
            self._vanished_aliases.add(action.alias)
            self._held_names.clear()  # the version set up again is a new index: raise its gc_deletes too
        self._log("opensearch_alias_missing", level="warning", index=action.alias, reason=reason)
        self.route(action.event.source.table)
        return True

    def _log(self, event: str, level: str = "info", **fields: Any) -> None:
        """Log through the context's logger: structlog-style key/values, or one line for a stdlib logger."""
        logger = getattr(self.context, "logger", None)
        if logger is None:
            return
        if isinstance(logger, logging.Logger):
            logger.log(logging.getLevelName(level.upper()), "%s sink=%s %s", event, self.name, fields)
        else:
            getattr(logger, level)(event, sink=self.name, **fields)

    def _build_actions(self, event: ChangeEvent, route: _Route) -> list[_Action]:
        """The bulk actions of one event: one per target of its ``route`` (alias, reindex target)."""
        actions: list[_Action] = []
        rendered: dict[str, bytes] = {}
        for index, spec in route.targets():
            alias = index if index == route.primary and route.alias else ""
            if event.operation is Operation.REMOVE:
                actions.append(_Action(event, "delete", orjson.dumps({"delete": self._meta(event, index)}) + b"\n",
                                       index=index, spec=spec))
                continue
            digest = spec.digest()
            source = rendered.get(digest)
            if source is None:
                source = rendered[digest] = self._render_source(event, spec)
            actions.append(self._index_action(event, index, spec, source, alias=alias))
        return actions

    def _index_action(self, event: ChangeEvent, index: str, spec: MappingSpec, source: bytes, *, alias: str = "",
                      overflow: bool = False) -> _Action:
        meta = self._meta(event, index)
        if alias:
            meta["require_alias"] = True  # never let OpenSearch auto-create a bare index of the alias's name
        return _Action(event, "index", orjson.dumps({"index": meta}) + b"\n" + source + b"\n", index=index,
                       spec=spec, overflow=overflow, alias=alias)

    def _render_index(self, event: ChangeEvent, index: str, spec: MappingSpec, *, overflow: bool,
                      alias: str = "") -> _Action:
        return self._index_action(event, index, spec, self._render_source(event, spec, overflow=overflow),
                                  alias=alias, overflow=overflow)

    def _meta(self, event: ChangeEvent, index: str) -> dict[str, Any]:
        return {"_index": index, "_id": document_id(event.key_id), "version": event.version,
                "version_type": self._version_type}

    def _render_source(self, event: ChangeEvent, spec: MappingSpec, *, overflow: bool = False) -> bytes:
        """The ``_source`` bytes of an INSERT / MODIFY / SNAPSHOT for ``spec``. Raises _EventProblem."""
        typed = spec.mode == "typed"
        if typed and not overflow:
            source = self._typed_source_from_json(event)
            if source is not None:
                return source
        if typed:  # rendered from the wire form (issue 16): no decode → encode
            typed_keys, _, image = event.typed_parts()
        else:
            image = event.after
        keys_only = False
        if image is None:
            view = event.source.stream_view_type or "not given"
            if view not in _VIEWS_WITHOUT_NEW_IMAGE:
                raise _EventProblem(
                    f"stream has no new image: use NEW_IMAGE or NEW_AND_OLD_IMAGES ({event.operation.value} "
                    f"record without NewImage although its stream view type is {view})"
                )
            image, keys_only = (typed_keys if typed else event.keys), True
        malformed: list[str] = []
        try:
            if typed:
                document = typed_item_from_av(image)
                if overflow:
                    document = {OVERFLOW_FIELD: document}
            else:
                document = _escape_map(image, 1, spec.depth_limit, top_level=True)
                if spec.mode == "explicit":
                    malformed = spec.fit(document)
        except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            raise _EventProblem(f"cannot render the item as JSON: {_one_line(exc)}") from None
        cdc: dict[str, Any] = {
            "sequence_number": event.source.sequence_number,
            "shard_id": event.source.shard_id,
            "stream_arn": event.source.stream_arn,
            "table": event.source.table,
            "event_time": _iso(event.source.approximate_creation_time),
            "operation": event.operation.value,
            "version": event.version,
        }
        if spec.mode == "typed":
            cdc["mapping"] = "typed"
        if keys_only:
            cdc["image"] = "keys_only"
        if malformed:
            cdc["malformed"] = malformed
        if overflow:
            cdc["overflow"] = True
        document["_cdc"] = cdc
        try:
            return plain_json_bytes(document)
        except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            raise _EventProblem(f"cannot render the item as JSON: {_one_line(exc)}") from None

    def _typed_source_from_json(self, event: ChangeEvent) -> bytes | None:
        """A typed ``_source`` spliced from the NewImage's canonical JSON bytes
        (:meth:`ChangeEvent.typed_json_parts`) when no name in it needs escaping
        (:func:`connectors.opensearch.mapping.typed_json_keeps_names`): byte for byte what
        :meth:`_render_source` builds from the dicts. None when that does not apply (no NewImage,
        a name to escape, a part that cannot be decoded: the dict path renders or reports it)."""
        from pipeline.errors import DecodeError

        try:
            image = event.typed_json_parts()[2]
        except DecodeError:
            return None
        if image is None or not typed_json_keeps_names(image):
            return None
        src = event.source
        cdc = orjson.dumps({
            "sequence_number": src.sequence_number,
            "shard_id": src.shard_id,
            "stream_arn": src.stream_arn,
            "table": src.table,
            "event_time": _iso(src.approximate_creation_time),
            "operation": event.operation.value,
            "version": event.version,
            "mapping": "typed",
        })
        return (b'{"_cdc":' if image == b"{}" else image[:-1] + b',"_cdc":') + cdc + b"}"

    def _chunks(self, actions: Sequence[_Action]) -> Iterator[list[_Action]]:
        """Consecutive runs of ``actions`` bounded by max_bulk_docs and max_bulk_bytes, in order."""
        chunk: list[_Action] = []
        size = 0
        for action in actions:
            if chunk and (len(chunk) >= self.options.max_bulk_docs or size + action.size > self.options.max_bulk_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append(action)
            size += action.size
        if chunk:
            yield chunk

    # -- sending ---------------------------------------------------------------------------------

    def _send_chunks(self, client: Any, chunks: list[list[_Action]]) -> list[list[tuple[_Action, str, str]]]:
        """Send ``chunks`` (bulk request bodies), up to ``max_bulk_in_flight`` at once; their results
        in chunk order. Raises what :meth:`_send` raises for a whole request (after every request
        of this call ended)."""
        width = min(self.options.max_bulk_in_flight, len(chunks))
        if width <= 1:
            return [self._counted_send(client, chunk) for chunk in chunks]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.options.max_bulk_in_flight,
                                            thread_name_prefix=f"bulk-{self.name}")
        futures = [self._pool.submit(self._counted_send, client, chunk) for chunk in chunks]
        results, error = [], None
        for future in futures:  # wait for all: no request of this write is left running
            try:
                results.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - the first whole-request failure is raised
                error = error or exc
        if error is not None:
            raise error
        return results

    def _counted_send(self, client: Any, chunk: list[_Action]) -> list[tuple[_Action, str, str]]:
        with self._in_flight_lock:
            self._in_flight += 1
            self.peak_bulks_in_flight = max(self.peak_bulks_in_flight, self._in_flight)
        try:
            return self._send(client, chunk)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _send(self, client: Any, chunk: list[_Action]) -> list[tuple[_Action, str, str]]:
        """Send one bulk request; ``(action, "ok" | "retriable" | "permanent", reason)`` per action."""
        body = b"".join(a.lines for a in chunk)
        params = {"refresh": "true"} if self.options.refresh else None
        try:
            response = client.bulk(body=body, params=params)
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            if status == 400 and len(chunk) > 1:
                # The whole request was refused (e.g. request validation): find the culprits.
                results: list[tuple[_Action, str, str]] = []
                for action in chunk:
                    results.extend(self._send(client, [action]))
                return results
            if status == 400:
                return [(chunk[0], "permanent", f"400 {_transport_reason(exc)}")]
            raise self._classify_request_error(exc, request="bulk") from None
        items = response.get("items") if isinstance(response, dict) else None
        if not isinstance(items, list) or len(items) != len(chunk):
            got = len(items) if isinstance(items, list) else "no"
            raise RetriableSinkError(
                f"{self._prefix()}: bulk response from {self._hosts_text()} has {got} items for {len(chunk)} actions"
            )
        if isinstance(response, dict) and response.get("errors") is False:
            return [(a, "ok", "") for a in chunk]
        return [(a, *_item_outcome(a.kind, item)) for a, item in zip(chunk, items)]

    def _sleep_backoff(self, attempt: int) -> None:
        base = self.options.retry_backoff_s
        if base <= 0:
            return
        delay = min(_MAX_BACKOFF_S, base * (2**attempt))
        time.sleep(delay * random.uniform(0.5, 1.0))

    # -- client and errors -----------------------------------------------------------------------

    def _make_client(self, context: SinkContext) -> Any:
        from opensearchpy import OpenSearch

        opts = self.options
        kwargs: dict[str, Any] = {
            "hosts": list(opts.hosts),
            "timeout": opts.timeout_s,
            "max_retries": opts.max_retries,
            "retry_on_timeout": True,  # safe: every write is versioned, so a re-send is a no-op
            "verify_certs": opts.verify_certs,
        }
        if opts.ca_certs:
            kwargs["ca_certs"] = opts.ca_certs
        if not opts.verify_certs:
            kwargs["ssl_show_warn"] = False
        auth = opts.auth
        if isinstance(auth, BasicAuth):
            kwargs["http_auth"] = (auth.username, auth.password.get_secret_value())
        elif isinstance(auth, AwsSigV4Auth):
            from opensearchpy import AWSV4SignerAuth, RequestsHttpConnection

            kwargs["http_auth"] = AWSV4SignerAuth(*self._aws_credentials(auth, context), auth.service)
            kwargs["connection_class"] = RequestsHttpConnection
        return OpenSearch(**kwargs)

    def _aws_credentials(self, auth: AwsSigV4Auth, context: SinkContext) -> tuple[Any, str]:
        """(botocore credentials, region) for SigV4; FatalSinkError when either is missing."""
        aws = getattr(context, "aws", None)
        if aws is not None:
            from connectors.aws import make_session  # imports boto3

            session = make_session(aws)
        else:
            import boto3

            session = boto3.session.Session()
        credentials = session.get_credentials()
        if credentials is None:
            raise FatalSinkError(
                f"{self._prefix()}: auth aws_sigv4 found no AWS credentials; configure a profile, "
                "environment variables or an instance/container role"
            )
        region = auth.region or (getattr(aws, "region", None) if aws is not None else None) or session.region_name
        if not region:
            raise FatalSinkError(f"{self._prefix()}: auth aws_sigv4 needs a region; set options.auth.region")
        return credentials, region

    def _classify_request_error(self, exc: Exception, *, request: str) -> Exception:
        """Map an opensearch-py exception of a whole request to Retriable/FatalSinkError.

        ``request`` names the request in the message (``"GET /"``, ``"bulk"``).
        """
        from opensearchpy.exceptions import ConnectionError as OSConnectionError
        from opensearchpy.exceptions import ConnectionTimeout, SSLError, TransportError

        at = f"OpenSearch at {self._hosts_text()} ({request})"
        if isinstance(exc, SSLError):
            return FatalSinkError(
                f"{self._prefix()}: TLS error from {at}: {_one_line(exc.info or exc)}; check verify_certs / ca_certs"
            )
        if isinstance(exc, ConnectionTimeout):
            return RetriableSinkError(f"{self._prefix()}: timeout after {self.options.timeout_s:g} s from {at}")
        if isinstance(exc, OSConnectionError):
            return RetriableSinkError(f"{self._prefix()}: cannot connect to {at}: {_one_line(exc.info or exc)}")
        if isinstance(exc, TransportError):
            status = exc.status_code
            reason = _transport_reason(exc)
            if status in (401, 403):
                return FatalSinkError(
                    f"{self._prefix()}: {status} {reason} from {at}; check the credentials (options.auth) "
                    "and the user's permissions on the index"
                )
            if status == 413:
                return FatalSinkError(
                    f"{self._prefix()}: 413 request too large for {at}; lower options.max_bulk_bytes "
                    f"(now {self.options.max_bulk_bytes}) below the cluster's http.max_content_length"
                )
            if isinstance(status, int) and (status == 429 or status >= 500):
                return RetriableSinkError(f"{self._prefix()}: {status} {reason} from {at}")
            return FatalSinkError(f"{self._prefix()}: unexpected {status} {reason} from {at}")
        return RetriableSinkError(f"{self._prefix()}: {type(exc).__name__} from {at}: {_one_line(exc)}")

    def _require_client(self) -> Any:
        if self.client is None:
            raise FatalSinkError(f"{self._prefix()}: write called before open (or after close)")
        return self.client

    def _hosts_text(self) -> str:
        return ", ".join(redact_url(h) for h in self.options.hosts)

    def _prefix(self) -> str:
        return f"sink {self.name!r} (opensearch)"


#: Stream view types whose INSERT / MODIFY records never carry a new image.
_VIEWS_WITHOUT_NEW_IMAGE = ("KEYS_ONLY", "OLD_IMAGE")


class _EventProblem(Exception):
    """An event that cannot become a bulk action (reported as permanent)."""


def _transport_reason(exc: Exception) -> str:
    """``type: reason`` of an opensearch-py TransportError, one line."""
    info = getattr(exc, "info", None)
    if isinstance(info, dict) and isinstance(info.get("error"), dict):
        err = info["error"]
        return _one_line(f"{err.get('type', '')}: {err.get('reason', '')}")
    return _one_line(getattr(exc, "error", None) or exc)


def _item_outcome(kind: str, item: Any) -> tuple[str, str]:
    """("ok" | "retriable" | "permanent", reason) for one bulk response item."""
    result = item.get(kind) if isinstance(item, dict) else None
    if not isinstance(result, dict) and isinstance(item, dict) and len(item) == 1:
        result = next(iter(item.values()))
    if not isinstance(result, dict):
        return "retriable", f"malformed bulk response item {_one_line(item, 100)}"
    status = result.get("status")
    error = result.get("error")
    err_type = error.get("type", "") if isinstance(error, dict) else (str(error) if error else "")
    err_reason = error.get("reason", "") if isinstance(error, dict) else ""
    reason = _one_line(f"{status} {err_type}: {err_reason}" if err_type else f"{status} {result.get('result', '')}")
    if not isinstance(status, int):
        return "retriable", f"bulk response item without status: {_one_line(item, 100)}"
    if 200 <= status < 300:
        return "ok", ""
    if status == 409 and err_type == "version_conflict_engine_exception":
        return "ok", ""  # a newer (or the same) version is already there
    if status == 404 and kind == "delete":
        return "ok", ""  # nothing to delete (document or index missing)
    if status == 429 or status >= 500:
        return "retriable", reason
    return "permanent", reason
