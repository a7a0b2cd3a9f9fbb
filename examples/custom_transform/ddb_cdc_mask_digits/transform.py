"""``mask_digits``: all but the last ``keep`` digits of string attributes at ``paths`` become ``*``.

A transform plugin is a :class:`pipeline.shaping.transforms.Transform` subclass with a pydantic
``Options`` model, registered under the entry-point group ``ddb_cdc.transforms``. ``apply`` must
be a pure function of the event (a retried batch is transformed again) and must not change keys.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field

from pipeline.events import ChangeEvent
from pipeline.shaping.transforms import Transform, TransformOptions, with_images


class MaskDigitsOptions(TransformOptions):
    """``paths``: dotted attribute paths (maps only); ``keep``: digits left visible at the end."""

    paths: list[str] = Field(min_length=1)
    keep: int = Field(4, ge=0, le=32)


def mask(text: str, keep: int) -> str:
    """``text`` with every digit but the last ``keep`` replaced by ``*`` (other characters kept)."""
    digits = sum(ch.isdigit() for ch in text)
    hide = max(0, digits - keep)
    out = []
    for ch in text:
        if ch.isdigit() and hide > 0:
            out.append("*")
            hide -= 1
        else:
            out.append(ch)
    return "".join(out)


class MaskDigits(Transform):
    Options = MaskDigitsOptions
    type_name = "mask_digits"

    def apply(self, event: ChangeEvent) -> ChangeEvent | None:
        paths = [p.split(".") for p in self.options.paths if p.split(".")[0] not in event.keys]
        before = _masked(event.before, paths, self.options.keep)
        after = _masked(event.after, paths, self.options.keep)
        if before is event.before and after is event.after:
            return event
        return with_images(event, before=before, after=after)


def _masked(image: Mapping[str, Any] | None, paths: list[list[str]], keep: int) -> Mapping[str, Any] | None:
    if image is None:
        return None
    out: Any = image
    for parts in paths:
        out = _at(out, parts, keep)
    return out


def _at(node: Mapping[str, Any], parts: list[str], keep: int) -> Mapping[str, Any]:
    value = node.get(parts[0])
    if len(parts) == 1:
        if not isinstance(value, str):
            return node
        return {**node, parts[0]: mask(value, keep)}
    if not isinstance(value, Mapping):
        return node
    new = _at(value, parts[1:], keep)
    return node if new is value else {**node, parts[0]: new}
