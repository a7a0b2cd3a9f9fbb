"""Transforms: change (or drop) a change event for one sink, applied in order after the filter.

Built-ins (``sinks[].transforms`` entries, ``type`` plus the options of that type):

- ``drop_ttl_deletes`` — drop REMOVEs done by DynamoDB's TTL process (``source.ttl_delete``;
  DynamoDB developer guide, "DynamoDB Streams and Time to Live").
- ``include`` ``paths: [a, b.c]`` — keep only these attributes (dotted paths into maps) in
  ``before`` and ``after`` alike; key attributes are always kept.
- ``exclude`` ``paths: [card.number]`` — remove these attributes from ``before`` and ``after``.
- ``redact`` ``paths: [...]``, ``mode: hmac | mask`` — replace each value with
  ``"hmac-sha256:<64 hex>"``, the HMAC-SHA-256 (RFC 2104, Python's :mod:`hmac`) under a secret key
  (``hmac_key``, or the environment variable named by ``hmac_key_env``) of the value's canonical
  AttributeValue JSON (sorted keys, so ``"5"`` and ``5`` differ and equal values give equal
  digests — **hmac keeps equality joins possible** across sinks that share the key, without
  revealing the value), or with the fixed text ``mask`` (default ``"***"``: nothing can be joined).
- ``rename`` ``fields: {old.path: new_name}`` — rename an attribute (the last path segment) in
  ``before`` and ``after``.

**Keys are never changed by a transform.** ``keys`` and ``key_id`` are not reachable by a path
(a path starting with ``keys`` or ``key_id`` is refused at ``config check``), a key attribute
inside an image is never excluded, redacted or renamed (the transform skips it and logs once),
and :class:`pipeline.shaping.sink.ShapedSink` checks every transform's result: an event whose
keys, ``key_id`` or key attributes changed is dead-lettered, never delivered.

Plugins: a class registered under the entry-point group ``ddb_cdc.transforms`` (like sinks under
``ddb_cdc.sinks``), subclassing :class:`Transform` with a pydantic ``Options`` model
(:class:`TransformOptions`)::

    [project.entry-points."ddb_cdc.transforms"]
    truncate = "my_package.transforms:Truncate"

``pipeline.testing.check_transform`` runs one on sample events.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import os
from dataclasses import fields, is_dataclass, replace
from importlib.metadata import entry_points
from typing import Any, ClassVar, Iterable, Literal, Mapping

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipeline.codec import encode_value
from pipeline.errors import ConfigError
from pipeline.events import ChangeEvent

ENTRY_POINT_GROUP = "ddb_cdc.transforms"
#: Path heads that address the event's envelope, not an image: never a transform's target.
KEY_FIELDS = ("keys", "key_id")


class TransformOptions(BaseModel):
    """Base of a transform's options model: unknown keys are errors; messages never echo input."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class Transform:
    """Base class. ``type_name`` is the configured ``type``; ``options`` the validated ``Options``.

    Override :meth:`apply`. It gets one event and returns a new event (``with_images`` helps), the
    same event, or None to drop it for this sink (counted as filtered; the checkpoint moves). It
    must be a pure function of the event and the options (a retried batch is transformed again),
    must not change ``keys`` / ``key_id`` / key attributes, and may raise for an event it cannot
    handle: that event is dead-lettered with the error, the others go on.
    """

    Options: ClassVar[type[TransformOptions]] = TransformOptions
    type_name: ClassVar[str] = ""

    def __init__(self, options: TransformOptions | None = None):
        self.options = options if options is not None else self.Options()
        self.warned_keys: set[str] = set()

    def apply(self, event: ChangeEvent) -> ChangeEvent | None:  # pragma: no cover - overridden
        return event

    def describe(self) -> dict[str, Any]:
        """JSON-safe, secret-free description (the S3 audit sink writes it on each line)."""
        data = self.options.model_dump(mode="json", exclude=_secret_fields(self.options))
        return {"type": self.type_name or type(self).__name__, **data}


def _secret_fields(options: BaseModel) -> set[str]:
    """Fields holding a secret (a ``SecretStr`` value, or declared as one): never described."""
    fields = type(options).model_fields
    return {name for name, value in options
            if isinstance(value, SecretStr) or "SecretStr" in str(fields[name].annotation)}


def with_images(event: ChangeEvent, *, before: Mapping[str, Any] | None,
                after: Mapping[str, Any] | None) -> ChangeEvent:
    """A copy of ``event`` with new ``before`` / ``after`` (everything else unchanged). An event
    type that keeps its raw images offers ``with_images`` itself (so they are dropped or redone)."""
    method = getattr(event, "with_images", None)
    if callable(method):
        return method(before=before, after=after)
    changes: dict[str, Any] = {"before": before, "after": after}
    # An event that preserves its raw AttributeValue maps must not keep the old ones next to the
    # transformed images (a sink rendering the raw map would undo a redact): drop them.
    names = {f.name: f for f in fields(event)} if is_dataclass(event) else {}
    for raw, image, new in (("raw_old_image", "before", before), ("raw_new_image", "after", after)):
        field_ = names.get(raw)
        if field_ is not None and field_.init and new is not getattr(event, image):
            changes[raw] = None
    return replace(event, **changes)


# -- paths --------------------------------------------------------------------------------------


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def _validate_paths(paths: list[str]) -> list[str]:
    if not paths:
        raise ValueError("give at least one path")
    for path in paths:
        parts = path.split(".")
        if not path or any(not p for p in parts):
            raise ValueError(f"path {path!r} is empty or has an empty segment (use a.b.c)")
        if parts[0] in KEY_FIELDS:
            raise ValueError(f"path {path!r}: keys and key_id are never changed by a transform")
    return paths


def _tree(paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """Paths as a nested dict; a leaf (whole attribute) is ``True``."""
    root: dict[str, Any] = {}
    for parts in paths:
        node = root
        for i, part in enumerate(parts):
            if i == len(parts) - 1:
                node[part] = True
            else:
                child = node.get(part)
                if child is True:
                    break  # the whole parent is already named
                node = node.setdefault(part, {})
    return root


class _PathTransform(Transform):
    """A transform over dotted attribute paths of both images, never touching key attributes."""

    def _top_names(self) -> set[str]:
        return {p.split(".")[0] for p in getattr(self.options, "paths", [])}

    def _guard_keys(self, event: ChangeEvent, names: Iterable[str]) -> set[str]:
        """The names among ``names`` that are key attributes of this event's table (noted once)."""
        hit = {n for n in names if n in event.keys}
        self.warned_keys |= hit
        return hit

    def apply(self, event: ChangeEvent) -> ChangeEvent | None:
        protected = self._guard_keys(event, self._top_names())
        before = self._image(event.before, protected, event)
        after = self._image(event.after, protected, event)
        if before is event.before and after is event.after:
            return event
        return with_images(event, before=before, after=after)

    def _image(self, image: Mapping[str, Any] | None, protected: set[str],
               event: ChangeEvent) -> Mapping[str, Any] | None:  # pragma: no cover - overridden
        return image


class IncludeOptions(TransformOptions):
    """``paths``: attributes to keep (dotted paths into maps); key attributes are always kept."""

    paths: list[str]
    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        return _validate_paths(value)


class Include(_PathTransform):
    """Keep only ``paths`` (and the key attributes) in ``before`` and ``after``."""

    Options = IncludeOptions
    type_name = "include"

    def __init__(self, options: TransformOptions | None = None):
        super().__init__(options)
        self._keep = _tree(_split(p) for p in self.options.paths)

    def _top_names(self) -> set[str]:
        return set()

    def _image(self, image, protected, event):
        if image is None:
            return None
        out = {k: v for k, v in image.items() if k in event.keys}
        for name, spec in self._keep.items():
            if name in image and name not in out:
                pruned = _prune(image[name], spec)
                if pruned is not _ABSENT:
                    out[name] = pruned
        return out


_ABSENT = object()


def _prune(value: Any, spec: Any) -> Any:
    if spec is True:
        return value
    if not isinstance(value, Mapping):
        return _ABSENT
    out = {}
    for name, sub in spec.items():
        if name in value:
            pruned = _prune(value[name], sub)
            if pruned is not _ABSENT:
                out[name] = pruned
    return out if out else _ABSENT


class ExcludeOptions(TransformOptions):
    """``paths``: attributes to remove (dotted paths into maps)."""

    paths: list[str]
    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        return _validate_paths(value)


class Exclude(_PathTransform):
    """Remove ``paths`` from ``before`` and ``after``; key attributes stay."""

    Options = ExcludeOptions
    type_name = "exclude"

    def __init__(self, options: TransformOptions | None = None):
        super().__init__(options)
        self._drop = _tree(_split(p) for p in self.options.paths)

    def _image(self, image, protected, event):
        if image is None:
            return None
        spec = {k: v for k, v in self._drop.items() if k not in protected}
        return _map_paths(image, spec, lambda _v: _ABSENT)


def _map_paths(image: Mapping[str, Any], spec: Mapping[str, Any], fn) -> Mapping[str, Any]:
    """``image`` with ``fn(value)`` at every path of ``spec`` (``_ABSENT`` removes it); the same
    object when nothing changed."""
    changed = False
    out = dict(image)
    for name, sub in spec.items():
        if name not in out:
            continue
        value = out[name]
        if sub is True:
            new = fn(value)
        elif isinstance(value, Mapping):
            new = _map_paths(value, sub, fn)
        else:
            continue
        if new is _ABSENT:
            del out[name]
            changed = True
        elif new is not value:
            out[name] = new
            changed = True
    return out if changed else image


class RedactOptions(TransformOptions):
    """``paths`` to redact; ``mode`` ``hmac`` (default) or ``mask``; for hmac the key as
    ``hmac_key`` (a secret: never logged) or ``hmac_key_env`` (the name of an environment variable
    holding it, read when the sink is built); ``mask`` the replacement text for mode mask."""

    paths: list[str]
    mode: Literal["hmac", "mask"] = "hmac"
    hmac_key: SecretStr | None = None
    hmac_key_env: str | None = None
    mask: str = "***"
    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        return _validate_paths(value)

    @model_validator(mode="after")
    def _key(self) -> "RedactOptions":
        if self.mode == "hmac":
            if (self.hmac_key is None) == (self.hmac_key_env is None):
                raise ValueError("mode hmac needs exactly one of hmac_key or hmac_key_env (the name of an "
                                 "environment variable holding the key)")
            if self.hmac_key_env is not None and not os.environ.get(self.hmac_key_env):
                raise ValueError(f"hmac_key_env: the environment variable {self.hmac_key_env} is not set or empty")
            if self.hmac_key is not None and not self.hmac_key.get_secret_value():
                raise ValueError("hmac_key must not be empty")
        elif self.hmac_key is not None or self.hmac_key_env is not None:
            raise ValueError("hmac_key / hmac_key_env apply to mode hmac only")
        return self

    def key_bytes(self) -> bytes:
        if self.hmac_key is not None:
            return self.hmac_key.get_secret_value().encode("utf-8")
        return os.environ.get(self.hmac_key_env or "", "").encode("utf-8")


def hmac_text(key: bytes, value: Any) -> str:
    """``"hmac-sha256:" + hex`` of HMAC-SHA-256(key, canonical AttributeValue JSON of ``value``)."""
    canonical = orjson.dumps(encode_value(value), option=orjson.OPT_SORT_KEYS)
    return "hmac-sha256:" + hmac.new(key, canonical, hashlib.sha256).hexdigest()


class Redact(_PathTransform):
    """Replace the values at ``paths`` with a keyed HMAC or a fixed mask (see the module doc)."""

    Options = RedactOptions
    type_name = "redact"

    def __init__(self, options: TransformOptions | None = None):
        super().__init__(options)
        self._spec = _tree(_split(p) for p in self.options.paths)
        if self.options.mode == "hmac":
            key = self.options.key_bytes()
            self._fn = lambda value: hmac_text(key, value)
        else:
            mask = self.options.mask
            self._fn = lambda _value: mask

    def _image(self, image, protected, event):
        if image is None:
            return None
        spec = {k: v for k, v in self._spec.items() if k not in protected}
        return _map_paths(image, spec, self._fn)


class RenameOptions(TransformOptions):
    """``fields``: ``{old.path: new_name}`` — the attribute at ``old.path`` gets the name
    ``new_name`` in the same map."""

    fields: dict[str, str] = Field(min_length=1)

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: dict[str, str]) -> dict[str, str]:
        _validate_paths(list(value))
        for old, new in value.items():
            if not new or "." in new:
                raise ValueError(f"rename {old!r}: the new name {new!r} must be one non-empty segment (no dots)")
            if "." not in old and new in KEY_FIELDS:
                raise ValueError(f"rename {old!r} to {new!r}: keys and key_id are never changed by a transform")
        return value


class Rename(_PathTransform):
    """Rename attributes in ``before`` and ``after``; a key attribute is never renamed, and a
    top-level attribute is never renamed onto a key attribute's name."""

    Options = RenameOptions
    type_name = "rename"

    def _top_names(self) -> set[str]:
        names = set()
        for old, new in self.options.fields.items():
            names.add(old.split(".")[0])
            if "." not in old:
                names.add(new)
        return names

    def _image(self, image, protected, event):
        if image is None:
            return None
        out: Any = image
        for old, new in self.options.fields.items():
            parts = _split(old)
            if parts[0] in protected or (len(parts) == 1 and new in protected):
                continue
            out = _rename_at(out, parts, new)
        return out


def _rename_at(image: Mapping[str, Any], parts: tuple[str, ...], new: str) -> Mapping[str, Any]:
    if len(parts) == 1:
        if parts[0] not in image or parts[0] == new:
            return image
        out = {k: v for k, v in image.items() if k != parts[0]}
        out[new] = image[parts[0]]
        return out
    child = image.get(parts[0])
    if not isinstance(child, Mapping):
        return image
    renamed = _rename_at(child, parts[1:], new)
    if renamed is child:
        return image
    return {**image, parts[0]: renamed}


class DropTtlDeletes(Transform):
    """Drop REMOVEs done by DynamoDB's TTL process (``source.ttl_delete``)."""

    type_name = "drop_ttl_deletes"

    def apply(self, event: ChangeEvent) -> ChangeEvent | None:
        return None if event.source.ttl_delete else event


BUILTIN_TRANSFORMS: dict[str, type[Transform]] = {
    "drop_ttl_deletes": DropTtlDeletes,
    "include": Include,
    "exclude": Exclude,
    "redact": Redact,
    "rename": Rename,
}


def available_transform_types() -> dict[str, Any]:
    """Type name → class (built-ins) or ``module:Class`` (installed plugins, not yet imported)."""
    found: dict[str, Any] = dict(BUILTIN_TRANSFORMS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def load_transform_class(type_name: str) -> type[Transform]:
    """The class for ``type_name``. Raises ConfigError (one line) if unknown or not importable."""
    types = available_transform_types()
    target = types.get(type_name)
    if target is None:
        raise ConfigError([f"unknown transform type {type_name!r}; known types: {', '.join(sorted(types))} "
                           f"(plugins register under the entry-point group {ENTRY_POINT_GROUP!r})"])
    if isinstance(target, type):
        return target
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise ConfigError([f"transform type {type_name!r}: cannot load {target} ({type(exc).__name__}: {exc}); "
                           "reinstall the plugin or fix its entry point"]) from None
    if not (isinstance(obj, type) and issubclass(obj, Transform)):
        raise ConfigError([f"transform type {type_name!r}: {target} is not a pipeline.shaping.transforms.Transform "
                           "subclass"])
    return obj


def build_transform(spec: Mapping[str, Any]) -> Transform:
    """One transform from its configured mapping (``type`` plus that type's options).

    Raises ConfigError with one line per problem, fields named ``field`` (the caller prefixes
    where it is).
    """
    from pydantic import ValidationError

    from pipeline.config import validation_lines

    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise ConfigError(["each transform is a mapping with a 'type' (built-ins: "
                           f"{', '.join(BUILTIN_TRANSFORMS)})"])
    type_name = spec["type"]
    cls = load_transform_class(type_name)
    options = {k: v for k, v in spec.items() if k != "type"}
    try:
        validated = cls.Options.model_validate(options)
    except ValidationError as exc:
        raise ConfigError([line.split(": ", 1)[1].removeprefix("(top level): ")
                           for line in validation_lines(exc, "x")]) from None
    transform = cls(validated)
    transform.type_name = type_name  # type: ignore[misc]  # the configured name (descriptions, logs)
    return transform
