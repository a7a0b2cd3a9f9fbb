"""Builds a sink's shaping (tables, filter, transforms) from its configuration, with one-line
errors naming the sink and the bad part; :func:`pipeline.registry.build_sinks` calls it, so the
worker, ``config check``, replays, redrives and reindex all apply the sink's current shaping."""

from __future__ import annotations

from typing import Any

from pipeline.config import SinkConfig
from pipeline.errors import ConfigError, FilterPatternError
from pipeline.shaping.pattern import compile_filter
from pipeline.shaping.sink import ShapedSink
from pipeline.shaping.transforms import Transform, build_transform


def has_shaping(cfg: SinkConfig) -> bool:
    """True when the sink configures ``tables``, ``filter`` or ``transforms``."""
    return bool(cfg.tables) or cfg.filter is not None or bool(cfg.transforms)


def shaping_problems_and_parts(cfg: SinkConfig, label: str) -> tuple[list[str], dict[str, Any]]:
    """``(problems, parts)``: one line per problem (``{label}: filter.dynamodb.NewImage.x: ...``,
    ``{label}: transforms[1] (redact): paths: ...``) and the built parts
    (``tables``, ``filter``, ``transforms``) for :class:`ShapedSink`."""
    problems: list[str] = []
    parts: dict[str, Any] = {"tables": list(cfg.tables), "filter": None, "transforms": []}
    if cfg.filter is not None:
        try:
            parts["filter"] = compile_filter(cfg.filter)
        except FilterPatternError as exc:
            at = exc.where if exc.where.startswith("[") or not exc.where else f".{exc.where}"
            problems.append(f"{label}: filter{at}: {exc.message}")
    transforms: list[Transform] = []
    for index, spec in enumerate(cfg.transforms):
        type_name = spec.get("type") if isinstance(spec, dict) else None
        where = f"{label}: transforms[{index}]" + (f" ({type_name})" if isinstance(type_name, str) else "")
        try:
            transforms.append(build_transform(spec))
        except ConfigError as exc:
            problems.extend(f"{where}: {p}" for p in exc.problems)
    parts["transforms"] = transforms
    return problems, parts


def shape(sink: Any, parts: dict[str, Any]) -> ShapedSink:
    """``sink`` wrapped in a :class:`ShapedSink` with the built ``parts``."""
    return ShapedSink(sink, tables=parts["tables"], filter=parts["filter"], transforms=parts["transforms"])
