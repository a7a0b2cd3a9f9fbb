"""How item attribute names and keys become OpenSearch names: document ids, escaped field
names and their inverse. The sink (``sink``) and the index mapping modes (``mapping``) both use
these, and import nothing from each other for them. See the sink's module doc, "Attribute names".
"""

from __future__ import annotations

import hashlib

__all__ = ["MAX_ID_BYTES", "RESERVED_FIELD_NAMES", "ESCAPE_PREFIX", "FLATTEN_PREFIX", "MALFORMED_PREFIX",
           "document_id", "percent_escape", "percent_unescape", "escape_field_name", "unescape_field_name"]

#: OpenSearch's limit on ``_id`` length, in UTF-8 bytes.
MAX_ID_BYTES = 512

#: Top-level attribute names that are escaped (see the module doc): OpenSearch's metadata fields
#: (current and historical, so older clusters and plugins are covered too), which it refuses at
#: the top level of ``_source``, and ``_cdc``, the sink's own object.
RESERVED_FIELD_NAMES = frozenset({
    "_id", "_source", "_index", "_routing", "_version", "_seq_no", "_primary_term", "_field_names",
    "_ignored", "_nested_path", "_data_stream_timestamp", "_doc_count", "_type", "_uid", "_parent",
    "_all", "_size", "_timestamp", "_ttl", "_tier", "_meta", "_feature", "_cdc",
})

#: Prefix of an escaped attribute name, and of a value flattened into a JSON string.
ESCAPE_PREFIX = "_ddb"
FLATTEN_PREFIX = "_ddj"
_RESERVED_PREFIX = "_dd"
#: Prefix of a declared field's value moved aside because it does not fit the declared type.
MALFORMED_PREFIX = "_ddm"


def document_id(key_id: str) -> str:
    """The OpenSearch ``_id`` for an item: ``key_id`` itself, or ``"sha256:" + hexdigest`` of its
    UTF-8 bytes when that encoding is longer than :data:`MAX_ID_BYTES` (512) bytes.

    Hashed ids are 71 ASCII characters; a collision would need a SHA-256 collision.
    """
    raw = key_id.encode("utf-8")
    if len(raw) <= MAX_ID_BYTES:
        return key_id
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def percent_escape(name: str) -> str:
    """``%`` → ``%25`` and ``.`` → ``%2E`` (a dot would be read as an object path by OpenSearch)."""
    return name.replace("%", "%25").replace(".", "%2E")


def percent_unescape(text: str) -> str:
    """Inverse of :func:`percent_escape`; any other ``%`` sequence is kept as it is."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("%2E", i):
            out.append(".")
            i += 3
        elif text.startswith("%25", i):
            out.append("%")
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def escape_field_name(name: str, *, top_level: bool = False) -> str:
    """The name an attribute gets in ``_source`` (see the module doc, "Attribute names").

    ``"_id"`` (top level) → ``"_ddb_id"``; ``"a.b"`` → ``"_ddba%2Eb"``; ``""`` → ``"_ddb"``;
    ``"_ddbx"`` → ``"_ddb_ddbx"``; ``"name"`` → ``"name"``.
    """
    if (
        not name.strip()
        or "." in name
        or name.startswith(_RESERVED_PREFIX)
        or (top_level and name in RESERVED_FIELD_NAMES)
    ):
        return ESCAPE_PREFIX + percent_escape(name)
    return name


def unescape_field_name(name: str) -> str:
    """Inverse of :func:`escape_field_name` (also accepts a flattened ``_ddj`` or moved-aside ``_ddm`` name)."""
    if name.startswith(ESCAPE_PREFIX) or name.startswith(FLATTEN_PREFIX) or name.startswith(MALFORMED_PREFIX):
        return percent_unescape(name[len(ESCAPE_PREFIX):])
    return name
