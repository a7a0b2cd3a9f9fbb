"""Canonical AttributeValue JSON straight from the wire form, without building Python values.

The S3 audit line and the typed OpenSearch document write keys and images as DynamoDB
AttributeValue JSON in one documented canonical form: what :func:`pipeline.codec.encode_item`
makes of :func:`pipeline.codec.decode_item`'s result — numbers as the exact decimal text
``str(Decimal)`` gives in DynamoDB's number context (``"007"`` → ``"7"``, ``"1e2"`` → ``"1E+2"``),
string / number / binary sets sorted and without duplicates, binary as standard base64, ``NULL``
as ``true``, DynamoDB Local's bare ``{}`` as ``{"M": {}}``.

:func:`canonical_item` produces exactly that (``canonical_item(x) == encode_item(decode_item(x))``
for every input, and it raises DecodeError exactly when ``decode_item`` does), but walks the
parsed maps instead of decoding and re-encoding them: a value already in canonical form — S, BOOL,
``NULL: true``, integers in plain text, sorted string sets, maps and lists of such — is returned
as the very object it was parsed into; anything else goes through decode → encode for that value
only. Tested differentially against the decode → encode path (tests/test_lazy_events.py).
"""

from __future__ import annotations

import base64
import binascii
import re
from itertools import islice
from typing import Any, Mapping

from pipeline.codec import MAX_NESTING_DEPTH, _create_decimal, decode_item, decode_number, decode_value, encode_item, encode_value
from pipeline.errors import DecodeError

_NULL = {"NULL": True}
#: Standard base64 with padding and zero trailing bits: the text ``b64encode`` gives, so
#: ``b64encode(b64decode(text)) == text`` and ``binascii.a2b_base64`` decodes it as ``b64decode`` does.
_canonical_base64 = re.compile(
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?").fullmatch
_a2b_base64 = binascii.a2b_base64
_b64decode = base64.b64decode
_b64encode = base64.b64encode


def _plain_number_text(text: str) -> bool:
    """True when ``str(Decimal(text))`` in DynamoDB's context is ``text`` itself, decided from the
    text alone: ``[-]digits[.digits]`` in ASCII, at most 38 digits, no leading zero (but a lone
    ``0``), and for ``0.xxx`` at most 5 zeros after the point before the first non-zero digit (at
    most 6 when all are zeros) — beyond that ``str`` writes an exponent (``1E-7``). Anything else
    returns False and is decided by decoding (the Python decimal module's ``__str__`` rules)."""
    body = text[1:] if text[:1] == "-" else text
    whole, dot, frac = body.partition(".")
    if not (whole.isdigit() and whole.isascii()) or (whole[0] == "0" and len(whole) > 1):
        return False
    if not dot:
        return len(whole) <= 38
    if not (frac.isdigit() and frac.isascii()) or len(whole) + len(frac) > 38:
        return False
    if whole != "0":
        return True
    significant = frac.lstrip("0")
    return len(frac) - len(significant) <= 5 if significant else len(frac) <= 6


def canonical_item(image: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An item / image (``{"name": AttributeValue}``) in canonical AttributeValue JSON; None stays None.

    The top-level dict is always a new one (callers may add to it); nested values may be the
    input's own objects (read-only). Raises DecodeError as :func:`pipeline.codec.decode_item` does.
    """
    if image is None:
        return None
    if type(image) is not dict:
        return encode_item(decode_item(image))
    out: dict[str, Any] = {}
    for name, av in image.items():
        if type(name) is not str:
            raise DecodeError(f"attribute name must be a string, got {type(name).__name__}")
        if type(av) is dict and len(av) == 1:  # the common leaves inline, without a call
            value = av.get("S")
            if type(value) is str:
                out[name] = av
                continue
            value = av.get("N")
            if (type(value) is str and value.isdigit() and value.isascii() and len(value) <= 38
                    and (value[0] != "0" or len(value) == 1)):
                out[name] = av
                continue
        out[name] = canonical_value(av, 0)
    return out


def canonical_value(av: Any, depth: int = 0) -> Any:
    """One AttributeValue in canonical form (the same object when it is canonical already).

    ``depth`` is the nesting level of ``av`` as in :func:`pipeline.codec.decode_value`. Raises
    DecodeError as ``decode_value`` does.
    """
    if type(av) is dict and len(av) == 1:
        for tag, value in av.items():
            pass
        kind = type(value)
        if tag == "S":
            if kind is str:
                return av
        elif tag == "N":
            if kind is str:
                if _plain_number_text(value):
                    return av  # str(Decimal(text)) is the text itself
                try:
                    number = _create_decimal(value)
                except ArithmeticError:
                    decode_number(value)  # raises the DecodeError
                    raise  # pragma: no cover — decode_number always raises here
                if not number.is_finite():
                    decode_number(value)  # raises
                text = str(number)
                return av if text == value else {"N": text}
        elif tag == "M":
            if kind is dict:
                if depth > MAX_NESTING_DEPTH:
                    decode_value(av, depth)  # raises the depth error
                below = depth + 1
                out = None
                for i, (name, child) in enumerate(value.items()):
                    if type(name) is not str:
                        return encode_value(decode_value(av, depth))  # raises the name error
                    if out is None and type(child) is dict and len(child) == 1:  # common leaves inline
                        leaf = child.get("S")
                        if type(leaf) is str:
                            continue
                        leaf = child.get("N")
                        if (type(leaf) is str and leaf.isdigit() and leaf.isascii() and len(leaf) <= 38
                                and (leaf[0] != "0" or len(leaf) == 1)):
                            continue
                    canon = canonical_value(child, below)
                    if out is None:
                        if canon is child:
                            continue
                        out = dict(islice(value.items(), i))  # the unchanged ones before it
                    out[name] = canon
                return av if out is None else {"M": out}
        elif tag == "L":
            if kind is list:
                if depth > MAX_NESTING_DEPTH:
                    decode_value(av, depth)  # raises
                below = depth + 1
                items = None
                for i, child in enumerate(value):
                    if items is None and type(child) is dict and len(child) == 1:  # common leaves inline
                        leaf = child.get("S")
                        if type(leaf) is str:
                            continue
                        leaf = child.get("N")
                        if (type(leaf) is str and leaf.isdigit() and leaf.isascii() and len(leaf) <= 38
                                and (leaf[0] != "0" or len(leaf) == 1)):
                            continue
                    canon = canonical_value(child, below)
                    if items is None:
                        if canon is child:
                            continue
                        items = value[:i]
                    items.append(canon)
                return av if items is None else {"L": items}
        elif tag == "B":
            if kind is str:
                try:
                    text = _b64encode(_b64decode(value, validate=True)).decode("ascii")
                except (binascii.Error, ValueError):
                    pass  # the general path raises the DecodeError
                else:
                    return av if text == value else {"B": text}
            elif kind is bytes:
                return {"B": _b64encode(value).decode("ascii")}
        elif tag == "BOOL":
            if kind is bool:
                return av
        elif tag == "NULL":
            return av if value is True else _NULL.copy()
        elif tag == "SS":
            if kind is list and all(type(v) is str for v in value):
                if all(a < b for a, b in zip(value, value[1:])):
                    return av  # sorted, no duplicates: what sorted(set(value)) gives
                return {"SS": sorted(set(value))}
        elif tag == "NS":  # sorted(set of the decoded numbers), each as str (encode_value); none may fail
            if kind is list and value and all(type(v) is str for v in value):
                try:
                    numbers = {_create_decimal(v) for v in value}
                except ArithmeticError:
                    numbers = None  # the general path raises the DecodeError
                if numbers is not None and all(n.is_finite() for n in numbers):
                    texts = [str(n) for n in sorted(numbers)]
                    return av if texts == value else {"NS": texts}
        elif tag == "BS":  # sorted(set of the decoded bytes), as standard base64
            if kind is list and value and all(type(v) is str and _canonical_base64(v) for v in value):
                texts = sorted(set(value), key=_a2b_base64)  # canonical texts: one per distinct value
                return av if texts == value else {"BS": texts}
            if kind is list and value and all(type(v) is str for v in value):
                try:
                    blobs = {_b64decode(v, validate=True) for v in value}
                except (binascii.Error, ValueError):
                    blobs = None  # the general path raises the DecodeError
                if blobs is not None:
                    texts = [_b64encode(b).decode("ascii") for b in sorted(blobs)]
                    return av if texts == value else {"BS": texts}
    return encode_value(decode_value(av, depth))
