"""Sink types: the built-ins plus classes registered under the entry-point group ``ddb_cdc.sinks``.

A plugin distribution registers its class in its own ``pyproject.toml``::

    [project.entry-points."ddb_cdc.sinks"]
    jsonl_file = "my_package.sink:JsonlFileSink"

and a configuration selects it with ``type: jsonl_file``. Each sink's ``options`` mapping is
validated by the class's ``Options`` pydantic model before anything starts; errors name the
sink and the field.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Sequence

from pydantic import ValidationError

from pipeline.config import SinkConfig, validation_lines
from pipeline.errors import ConfigError

ENTRY_POINT_GROUP = "ddb_cdc.sinks"

#: Built-in sinks by type name, as ``module:Class`` so nothing is imported until used.
BUILTIN_SINKS: dict[str, str] = {
    "opensearch": "connectors.opensearch.sink:OpenSearchSink",
    "s3_audit": "connectors.s3.audit:S3AuditSink",
    "redis_cache": "connectors.redis_cache:RedisCacheSink",
}


def available_sink_types() -> dict[str, str]:
    """Every known type name → ``module:Class`` (built-ins, then installed plugins)."""
    found = dict(BUILTIN_SINKS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def load_sink_class(type_name: str) -> type:
    """The class for ``type_name``. Raises ConfigError (one line) if unknown or not importable."""
    types = available_sink_types()
    target = types.get(type_name)
    if target is None:
        known = ", ".join(sorted(types))
        raise ConfigError([f"unknown sink type {type_name!r}; known types: {known} "
                           f"(plugins register under the entry-point group {ENTRY_POINT_GROUP!r})"])
    module_name, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # an installed plugin that fails to import
        raise ConfigError([f"sink type {type_name!r}: cannot load {target} ({type(exc).__name__}: {exc}); "
                           "reinstall the plugin or fix its entry point"]) from None
    return obj


def build_sinks(configs: Sequence[SinkConfig], where: str = "config") -> list[Any]:
    """Instantiate every configured sink with validated options; a sink that configures
    ``tables`` / ``filter`` / ``transforms`` comes wrapped in a
    :class:`pipeline.shaping.sink.ShapedSink` (its ``wrapped`` is the sink itself).

    Raises ConfigError listing every problem (one line each, naming ``sinks[i] (name)`` and the
    field), so a user sees all mistakes at once.
    """
    from pipeline.shaping.build import has_shaping, shape, shaping_problems_and_parts

    problems: list[str] = []
    sinks = []
    for index, cfg in enumerate(configs):
        label = f"sinks[{index}] ({cfg.name}, type {cfg.type})"
        try:
            cls = load_sink_class(cfg.type)
        except ConfigError as exc:
            problems.extend(f"{where}: {label}: {p}" for p in exc.problems)
            continue
        options_model = getattr(cls, "Options", None)
        try:
            options = options_model.model_validate(cfg.options) if options_model is not None else cfg.options
        except ValidationError as exc:
            problems.extend(validation_lines(exc, f"{where}: {label}", prefix="options."))
            continue
        shaping = None
        if has_shaping(cfg):
            shaping_problems, shaping = shaping_problems_and_parts(cfg, f"{where}: {label}")
            if shaping_problems:
                problems.extend(shaping_problems)
                continue
        try:
            sink = cls(cfg.name, options)
        except Exception as exc:
            problems.append(f"{where}: {label}: cannot create the sink ({type(exc).__name__}: {exc})")
            continue
        sinks.append(shape(sink, shaping) if shaping is not None else sink)
    if problems:
        raise ConfigError(problems)
    return sinks
