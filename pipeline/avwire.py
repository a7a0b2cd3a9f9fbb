"""GetRecords bodies read by msgspec into typed AttributeValue structs, checked in C (issue 16).

``source.read_path: typed`` (and ``auto`` when every sink renders from the wire form).
:func:`parse_get_records` reads a GetRecords response body (DynamoDB Streams API reference,
GetRecords: ``{"Records": [Record], "NextShardIterator": str}``; Record and StreamRecord as
documented there) with msgspec (https://jcristharif.com/msgspec/) against a typed schema instead
of building plain dicts with orjson. While it parses, msgspec's C code checks part of what the
Python canonical walk (:mod:`pipeline.avjson`) checks value by value:

- every AttributeValue is an object whose keys are known type tags (``S N B BOOL NULL M L SS NS
  BS``: ``forbid_unknown_fields``) and each tag's value has its JSON type (S / N / B text, BOOL /
  NULL true or false, M an object, L an array; ``null`` is refused);
- maps and lists nest at most :data:`pipeline.codec.MAX_NESTING_DEPTH` levels: there is one
  struct type per level, and the last one has no ``M`` / ``L`` field;
- the record and stream-record fields are the documented ones, with their JSON types.

A body the schema refuses (anything unusual) is parsed by orjson into plain dicts instead
(:func:`connectors.dynamodb_streams.fastpath.parse_get_records_body`), and the dict path decides
what is wrong with it, as without ``typed``.

The records come back as plain dicts (the shape orjson gives) except that ``Keys``, ``NewImage``
and ``OldImage`` are :class:`WireImage` objects: read-only Mappings over the structs, whose
:meth:`~WireImage.as_dict` is the AttributeValue JSON exactly as parsed, in plain dicts (built in C
by ``msgspec.to_builtins``, once, when something asks for it: decoding a whole image, a plugin
reading ``raw_new_image``).

:meth:`WireImage.canonical_json` writes an image's canonical AttributeValue JSON — what the S3
audit line and the typed OpenSearch document hold — from the structs, in C (msgspec's encoder),
then checks and fixes the bytes: no value with two tags, no ``{}`` anywhere (an empty map, or
DynamoDB Local's ``{}`` value), ``NULL`` only ``true`` (else: the dict path); ``N`` texts not in
plain canonical form rewritten to ``str(Decimal)`` (``1e2`` → ``1E+2``), ``B`` texts that are not canonical base64
re-encoded, sets sorted by a per-set call of :func:`pipeline.avjson.canonical_value` (any of
these invalid: the dict path). The result is byte for byte ``orjson.dumps(canonical_item(
image.as_dict()))``; ``tests/test_wire_structs.py`` checks it, and everything else the consumers
see, differentially against the dict path.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Iterator, Mapping, Union

import msgspec
from msgspec import UNSET, UnsetType

from pipeline.avjson import canonical_value as _canonical_value
from pipeline.codec import DYNAMODB_CONTEXT, MAX_NESTING_DEPTH
from pipeline.errors import DecodeError

__all__ = ["WireImage", "WireSet", "parse_get_records"]


class WireSet:
    """The value of an SS / NS / BS tag as read: ``raw``, the JSON array as parsed. Its canonical
    form (sorted, without duplicates, members in canonical text — what
    :func:`pipeline.avjson.canonical_value` gives) is computed when the canonical JSON is
    written (:meth:`canonical`), not while parsing."""

    __slots__ = ("raw",)

    tag = ""

    def __init__(self, raw: Any):
        self.raw = raw

    def canonical(self) -> list:
        """The canonical member list. Raises _NotCanonical when the set cannot be decoded, or when
        its canonical form has another tag (an empty NS / BS is written ``{"SS": []}``,
        :func:`pipeline.codec.encode_value`): the dict path then decides."""
        try:
            canonical = _canonical_value({self.tag: self.raw}).get(self.tag)
        except DecodeError:
            canonical = None
        if canonical is None:
            raise _NotCanonical
        return canonical


class _SS(WireSet):
    __slots__ = ()
    tag = "SS"


class _NS(WireSet):
    __slots__ = ()
    tag = "NS"


class _BS(WireSet):
    __slots__ = ()
    tag = "BS"


def _decode_hook(kind: type, obj: Any) -> Any:
    """msgspec's decode hook: a set's JSON value → its :class:`WireSet` (one call per set)."""
    if kind is _SS or kind is _NS or kind is _BS:
        return kind(obj)
    raise NotImplementedError(f"no decoder for {kind!r}")


class _NotCanonical(Exception):
    """A value the canonical writer does not handle met it (the dict path decides)."""


def _canonical_hook(obj: Any) -> Any:
    if isinstance(obj, WireSet):
        return obj.canonical()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _raw_hook(obj: Any) -> Any:
    if isinstance(obj, WireSet):
        return obj.raw
    raise TypeError(f"cannot convert {type(obj).__name__}")


def _value_types() -> type:
    """The AttributeValue struct of nesting level 0; level ``d`` holds maps / lists of level
    ``d + 1``, and level ``MAX_NESTING_DEPTH + 1`` has no M / L (see the module doc)."""
    leaves: list[tuple[str, Any, Any]] = [
        ("S", str | UnsetType, UNSET), ("N", str | UnsetType, UNSET), ("B", str | UnsetType, UNSET),
        ("BOOL", bool | UnsetType, UNSET), ("NULL", bool | UnsetType, UNSET)]
    sets: list[tuple[str, Any, Any]] = [("SS", _SS, UNSET), ("NS", _NS, UNSET), ("BS", _BS, UNSET)]
    options = dict(forbid_unknown_fields=True, omit_defaults=True, gc=False, module=__name__)
    level = msgspec.defstruct(f"_AV{MAX_NESTING_DEPTH + 1}", leaves + sets, **options)
    for depth in range(MAX_NESTING_DEPTH, -1, -1):
        level = msgspec.defstruct(f"_AV{depth}", leaves + [("M", dict[str, level] | UnsetType, UNSET),
                                                           ("L", list[level] | UnsetType, UNSET)] + sets, **options)
    return level


_AV = _value_types()
_Image = dict[str, _AV]  # type: ignore[valid-type]


_Int = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # integers orjson reads as int (others: orjson path)


class _StreamRecord(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """StreamRecord (DynamoDB Streams API reference); any other field → the orjson path."""

    ApproximateCreationDateTime: Union[float, _Int, UnsetType] = UNSET
    Keys: Union[_Image, UnsetType] = UNSET
    NewImage: Union[_Image, UnsetType] = UNSET
    OldImage: Union[_Image, UnsetType] = UNSET
    SequenceNumber: Union[str, UnsetType] = UNSET
    SizeBytes: Union[_Int, UnsetType] = UNSET
    StreamViewType: Union[str, UnsetType] = UNSET


class _Identity(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    PrincipalId: Union[str, UnsetType] = UNSET
    Type: Union[str, UnsetType] = UNSET


class _Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Record (DynamoDB Streams API reference)."""

    awsRegion: Union[str, UnsetType] = UNSET
    dynamodb: Union[_StreamRecord, UnsetType] = UNSET
    eventID: Union[str, UnsetType] = UNSET
    eventName: Union[str, UnsetType] = UNSET
    eventSource: Union[str, UnsetType] = UNSET
    eventVersion: Union[str, UnsetType] = UNSET
    userIdentity: Union[_Identity, UnsetType] = UNSET


class _Page(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    Records: Union[list[_Record], UnsetType] = UNSET
    NextShardIterator: Union[str, None, UnsetType] = UNSET


_DECODER = msgspec.json.Decoder(_Page, dec_hook=_decode_hook)
_ENCODER = msgspec.json.Encoder(enc_hook=_canonical_hook)
_to_builtins = msgspec.to_builtins
_create_decimal = DYNAMODB_CONTEXT.create_decimal
_b64decode = base64.b64decode
_b64encode = base64.b64encode

#: ``,"TAG":`` — a second tag of one value, unless it is a map attribute named like a tag (then
#: ``}`` comes before it and ``{`` after it: every map value is an object).
_COMMA_TAG = re.compile(rb',"(?:S|N|B|BOOL|NULL|M|L|SS|NS|BS)":')
#: An ``N`` whose text is not what ``str(Decimal(text))`` gives (the rule of
#: :func:`pipeline.avjson._plain_number_text`: at most 38 digits, no exponent, no leading zero,
#: ``0.`` followed by at most 5 zeros before a non-zero digit or by at most 6 zeros in all); group 1
#: is its text as written in the JSON.
_NOT_PLAIN_NUMBER = re.compile(
    rb'"N":"(?!-?(?:0|[1-9][0-9]{0,37}|(?=[0-9.]{3,39}")(?:[1-9][0-9]*\.[0-9]+|0\.(?:0{0,5}[1-9][0-9]*|0{1,6})))")'
    rb'([^"]*)"')  # a text with a JSON escape: the group ends at a backslash, which _canonical_number refuses


def _canonical_number(match: "re.Match[bytes]") -> bytes:
    """The canonical ``"N":"..."`` for one number that is not in plain text (``1e2`` → ``1E+2``,
    ``0.0000001`` → ``1E-7``): ``str`` of the Decimal that :func:`pipeline.avjson.canonical_value`
    makes of it. Raises _NotCanonical when the text is not a DynamoDB number (the dict path
    raises the DecodeError)."""
    text = match.group(1)
    if b"\\" in text:
        raise _NotCanonical
    try:
        number = _create_decimal(text.decode("utf-8"))
    except ArithmeticError:
        raise _NotCanonical from None
    if not number.is_finite():
        raise _NotCanonical
    return b'"N":"' + str(number).encode("ascii") + b'"'


#: A ``B`` whose text is not standard base64 with padding and zero trailing bits (what
#: ``base64.b64encode(base64.b64decode(text))`` gives); group 1 is its text as written.
_NOT_CANONICAL_BASE64 = re.compile(
    rb'"B":"(?!(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?")'
    rb'((?:[^"\\]|\\.)*)"')


def _canonical_base64(match: "re.Match[bytes]") -> bytes:
    """The canonical ``"B":"..."`` for one binary value whose text is not canonical base64
    (``QR==`` → ``QQ==``). Raises _NotCanonical when the text is not base64 (the dict path raises
    the DecodeError)."""
    try:
        raw = _b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise _NotCanonical from None
    return b'"B":"' + _b64encode(raw) + b'"'


def _canonical_json(data: bytes) -> bytes | None:
    """``data`` (msgspec's JSON of an image's structs) as canonical AttributeValue JSON: numbers
    not in plain text rewritten, or None when a check of the module doc fails (the image then
    takes the dict path)."""
    if b'"NULL":false' in data:
        return None
    if b"{}" in data and data != b"{}":
        # an empty map, or a value written {} (DynamoDB Local's empty map): the bytes cannot tell
        # them apart (an attribute named M holding {} reads like an empty map), so the dict path
        return None
    for match in _COMMA_TAG.finditer(data):
        start, end = match.span()
        if data[start - 1:start] != b"}" or data[end:end + 1] != b"{":
            return None
    try:  # one pass each; sub gives the same object back when nothing matched
        data = _NOT_CANONICAL_BASE64.sub(_canonical_base64, _NOT_PLAIN_NUMBER.sub(_canonical_number, data))
    except _NotCanonical:
        return None
    return data


class WireImage(Mapping):
    """Keys / NewImage / OldImage of a record read by :func:`parse_get_records`: a read-only
    Mapping of attribute name → AttributeValue JSON (plain dicts, see :meth:`as_dict`), backed by
    the typed structs msgspec read."""

    __slots__ = ("_structs", "_dict", "_json")

    def __init__(self, structs: dict[str, Any]):
        self._structs = structs
        self._dict: dict[str, Any] | None = None
        self._json: bytes | None | UnsetType = UNSET

    def as_dict(self) -> dict[str, Any]:
        """The image as AttributeValue JSON in plain dicts and lists (built once, then shared:
        read-only)."""
        value = self._dict
        if value is None:
            value = self._dict = _to_builtins(self._structs, enc_hook=_raw_hook)
        return value

    def canonical_json(self) -> bytes | None:
        """``orjson.dumps(pipeline.avjson.canonical_item(self.as_dict()))`` when the image passes
        the checks of the module doc, written by msgspec without building dicts; else None (the
        caller takes the dict path). Computed once."""
        value = self._json
        if value is UNSET:
            try:
                value = _ENCODER.encode(self._structs)
            except _NotCanonical:
                value = None
            else:
                value = _canonical_json(value)
            self._json = value
        return value  # type: ignore[return-value]

    def attribute(self, name: str) -> Any:
        """One attribute's AttributeValue JSON (plain dicts), without converting the rest."""
        if self._dict is not None:
            return self._dict[name]
        return _to_builtins(self._structs[name], enc_hook=_raw_hook)

    def __getitem__(self, name: str) -> Any:
        return self.as_dict()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._structs

    def __iter__(self) -> Iterator[str]:
        return iter(self._structs)

    def __len__(self) -> int:
        return len(self._structs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WireImage):
            other = other.as_dict()
        return self.as_dict() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"WireImage({self.as_dict()!r})"

    def __reduce__(self) -> tuple:
        return (dict, (self.as_dict(),))  # pickles (and deep-copies) as the plain dict


def _fields(struct: Any) -> dict[str, Any]:
    return {name: value for name, value in zip(struct.__struct_fields__, msgspec.structs.astuple(struct))
            if value is not UNSET}


_IMAGES = ("Keys", "NewImage", "OldImage")


def parse_get_records(body: bytes) -> dict[str, Any]:
    """A GetRecords response body → ``{"Records": [record dicts], "NextShardIterator": str}``
    (``NextShardIterator`` left out when absent or null), each record the dict orjson would give
    except that its Keys / NewImage / OldImage are :class:`WireImage` objects.

    Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError`` (both ``msgspec.MsgspecError``)
    for a body that is not such JSON or that the schema refuses (the module doc): the caller then
    parses it as plain JSON.
    """
    page = _DECODER.decode(body)
    records = []
    for record in page.Records or ():
        out = _fields(record)
        data = out.get("dynamodb")
        if data is not None:
            data = out["dynamodb"] = _fields(data)
            for part in _IMAGES:
                image = data.get(part)
                if image is not None:
                    data[part] = WireImage(image)
        identity = out.get("userIdentity")
        if identity is not None:
            out["userIdentity"] = _fields(identity)
        records.append(out)
    result: dict[str, Any] = {"Records": records}
    if page.NextShardIterator is not None and page.NextShardIterator is not UNSET:
        result["NextShardIterator"] = page.NextShardIterator
    return result
