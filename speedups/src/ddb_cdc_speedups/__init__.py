"""ddb-cdc-speedups: an experiment (issue 16, item 3), not used by ddb-cdc.

``pipeline.codec.decode_item`` in C (:mod:`ddb_cdc_speedups._decode`). The extension holds no
decoding rules of its own beyond the fast shapes: it is bound to a codec module, whose number
context it uses and whose Python functions it calls for everything else (unusual values and every
error), so results and errors are the codec's::

    from pipeline import codec
    import ddb_cdc_speedups

    decode_item = ddb_cdc_speedups.bind(codec)
    decode_item({"pk": {"S": "a"}, "n": {"N": "1.50"}})  # {'pk': 'a', 'n': Decimal('1.50')}
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from ddb_cdc_speedups import _decode

__all__ = ["bind"]


def bind(codec: ModuleType) -> Callable[[Any], Any]:
    """Configure the extension with ``codec`` (``pipeline.codec``) and return its ``decode_item``."""
    _decode.configure(codec._create_decimal, codec.decode_value, codec._decode_attributes, codec.decode_item,
                      codec.MAX_NESTING_DEPTH)
    return _decode.decode_item
