"""Mapping modes of the OpenSearch sink: the document a change becomes, and the index mapping for it.

DynamoDB is schemaless, an OpenSearch index is not: the same attribute name may hold a string in
one item and a map in another, numbers run to 38 digits or ``1E+125``, and maps keyed by ids grow
without bound. Each index version is created with one :class:`MappingSpec`, recorded in its
mapping's ``_meta.ddb_cdc``; the sink renders every document for the spec of the index it writes
to (so a running worker and a reindex with a newer spec never mix shapes).

Modes
-----
``dynamic``
    ``_source`` is the item in the *plain* rendering (:mod:`pipeline.render`; names escaped, deep
    values flattened, see :mod:`connectors.opensearch.sink`); OpenSearch's dynamic mapping decides the
    types from the first document that carries a field. A later document whose value does not fit
    (``mapper_parsing_exception``) or that adds fields past ``total_fields_limit`` is refused by
    OpenSearch: the sink dead-letters it with its event and images and counts it in
    ``ddb_cdc_sink_dead_lettered_total``. Nothing to declare; right for tables whose attributes
    keep one type.

``explicit``
    ``_source`` is the plain rendering too, but only the declared ``fields`` are indexed
    (``"dynamic": false``): every other attribute stays in ``_source``, retrievable, not
    searchable, and can never be refused for its type. A declared field whose value does not fit
    its type (a string in a ``long`` field, a map in a ``keyword`` field, a string where a
    declared map path expects a map, …) is *moved* within its map to the name ``_ddm`` + the
    attribute name (not indexed; :func:`connectors.opensearch.sink.restore_document` moves it back) and
    the field's path is listed in ``_cdc.malformed``, so the document is never refused and
    ``{"term": {"_cdc.malformed": "total"}}`` finds the items whose ``total`` is not a ``long``.
    Numeric, ``date`` and ``ip`` fields also get ``ignore_malformed: true`` as a backstop.

``typed``
    Every attribute is indexed under its DynamoDB type, so two items can never conflict:
    ``_source`` is the item as DynamoDB AttributeValue JSON (``{"email": {"S": "a@b"}, "total":
    {"N": "12.50"}, "tags": {"SS": [...]}, "address": {"M": {...}}}``), names escaped. Mapped by
    dynamic templates: ``*.S`` / ``*.SS`` → ``keyword`` (``ignore_above`` 8191) with a ``text``
    sub-field; ``*.N`` / ``*.NS`` → ``keyword`` holding the exact number text, with a ``double``
    sub-field for range queries; ``*.BOOL`` / ``*.NULL`` → ``boolean``; ``*.B`` / ``*.BS`` →
    ``binary`` (kept, not searchable); ``*.M`` / ``*.L`` → ``flat_object`` (every leaf searchable
    by exact value under its path, e.g. ``address.M.city.S``, without adding a mapping field per
    key, so id-keyed maps never grow the mapping). A top-level attribute adds at most one object
    and two fields per DynamoDB type it is seen with. If a document would still pass
    ``total_fields_limit`` (more distinct top-level attribute names than the limit allows), the
    sink re-sends it with the whole item under the ``flat_object`` field ``_ddo`` and
    ``_cdc.overflow: true`` instead of losing it.

Default: ``explicit`` when ``fields`` are declared, otherwise ``typed``.

Every mode maps ``_cdc`` explicitly (keyword ids, ``event_time`` date, ``version`` long) and sets
``index.mapping.total_fields.limit`` (the guard) in the index template.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from itertools import islice
from typing import Any, Literal, Mapping

import orjson

from connectors.opensearch.names import MALFORMED_PREFIX, escape_field_name, percent_escape, unescape_field_name
from pipeline.errors import MappingSpecError  # noqa: F401 (defined in the one error tree)

#: The three mapping modes.
MODES = ("dynamic", "explicit", "typed")
Mode = Literal["dynamic", "explicit", "typed"]

#: Field types accepted in ``fields`` (explicit mode), with the Python values that fit each.
FIELD_TYPES = ("keyword", "text", "long", "integer", "short", "byte", "double", "float", "boolean", "date",
               "flat_object", "binary", "ip")

#: The flat_object field holding a whole typed item that would pass the field limit.
OVERFLOW_FIELD = "_ddo"

_INTEGER_RANGES = {
    "long": (-(1 << 63), (1 << 63) - 1),
    "integer": (-(1 << 31), (1 << 31) - 1),
    "short": (-(1 << 15), (1 << 15) - 1),
    "byte": (-(1 << 7), (1 << 7) - 1),
}
_FLOAT_MAX = Decimal("3.4028234663852886E+38")
_BACKSTOP_TYPES = ("long", "integer", "short", "byte", "double", "float", "date", "ip")
#: Lucene refuses terms over 32,766 bytes; 8,191 characters of UTF-8 stay below it.
KEYWORD_IGNORE_ABOVE = 8191

#: The mapping of the sink's ``_cdc`` object (every mode).
CDC_MAPPING: dict[str, Any] = {
    "properties": {
        "sequence_number": {"type": "keyword"},
        "shard_id": {"type": "keyword"},
        "stream_arn": {"type": "keyword"},
        "table": {"type": "keyword"},
        "event_time": {"type": "date"},
        "operation": {"type": "keyword"},
        "version": {"type": "long"},
        "image": {"type": "keyword"},
        "mapping": {"type": "keyword"},
        "malformed": {"type": "keyword"},
        "overflow": {"type": "boolean"},
    }
}

_TYPED_STRING = {"type": "keyword", "ignore_above": KEYWORD_IGNORE_ABOVE, "fields": {"text": {"type": "text"}}}
_TYPED_NUMBER = {"type": "keyword", "fields": {"double": {"type": "double", "ignore_malformed": True}}}
#: (DynamoDB type key, mapping) of typed mode's dynamic templates, in order.
TYPED_TEMPLATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("S", _TYPED_STRING), ("SS", _TYPED_STRING),
    ("N", _TYPED_NUMBER), ("NS", _TYPED_NUMBER),
    ("BOOL", {"type": "boolean"}), ("NULL", {"type": "boolean"}),
    ("B", {"type": "binary"}), ("BS", {"type": "binary"}),
    ("M", {"type": "flat_object"}), ("L", {"type": "flat_object"}),
)



@dataclass(frozen=True)
class MappingSpec:
    """How documents of one index version are rendered and mapped.

    ``mode``: ``dynamic`` | ``explicit`` | ``typed``. ``fields``: declared field path (dotted
    attribute names, e.g. ``address.city``) → its OpenSearch field mapping (``{"type": "long",
    ...}``), explicit mode only. ``total_fields_limit``: ``index.mapping.total_fields.limit``.
    ``depth_limit``: ``index.mapping.depth.limit`` (plain renderings flatten deeper values).
    """

    mode: Mode
    fields: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    total_fields_limit: int = 1000
    depth_limit: int = 20
    _tree: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, mode: str | None, fields: Mapping[str, Any] | None = None, *, total_fields_limit: int = 1000,
              depth_limit: int = 20) -> "MappingSpec":
        """A validated spec. ``mode`` None picks ``explicit`` when ``fields`` are given, else ``typed``.

        ``fields`` values are a type name (``"keyword"``) or a mapping with a ``type`` and extra
        parameters (``{"type": "date", "format": "epoch_second"}``). Raises MappingSpecError (one
        line naming the field) for an unknown type, a path whose names the sink would escape
        (empty, dotted, starting with ``_``), a path inside another declared leaf, or fields with a
        mode other than ``explicit``.
        """
        fields = dict(fields or {})
        if mode is None:
            mode = "explicit" if fields else "typed"
        if mode not in MODES:
            raise MappingSpecError(f"mapping {mode!r} is not one of {', '.join(MODES)}")
        if fields and mode != "explicit":
            raise MappingSpecError(f"fields are declared but mapping is {mode!r}; fields are used by mapping: explicit")
        if mode == "explicit" and not fields:
            raise MappingSpecError("mapping: explicit needs fields (e.g. fields: {email: keyword, total: long})")
        normalized: dict[str, dict[str, Any]] = {}
        for path, decl in fields.items():
            normalized[path] = _normalize_field(path, decl)
        tree = _field_tree(normalized)
        frozen = tuple(sorted((p, tuple(sorted(m.items()))) for p, m in normalized.items()))
        spec = cls(mode=mode, fields=frozen, total_fields_limit=total_fields_limit, depth_limit=depth_limit)
        spec._tree.update(tree)
        return spec

    # -- (de)serialising into an index's _meta ---------------------------------------------------

    def to_meta(self) -> dict[str, Any]:
        """The ``_meta.ddb_cdc`` object recorded in the index mapping (JSON-safe)."""
        return {
            "format": 1,
            "mode": self.mode,
            "fields": {p: dict(m) for p, m in self.fields},
            "total_fields_limit": self.total_fields_limit,
            "depth_limit": self.depth_limit,
            "digest": self.digest(),
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "MappingSpec":
        """The spec an index recorded (:meth:`to_meta`). Raises MappingSpecError when malformed."""
        if not isinstance(meta, Mapping) or meta.get("mode") not in MODES:
            raise MappingSpecError(f"index _meta.ddb_cdc is not a ddb-cdc mapping spec: {str(meta)[:200]}")
        return cls.build(meta["mode"], meta.get("fields") or None,
                         total_fields_limit=int(meta.get("total_fields_limit", 1000)),
                         depth_limit=int(meta.get("depth_limit", 20)))

    def digest(self) -> str:
        """A short hash of what changes documents or mappings (mode, fields, limits)."""
        raw = orjson.dumps([self.mode, [[p, dict(m)] for p, m in self.fields], self.total_fields_limit,
                            self.depth_limit], option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(raw).hexdigest()[:16]

    def describe(self) -> str:
        """One line for plans and logs: ``explicit (3 fields: email keyword, total long, …)``."""
        if self.mode != "explicit":
            return f"{self.mode} (field limit {self.total_fields_limit})"
        shown = ", ".join(f"{p} {dict(m)['type']}" for p, m in self.fields[:6])
        more = ", …" if len(self.fields) > 6 else ""
        return f"explicit ({len(self.fields)} fields: {shown}{more})"

    # -- index template body ---------------------------------------------------------------------

    def mappings(self) -> dict[str, Any]:
        """The ``mappings`` of an index version for this spec (with ``_meta.ddb_cdc``)."""
        meta = {"ddb_cdc": self.to_meta()}
        if self.mode == "dynamic":
            return {"_meta": meta, "properties": {"_cdc": CDC_MAPPING}}
        if self.mode == "explicit":
            props = _tree_mapping(self._tree)
            props["_cdc"] = CDC_MAPPING
            return {"_meta": meta, "dynamic": False, "properties": props}
        templates = [{f"ddb_{key}": {"path_match": f"*.{key}", "mapping": mapping}} for key, mapping in TYPED_TEMPLATES]
        return {"_meta": meta, "dynamic": True, "date_detection": False, "numeric_detection": False,
                "dynamic_templates": templates,
                "properties": {"_cdc": CDC_MAPPING, OVERFLOW_FIELD: {"type": "flat_object"}}}

    def settings(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Index settings: the field-limit guard, the depth limit, then ``extra`` (user settings)."""
        out: dict[str, Any] = {
            "index.mapping.total_fields.limit": self.total_fields_limit,
            "index.mapping.depth.limit": self.depth_limit,
        }
        out.update(extra or {})
        return out

    # -- explicit mode: fitting values to declared types -------------------------------------------

    def fit(self, document: dict[str, Any]) -> list[str]:
        """Explicit mode: move every declared value that does not fit its type aside, in place.

        ``document`` is the escaped plain document (Python values: Decimal, bytes, sets, …).
        Returns the declared paths moved aside (sorted, for ``_cdc.malformed``).
        """
        malformed: list[str] = []
        _fit_map(document, self._tree, "", malformed)
        return sorted(set(malformed))


# --------------------------------------------------------------------------------------------
# Field declarations
# --------------------------------------------------------------------------------------------


def _normalize_field(path: str, decl: Any) -> dict[str, Any]:

    if not isinstance(path, str) or not path:
        raise MappingSpecError(f"field {path!r}: a field path is a non-empty dotted attribute path like address.city")
    for i, name in enumerate(path.split(".")):
        if not name or name.startswith("_") or escape_field_name(name, top_level=i == 0) != name:
            raise MappingSpecError(f"field {path!r}: attribute name {name!r} cannot be declared (empty, or starts "
                                   "with '_'; the sink stores such names escaped and does not index them)")
    if isinstance(decl, str):
        mapping: dict[str, Any] = {"type": decl}
    elif isinstance(decl, Mapping) and isinstance(decl.get("type"), str):
        mapping = dict(decl)
    else:
        raise MappingSpecError(f"field {path!r}: give a type name or {{type: ..., <parameters>}}, not {decl!r}")
    if mapping["type"] not in FIELD_TYPES:
        raise MappingSpecError(f"field {path!r}: type {mapping['type']!r} is not one of {', '.join(FIELD_TYPES)}")
    if mapping["type"] in _BACKSTOP_TYPES:
        mapping.setdefault("ignore_malformed", True)
    if mapping["type"] == "keyword":
        mapping.setdefault("ignore_above", KEYWORD_IGNORE_ABOVE)
    return mapping


@dataclass(frozen=True)
class _Leaf:
    path: str
    mapping: tuple[tuple[str, Any], ...]

    @property
    def type(self) -> str:
        return dict(self.mapping)["type"]

    @property
    def custom_date_format(self) -> bool:
        return "format" in dict(self.mapping)


def _field_tree(fields: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(fields, key=lambda p: p.count(".")):
        node = tree
        names = path.split(".")
        for depth, name in enumerate(names[:-1]):
            child = node.setdefault(name, {})
            if isinstance(child, _Leaf):
                raise MappingSpecError(f"field {path!r} lies inside the declared field "
                                       f"{'.'.join(names[:depth + 1])!r} ({child.type}); declare one of them")
            node = child
        if names[-1] in node:
            raise MappingSpecError(f"field {path!r} is declared and also has declared fields inside it")
        node[names[-1]] = _Leaf(path, tuple(sorted(fields[path].items())))
    return tree


def _tree_mapping(tree: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, node in tree.items():
        if isinstance(node, _Leaf):
            out[name] = dict(node.mapping)
        else:
            out[name] = {"properties": _tree_mapping(node)}
    return out


# --------------------------------------------------------------------------------------------
# Explicit mode: fitting
# --------------------------------------------------------------------------------------------


def _fit_map(doc: dict[str, Any], tree: Mapping[str, Any], prefix: str, malformed: list[str]) -> None:

    for name, node in tree.items():
        if name not in doc:
            continue
        value = doc[name]
        if isinstance(node, _Leaf):
            ok = _leaf_fits(value, node)
        else:
            ok = _object_fits(value, node, prefix + name + ".", malformed)
        if not ok:
            doc[MALFORMED_PREFIX + percent_escape(name)] = doc.pop(name)
            malformed.append(node.path if isinstance(node, _Leaf) else prefix + name)


def _object_shape_ok(value: Any) -> bool:
    if value is None or isinstance(value, dict):
        return True
    return isinstance(value, list) and all(_object_shape_ok(v) for v in value)


def _object_fits(value: Any, tree: Mapping[str, Any], prefix: str, malformed: list[str]) -> bool:
    """A value at a declared object path must be null, a map, or a list of those; maps are fitted in place."""
    if not _object_shape_ok(value):
        return False
    if isinstance(value, dict):
        _fit_map(value, tree, prefix, malformed)
    elif isinstance(value, list):
        for v in value:
            _object_fits(v, tree, prefix, malformed)
    return True


def _leaf_fits(value: Any, leaf: _Leaf) -> bool:
    kind = leaf.type
    if value is None:
        return True
    if kind == "flat_object":
        if isinstance(value, dict):
            return True
        return isinstance(value, list) and all(v is None or isinstance(v, dict) for v in value)
    if isinstance(value, dict):
        return False
    if isinstance(value, (list, set, frozenset)):
        return all(_leaf_fits(v, leaf) for v in value)
    return _scalar_fits(value, kind, leaf)


def _scalar_fits(value: Any, kind: str, leaf: _Leaf) -> bool:
    if kind in ("keyword", "text"):
        return isinstance(value, (str, Decimal, bool, bytes))
    if kind in _INTEGER_RANGES:
        if isinstance(value, bool) or not isinstance(value, Decimal) or not value.is_finite():
            return False
        low, high = _INTEGER_RANGES[kind]
        return value == value.to_integral_value() and low <= value <= high
    if kind == "double":
        return isinstance(value, Decimal) and not isinstance(value, bool) and value.is_finite()
    if kind == "float":
        return isinstance(value, Decimal) and value.is_finite() and abs(value) <= _FLOAT_MAX
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "binary":
        return isinstance(value, bytes)
    if kind == "ip":
        return isinstance(value, str)
    if kind == "date":
        if isinstance(value, Decimal) and not isinstance(value, bool):
            return value.is_finite() and value == value.to_integral_value()
        if not isinstance(value, str):
            return False
        if leaf.custom_date_format:
            return True  # the index's own format decides; ignore_malformed is the backstop
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    return True


# --------------------------------------------------------------------------------------------
# Typed mode: rendering and restoring
# --------------------------------------------------------------------------------------------


def typed_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """An item as AttributeValue JSON with names escaped (typed mode's ``_source`` without ``_cdc``).

    ``{"a.b": Decimal("1"), "m": {"_id": b"\\x00"}}`` → ``{"_ddba%2Eb": {"N": "1"}, "m": {"M":
    {"_id": {"B": "AA=="}}}}`` (``_id`` is escaped only at the top level). Sets are sorted.
    """

    return {escape_field_name(k, top_level=True): _typed_value(v) for k, v in item.items()}


def typed_item_from_av(item: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`typed_item` from an item already in canonical AttributeValue JSON (what
    :meth:`pipeline.events.ChangeEvent.typed_parts` gives): only the names are escaped, values
    without a name to escape are reused as they are. ``typed_item_from_av(encode_item(x)) ==
    typed_item(x)`` for every decoded item ``x`` (byte for byte once rendered as JSON).

    The returned top-level dict is new; nested objects may be shared with the input (read-only).
    """
    cache = _ESCAPED_TOP
    out: dict[str, Any] = {}
    for name, av in item.items():
        escaped = cache.get(name)
        if escaped is None:
            escaped = escape_field_name(name, top_level=True)
            if len(cache) < _ESCAPE_CACHE_SIZE:
                cache[name] = escaped
        out[escaped] = av if ("M" not in av and "L" not in av) else _typed_av(av)
    return out


#: In compact AttributeValue JSON every map value is an object, so every attribute name is a
#: string followed by ``":{`` (so is the tag ``M``, whose name needs no escaping).
_NAME_END = b'":{'
#: A name with a dot in it (and no JSON escape: those are looked at apart).
_DOTTED_NAME = re.compile(rb'\.[^"\\]*":\{')
#: A string with a JSON escape in it that may be a name (from its backslash to a ``":{``).
_ESCAPED_NAME = re.compile(rb'\\(?:[^"\\]|\\.)*":\{')
#: Where a name that needs escaping, other than a dotted one, must show: a string starting with
#: ``_`` (``_dd…``, the reserved ``_id`` / ``_cdc`` / …), an empty name, or a string starting with
#: a byte that begins a whitespace character (space, a JSON escape, the UTF-8 lead bytes of U+0085,
#: U+00A0, U+1680, U+2000–U+205F, U+3000): a blank name is all whitespace (``str.strip``).
_NAME_MARKERS = re.compile(rb'"(?:_|":\{| |\\|[\xc2\xe1\xe2\xe3])')
#: Names (UTF-8 JSON text) that no level escapes; bounded like the caches below.
_UNESCAPED_NAMES: set[bytes] = set()


def typed_json_keeps_names(image_json: bytes) -> bool:
    """True when no attribute name, at any level, of ``image_json`` — an item in canonical
    AttributeValue JSON written compactly (``orjson.dumps`` of what
    :meth:`pipeline.events.ChangeEvent.typed_parts` gives) — needs escaping, judged by the
    top-level rule (:func:`connectors.opensearch.names.escape_field_name`, ``top_level=True``:
    the stricter one) for every name. Then :func:`typed_item_from_av` returns the item as it is,
    and its typed document is ``image_json`` with ``_cdc`` added. False means: render it from the
    dicts. Conservative: a name with a JSON escape in it counts as escaped, and a string value
    that looks like a name only sends the item to the dict path.

    Cost: a few byte searches; the names are looked at one by one only when a marker of
    :data:`_NAME_MARKERS` shows.
    """
    if _DOTTED_NAME.search(image_json) is not None or _ESCAPED_NAME.search(image_json) is not None:
        return False
    if _NAME_MARKERS.search(image_json) is None:
        return True
    names = {piece.rpartition(b'"')[2] for piece in image_json.split(_NAME_END)[:-1]}
    names.difference_update(_UNESCAPED_NAMES)
    for name in names:
        if b"\\" in name:
            return False
        text = name.decode("utf-8")
        if escape_field_name(text, top_level=True) != text:
            return False
        if len(_UNESCAPED_NAMES) < _ESCAPE_CACHE_SIZE:
            _UNESCAPED_NAMES.add(name)
    return True


#: Escaped names by name (attribute names repeat from item to item); bounded, never evicted.
_ESCAPED_TOP: dict[str, str] = {}
_ESCAPED_NESTED: dict[str, str] = {}
_ESCAPE_CACHE_SIZE = 65_536


def _typed_av(av: dict[str, Any]) -> dict[str, Any]:
    """One canonical AttributeValue with map names escaped at every level (the same object when
    no name inside needs escaping)."""
    inner = av.get("M")
    if inner is not None and len(av) == 1:
        out = None
        for i, (name, child) in enumerate(inner.items()):
            escaped = _ESCAPED_NESTED.get(name) or _escaped_nested(name)
            typed = child if ("M" not in child and "L" not in child) else _typed_av(child)
            if out is None:
                if escaped == name and typed is child:
                    continue
                out = dict(islice(inner.items(), i))
            out[escaped] = typed
        return av if out is None else {"M": out}
    inner = av.get("L")
    if inner is not None and len(av) == 1:
        items = None
        for i, child in enumerate(inner):
            typed = child if ("M" not in child and "L" not in child) else _typed_av(child)
            if items is None:
                if typed is child:
                    continue
                items = inner[:i]
            items.append(typed)
        return av if items is None else {"L": items}
    return av


def _escaped_nested(name: str) -> str:
    escaped = _ESCAPED_NESTED.get(name)
    if escaped is None:

        escaped = escape_field_name(name)
        if len(_ESCAPED_NESTED) < _ESCAPE_CACHE_SIZE:
            _ESCAPED_NESTED[name] = escaped
    return escaped


def _typed_value(value: Any) -> dict[str, Any]:
    from pipeline.codec import encode_value

    if isinstance(value, Mapping):
        return {"M": {escape_field_name(k): _typed_value(v) for k, v in value.items()}}
    if isinstance(value, list):
        return {"L": [_typed_value(v) for v in value]}
    return encode_value(value)


def restore_typed(source: Mapping[str, Any]) -> dict[str, Any]:
    """The item a typed ``_source`` holds, as decoded Python values (Decimal, bytes, sets, …).

    Undoes :func:`typed_item` (names unescaped at every level) and the ``_ddo`` overflow field;
    ``_cdc`` is dropped.
    """
    from pipeline.codec import decode_value

    merged: dict[str, Any] = {}
    for name, value in source.items():
        if name == "_cdc":
            continue
        if name == OVERFLOW_FIELD and isinstance(value, Mapping):
            merged.update(value)
        else:
            merged[name] = value
    return {unescape_field_name(k): decode_value(_unescape_typed(v)) for k, v in merged.items()}


def _unescape_typed(value: Any) -> Any:

    if isinstance(value, Mapping):
        if "M" in value and isinstance(value["M"], Mapping):
            return {"M": {unescape_field_name(k): _unescape_typed(v) for k, v in value["M"].items()}}
        if "L" in value and isinstance(value["L"], list):
            return {"L": [_unescape_typed(v) for v in value["L"]]}
    return value


def is_field_limit_error(reason: str) -> bool:
    """Is a bulk item error OpenSearch's total-fields limit (``Limit of total fields [N] …``)?"""
    return "Limit of total fields" in reason
