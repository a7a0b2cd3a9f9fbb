"""Redis cache invalidation sink: delete the cache keys a change makes stale.

Each change is matched against ``key_templates`` such as ``"user:{pk}"``, ``"order:{pk}:{sk}"``
or ``"email:{email}"``. A template is rendered once against the old image (``event.before``) and
once against the new image (``event.after``), each with the item's key attributes
(``event.keys``) merged in, so a change that moves an item from one cache key to another (a
changed e-mail address) invalidates both. Rendered keys are deleted (``DEL``) and, when
``channel`` is set, each is also announced with ``PUBLISH channel key`` for subscribers that keep
local caches.

Rendering one placeholder value (a documented choice; keep the application's cache keys in the
same form):

- S → the string as is; BOOL → ``true`` / ``false``;
- N (Decimal) → integers as plain digits without exponent (``Decimal("1E+3")`` → ``1000``);
  other numbers as ``str()`` of the value with trailing zeros trimmed (``1.50`` → ``1.5``,
  matching DynamoDB, which trims leading and trailing zeros of numbers — DynamoDB developer
  guide, "Data types", Number);
- B (bytes) → standard base64 with padding (RFC 4648 §4);
- NULL, M, L, SS, NS, BS → not a key part: the template is skipped for that image;
- a placeholder whose attribute is missing from the image (and keys) → skipped for that image,
  not an error. With neither image (KEYS_ONLY streams) templates are rendered against the keys
  alone.

Delivery: one pipeline (``transaction=False``) per batch with the batch's keys deduplicated in
first-seen order. DEL of a missing key is a no-op, so a replayed batch gives the same end state.
Writes are applied synchronously in ``write``; ``flush`` has nothing left to do. How durable the
deletions are is Redis's own business (its persistence and replication settings); for a cache,
losing a deletion on a Redis crash loses the cached value too, unless the cache was persisted.
"""

from __future__ import annotations

import base64
import string
from dataclasses import dataclass
from decimal import Context, Decimal
from typing import Any, Mapping, Sequence

import redis
from pydantic import Field, field_validator
from redis import exceptions as rex
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from pipeline.errors import FatalSinkError, RetriableSinkError, SinkError
from pipeline.events import Batch, ChangeEvent, Operation
from pipeline.redact import redact_message, redact_url  # re-exported: connectors.redis_cache.redact_url
from pipeline.sink import Sink, SinkContext, SinkOptions

_URL_SCHEMES = ("redis://", "rediss://", "unix://")

#: redis-py's own retry of a command on a connection error / timeout, before the sink gives up
#: with RetriableSinkError and leaves the longer backoff to the fan-out: 2 retries, 50–500 ms.
_CLIENT_RETRY_ATTEMPTS = 2


@dataclass(frozen=True)
class KeyTemplate:
    """A parsed key template: literal text and ``{name}`` placeholders, in order.

    ``parts`` is a tuple of ``(literal, field_name_or_None)`` as :meth:`string.Formatter.parse`
    yields them (``{{`` / ``}}`` are literal braces). ``fields`` are the placeholder names.
    """

    text: str
    parts: tuple[tuple[str, str | None], ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.parts if name is not None)

    def render(self, values: Mapping[str, Any]) -> str | None:
        """The key for ``values`` (attribute name → decoded value), or None when a placeholder's
        attribute is missing or not renderable (see :func:`render_key_part`)."""
        out: list[str] = []
        for literal, name in self.parts:
            out.append(literal)
            if name is None:
                continue
            if name not in values:
                return None
            text = render_key_part(values[name])
            if text is None:
                return None
            out.append(text)
        return "".join(out)


def parse_key_template(template: str) -> KeyTemplate:
    """Parse and check one key template; only simple ``{name}`` placeholders are allowed.

    Raises ValueError naming the template for: an empty template, unbalanced braces, positional
    fields (``{}``, ``{0}``), attribute / index access (``{a.b}``, ``{a[0]}``), conversions
    (``{a!r}``) and format specs (``{a:>5}``). A template without placeholders is allowed and names
    one fixed key, invalidated by every change.
    """
    if not isinstance(template, str) or not template:
        raise ValueError(f"key template {template!r} is empty")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"key template {template!r} is invalid: {exc}") from None
    parts: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is None:
            parts.append((literal, None))
            continue
        if name == "" or name.isdigit():
            problem = "positional fields like {} or {0} are not allowed; name an attribute"
        elif any(c in name for c in ".[]"):
            problem = f"placeholder {{{name}}} uses attribute/index access; only {{name}} is allowed"
        elif conversion:
            problem = f"placeholder {{{name}!{conversion}}} has a conversion; only {{name}} is allowed"
        elif spec:
            problem = f"placeholder {{{name}:{spec}}} has a format spec; only {{name}} is allowed"
        else:
            parts.append((literal, name))
            continue
        raise ValueError(f"key template {template!r} is invalid: {problem}")
    return KeyTemplate(text=template, parts=tuple(parts))


def render_key_part(value: Any) -> str | None:
    """One decoded attribute value as key text, or None when it cannot be a key part.

    str → as is; bool → ``true``/``false``; Decimal / int → canonical decimal text (integers
    without exponent, others trimmed of trailing zeros); bytes → base64. None (NULL), maps, lists
    and sets → None.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return None


def _decimal_text(value: Decimal) -> str | None:
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    digits = max(len(value.as_tuple().digits), 1)
    return str(value.normalize(Context(prec=digits)))  # exact: precision covers every digit


class RedisCacheOptions(SinkOptions):
    """Options of the ``redis_cache`` sink (``sinks[].options``).

    - ``url``: ``redis://[[user]:password@]host:port/db``, ``rediss://`` (TLS) or
      ``unix:///path`` (required; redis-py's ``Redis.from_url`` syntax). Passwords are never
      shown in messages.
    - ``key_templates``: non-empty list of templates with ``{attribute}`` placeholders, e.g.
      ``["user:{pk}", "order:{pk}:{sk}", "email:{email}"]`` (checked by
      :func:`parse_key_template`; a bad template is a validation error naming it) — or, when the
      worker reads several tables, a mapping from table name to such a list, with ``"*"`` for
      every other table: ``{"users": ["user:{pk}"], "orders": ["order:{pk}:{sk}"]}``. A table
      with no entry and no ``"*"`` invalidates nothing.
    - ``channel``: when set, ``PUBLISH channel <key>`` for every deleted key.
    - ``socket_timeout_s``: connect and command timeout in seconds (default 5).
    - ``snapshot_invalidate``: also invalidate the keys of SNAPSHOT events (a ``ddb-cdc
      snapshot`` / ``source.initial_snapshot`` backfill). Default false: a snapshot reads items
      as they already are, so their cached values are not stale, and deleting a key for every
      item of a large table would empty the cache for nothing (a storm of misses on the table).
      Set it when the cache may hold values from before a gap in the stream.
    """

    url: str = Field(min_length=1)
    key_templates: list[str] | dict[str, list[str]] = Field(min_length=1)
    channel: str | None = None
    socket_timeout_s: float = Field(default=5.0, gt=0)
    snapshot_invalidate: bool = False

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(_URL_SCHEMES):
            raise ValueError(f"url {redact_url(value)!r} must start with redis://, rediss:// or unix://")
        return value

    @field_validator("key_templates")
    @classmethod
    def _valid_templates(cls, value: list[str] | dict[str, list[str]]) -> list[str] | dict[str, list[str]]:
        lists = value.values() if isinstance(value, dict) else [value]
        for templates in lists:
            for template in templates:
                parse_key_template(template)
        return value

    @field_validator("channel")
    @classmethod
    def _non_empty_channel(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("channel must not be empty (leave it out to publish nothing)")
        return value


class RedisCacheSink(Sink):
    """Delete the Redis keys named by ``key_templates`` for every change (see the module doc).

    Errors:

    - ``open``: ``FatalSinkError`` (one line, password hidden) when PING fails: server not
      reachable, wrong credentials, TLS problems.
    - ``write``: ``RetriableSinkError`` for connection errors, timeouts, a loading / read-only
      (failing-over) server and TRYAGAIN / CLUSTERDOWN; ``FatalSinkError`` for authentication
      and ACL errors (WRONGPASS / NOAUTH / NOPERM) and other command errors.
    """

    Options = RedisCacheOptions
    renders_wire_form = True  # decodes only the attributes its templates name (event.attributes)
    options: RedisCacheOptions

    def __init__(self, name: str, options: RedisCacheOptions | None = None):
        super().__init__(name, options)  # options=None → validation error for the required fields
        configured = self.options.key_templates
        by_table = configured if isinstance(configured, dict) else {"*": configured}
        self.templates_by_table: dict[str, tuple[KeyTemplate, ...]] = {
            table: tuple(parse_key_template(t) for t in templates) for table, templates in by_table.items()
        }
        self.templates: tuple[KeyTemplate, ...] = self.templates_by_table.get("*", ())
        self._client: redis.Redis | None = None
        self.invalidated = 0  # keys deleted so far (for metrics and tests)
        self._names_cache: dict[int, tuple[Sequence[KeyTemplate], tuple[str, ...]]] = {}

    def open(self, context: SinkContext) -> None:
        """Connect and PING. Raises FatalSinkError when Redis cannot be used."""
        super().open(context)
        url = self.options.url
        timeout = self.options.socket_timeout_s
        try:
            client = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(EqualJitterBackoff(cap=0.5, base=0.05), _CLIENT_RETRY_ATTEMPTS),
            )
        except (ValueError, rex.RedisError) as exc:
            raise FatalSinkError(
                f"sink {self.name!r}: Redis url {redact_url(url)!r} is not usable ({redact_message(str(exc))}): fix sinks[].options.url"
            ) from None
        try:
            client.ping()
        except (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError, rex.NoPermissionError) as exc:
            client.close()
            raise FatalSinkError(
                f"Redis at {redact_url(url)} refused the credentials ({type(exc).__name__}: {exc}): "
                "fix the user/password in sinks[].options.url"
            ) from None
        except (rex.RedisError, OSError) as exc:
            client.close()
            raise FatalSinkError(
                f"Redis at {redact_url(url)} not reachable ({type(exc).__name__}: {exc}): "
                "start it or fix sinks[].options.url"
            ) from None
        self._client = client

    def close(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def keys_for(self, event: ChangeEvent) -> list[str]:
        """The cache keys this change invalidates, deduplicated in order.

        For each template (in configuration order), rendered against the old image then the new
        image, each merged with ``event.keys``; with neither image, against the keys alone.
        """
        templates = self.templates_by_table.get(event.source.table, self.templates)
        names = self._template_names(templates)
        # only the attributes the templates name are decoded (issue 16), not the whole images
        images = [img for img in (event.attributes("before", names), event.attributes("after", names))
                  if img is not None] or [{}]
        merged = [{**img, **event.keys} for img in images]
        keys: list[str] = []
        seen: set[str] = set()
        for template in templates:
            for values in merged:
                key = template.render(values)
                if key is not None and key not in seen:
                    seen.add(key)
                    keys.append(key)
        return keys

    def _template_names(self, templates: Sequence[KeyTemplate]) -> tuple[str, ...]:
        """Every attribute name ``templates`` use, in first-use order (cached per template list)."""
        cache = self._names_cache
        names = cache.get(id(templates))
        if names is None or names[0] is not templates:
            ordered = dict.fromkeys(name for template in templates for name in template.fields)
            names = cache[id(templates)] = (templates, tuple(ordered))
        return names[1]

    def write(self, batch: Batch) -> None:
        """DEL (and PUBLISH) every key of the batch in one non-transactional pipeline.

        Raises RetriableSinkError / FatalSinkError as described on the class.
        """
        keys: list[str] = []
        seen: set[str] = set()
        for event in batch.events:
            if event.operation is Operation.SNAPSHOT and not self.options.snapshot_invalidate:
                continue  # see RedisCacheOptions.snapshot_invalidate
            for key in self.keys_for(event):
                if key not in seen:
                    seen.add(key)
                    keys.append(key)
        if not keys:
            return
        if self._client is None:
            raise FatalSinkError(f"sink {self.name!r}: write before open()")
        channel = self.options.channel
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
            if channel is not None:
                pipe.publish(channel, key)
        try:
            pipe.execute()
        except (rex.RedisError, OSError) as exc:
            raise self._classify(exc, len(keys)) from exc
        finally:
            pipe.reset()
        self.invalidated += len(keys)

    def flush(self) -> None:
        """Nothing to do: ``write`` applies the deletions before it returns."""

    def _classify(self, exc: BaseException, count: int) -> SinkError:
        where = f"Redis at {redact_url(self.options.url)}"
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError,
                            rex.NoPermissionError)):
            return FatalSinkError(f"{where} refused the invalidation of {count} keys ({text}): "
                                  "fix the user/password/ACL in sinks[].options.url")
        retriable = (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.TryAgainError,
                     rex.ClusterDownError, rex.MasterDownError, OSError)
        if isinstance(exc, retriable) or not isinstance(exc, rex.ResponseError):
            return RetriableSinkError(f"invalidation of {count} keys at {where} failed, will retry ({text})")
        return FatalSinkError(f"{where} rejected the invalidation of {count} keys ({text})")
