"""ddb-cdc-speedups: an experiment (issue 16), not used by ddb-cdc.

Two C extension modules:

- :mod:`ddb_cdc_speedups._decode`: ``pipeline.codec.decode_item`` in C. It holds no decoding rules
  of its own beyond the fast shapes: it is bound to a codec module, whose number context it uses
  and whose Python functions it calls for everything else (unusual values and every error), so
  results and errors are the codec's::

      from pipeline import codec
      import ddb_cdc_speedups

      decode_item = ddb_cdc_speedups.bind(codec)
      decode_item({"pk": {"S": "a"}, "n": {"N": "1.50"}})  # {'pk': 'a', 'n': Decimal('1.50')}

- :mod:`ddb_cdc_speedups._canonical`: :func:`canonical_json` — the canonical AttributeValue JSON
  of an image (``orjson.dumps(pipeline.avjson.canonical_item(image))``) written in C, or None
  when the image is not in its fast shapes::

      ddb_cdc_speedups.canonical_json({"pk": {"S": "a"}, "n": {"N": "1e2"}})
      # b'{"pk":{"S":"a"},"n":{"N":"1E+2"}}'
      ddb_cdc_speedups.canonical_json({"n": {"NULL": False}})  # None: take the Python path
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from ddb_cdc_speedups import _canonical, _decode

__all__ = ["bind", "canonical_json", "canonical_json_basic"]

#: ``canonical_json(image) -> bytes | None``: exactly ``orjson.dumps(canonical_item(image))``, or
#: None ("not sure: take the Python path"); never raises but MemoryError, runs no Python code.
#: Fast shapes: exact dict / list / str / bool; S, BOOL, NULL true, M and L (at most
#: ``pipeline.codec.MAX_NESTING_DEPTH`` levels), B in canonical base64, N in plain syntax with at
#: most 38 significant digits (written as ``str(Decimal)``), SS, NS and BS (sorted, distinct).
canonical_json = _canonical.canonical_json
#: ``canonical_json`` limited to the shapes that are written as they are read (S, BOOL, NULL
#: true, M, L, N in plain text, canonical B, strictly ascending SS): None for NS, BS, numbers
#: not in plain text and unsorted SS.
canonical_json_basic = _canonical.canonical_json_basic


def bind(codec: ModuleType) -> Callable[[Any], Any]:
    """Configure the extension with ``codec`` (``pipeline.codec``) and return its ``decode_item``."""
    _decode.configure(codec._create_decimal, codec.decode_value, codec._decode_attributes, codec.decode_item,
                      codec.MAX_NESTING_DEPTH)
    return _decode.decode_item
