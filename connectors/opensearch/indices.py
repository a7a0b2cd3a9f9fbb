"""Index versions, the write alias, the index template and the reindex marker of the OpenSearch sink.

Layout for an index name ``N`` (``options.index`` with ``{table}`` filled in):

- ``N`` is an **alias**; writes go to its write index. Searches use ``N`` and never see a
  version change.
- ``N-v1``, ``N-v2``, … are the concrete **index versions**; each one records the
  :class:`~connectors.opensearch.mapping.MappingSpec` it was created with in its mapping's
  ``_meta.ddb_cdc``, and the sink renders documents for that spec.
- ``ddb-cdc-N`` is the composable **index template** for ``N-v*``: the settings (the
  ``total_fields`` guard, the depth limit, ``index_settings``) and the mappings of the configured
  spec. Its priority is 100 + the length of ``N``, so for an index like ``orders-vip-v1`` the
  template of ``orders-vip`` outranks the one of ``orders`` (whose pattern ``orders-v*`` also
  matches it) and two templates never tie.
- While ``ddb-cdc opensearch reindex`` fills the next version, the template's ``_meta.reindex``
  says ``{"into": "N-v2", "from": "N-v1", "started_at": ...}``; every live sink re-reads it at
  most ``reindex_check_s`` apart and then writes each change to the alias *and* to ``into``.

Every function raises the opensearch-py exception of a failed request; the sink maps them to its
typed errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from connectors.opensearch.mapping import MappingSpec, MappingSpecError

#: Prefix of the index templates the sink manages.
TEMPLATE_PREFIX = "ddb-cdc-"
#: Base priority of those templates (plus the alias length).
TEMPLATE_PRIORITY_BASE = 100


def template_name(alias: str) -> str:
    """``orders`` → ``ddb-cdc-orders``."""
    return TEMPLATE_PREFIX + alias


def version_index(alias: str, version: int) -> str:
    """``("orders", 2)`` → ``orders-v2``."""
    return f"{alias}-v{version}"


def index_version(alias: str, index: str) -> int | None:
    """``("orders", "orders-v2")`` → 2; None for any other name."""
    m = re.fullmatch(re.escape(alias) + r"-v(\d+)", index)
    return int(m.group(1)) if m else None


@dataclass
class AliasState:
    """What stands behind the name ``alias``.

    ``kind``: ``missing`` (nothing), ``alias`` (an alias; ``indices`` behind it, ``write_index``
    the one writes go to) or ``index`` (a bare index of that name, e.g. from an older version
    that wrote without an alias). ``spec`` is the write index's recorded spec (None when it has
    none: not created by ddb-cdc).
    """

    alias: str
    kind: str
    write_index: str | None = None
    indices: list[str] = field(default_factory=list)
    spec: MappingSpec | None = None

    @property
    def version(self) -> int:
        """The write index's version number (0 when missing or bare)."""
        if self.write_index is None:
            return 0
        return index_version(self.alias, self.write_index) or 0


class IndexAdmin:
    """Template, alias and version operations for one sink, on an opensearch-py client."""

    def __init__(self, client: Any, *, sink_name: str):
        self.client = client
        self.sink_name = sink_name

    # -- template ----------------------------------------------------------------------------

    def template_body(self, alias: str, spec: MappingSpec, extra_settings: Mapping[str, Any] | None,
                      reindex: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The composable index template for ``alias``'s versions."""
        meta: dict[str, Any] = {"managed_by": "ddb-cdc", "sink": self.sink_name, "alias": alias}
        if reindex:
            meta["reindex"] = dict(reindex)
        return {
            "index_patterns": [f"{alias}-v*"],
            "priority": TEMPLATE_PRIORITY_BASE + len(alias),
            "template": {"settings": spec.settings(extra_settings), "mappings": spec.mappings()},
            "_meta": meta,
        }

    def get_template(self, alias: str) -> dict[str, Any] | None:
        """The stored template body for ``alias`` (None when there is none)."""
        found = self.client.indices.get_index_template(name=template_name(alias), ignore=404)
        if _is_404(found):
            return None
        for entry in found.get("index_templates", []):
            if entry.get("name") == template_name(alias):
                return entry.get("index_template")
        return None

    def ensure_template(self, alias: str, spec: MappingSpec, extra_settings: Mapping[str, Any] | None) -> bool:
        """Create or update the template so new versions get ``spec``; keeps a reindex marker.

        Returns True when it was written (absent or different), False when it already matched.
        """
        current = self.get_template(alias)
        marker = ((current or {}).get("_meta") or {}).get("reindex")
        wanted = self.template_body(alias, spec, extra_settings, reindex=marker)
        if current is not None and _same_template(current, wanted):
            return False
        self.client.indices.put_index_template(name=template_name(alias), body=wanted)
        return True

    def create_template_if_absent(self, alias: str, spec: MappingSpec,
                                  extra_settings: Mapping[str, Any] | None) -> bool:
        """Create the template when there is none (True); leave an existing one alone (False).

        What the sink does on first use: a worker never rewrites a template, so workers running
        with different configurations (e.g. during a reindex) cannot undo each other; only
        ``ddb-cdc opensearch reindex`` updates it (:meth:`ensure_template`).
        """
        if self.get_template(alias) is not None:
            return False
        self.client.indices.put_index_template(name=template_name(alias), body=self.template_body(
            alias, spec, extra_settings), create=True, ignore=400)
        return True

    def reindex_marker(self, alias: str) -> dict[str, Any] | None:
        """The template's ``_meta.reindex`` (``{"into", "from", "started_at"}``) or None."""
        current = self.get_template(alias)
        marker = ((current or {}).get("_meta") or {}).get("reindex")
        return dict(marker) if isinstance(marker, Mapping) and marker.get("into") else None

    def set_reindex_marker(self, alias: str, marker: Mapping[str, Any] | None) -> None:
        """Write (or, with None, remove) the reindex marker, keeping the rest of the template."""
        current = self.get_template(alias)
        if current is None:
            raise LookupError(f"index template {template_name(alias)!r} does not exist")
        body = {k: v for k, v in current.items() if k in ("index_patterns", "priority", "template", "_meta",
                                                         "composed_of", "version")}
        meta = dict(body.get("_meta") or {})
        if marker:
            meta["reindex"] = dict(marker)
        else:
            meta.pop("reindex", None)
        body["_meta"] = meta
        self.client.indices.put_index_template(name=template_name(alias), body=body)

    # -- aliases and versions ----------------------------------------------------------------

    def state(self, alias: str) -> AliasState:
        """What the name ``alias`` is now (see :class:`AliasState`)."""
        found = self.client.indices.get(index=alias, ignore=404)
        if _is_404(found):
            return AliasState(alias, "missing")
        if alias in found:
            return AliasState(alias, "index", write_index=alias, indices=[alias], spec=_spec_of(found[alias]))
        indices = sorted(found)
        write = None
        for name, info in found.items():
            flags = (info.get("aliases") or {}).get(alias) or {}
            if flags.get("is_write_index"):
                write = name
        if write is None and len(indices) == 1:
            write = indices[0]
        spec = _spec_of(found[write]) if write else None
        return AliasState(alias, "alias", write_index=write, indices=indices, spec=spec)

    def index_spec(self, index: str) -> MappingSpec | None:
        """The spec recorded by ``index`` (None when it has none)."""
        found = self.client.indices.get_mapping(index=index)
        info = found.get(index) or next(iter(found.values()), {})
        return _spec_of(info)

    def create_version(self, alias: str, version: int, *, as_write_index: bool,
                       settings: Mapping[str, Any] | None = None) -> str:
        """Create ``alias-v{version}`` (the template supplies settings and mappings).

        With ``as_write_index`` the alias is added in the same request (first version). Returns
        the index name. Raises the client's error, e.g. ``resource_already_exists_exception``.
        """
        name = version_index(alias, version)
        body: dict[str, Any] = {}
        if as_write_index:
            body["aliases"] = {alias: {"is_write_index": True}}
        if settings:
            body["settings"] = dict(settings)
        self.client.indices.create(index=name, body=body)
        return name

    def swap(self, alias: str, new_index: str, state: AliasState) -> None:
        """Point ``alias`` at ``new_index`` in one atomic ``_aliases`` request.

        From an alias: remove it from every index behind it, add it to ``new_index`` as the write
        index. From a bare index named like the alias: delete that index and add the alias in the
        same request (``remove_index``).
        """
        actions: list[dict[str, Any]] = []
        if state.kind == "index":
            actions.append({"remove_index": {"index": alias}})
        else:
            actions.extend({"remove": {"index": idx, "alias": alias}} for idx in state.indices if idx != new_index)
        actions.append({"add": {"index": new_index, "alias": alias, "is_write_index": True}})
        self.client.indices.update_aliases(body={"actions": actions})

    def count(self, index: str) -> int:
        """Documents in ``index`` after a refresh."""
        self.client.indices.refresh(index=index)
        return int(self.client.count(index=index)["count"])

    def gc_deletes(self, name: str) -> dict[str, str | None]:
        """Concrete index → its explicitly set ``index.gc_deletes`` (None: not set, so OpenSearch's
        default 60 s applies) for the index or alias ``name``; ``{}`` when ``name`` does not exist."""
        # all settings, not ``name="index.gc_deletes"``: filtered, an index without the setting may be
        # left out of the answer altogether (osmem does), and would then never be raised
        found = self.client.indices.get_settings(index=name, ignore=404)
        if _is_404(found) or not isinstance(found, Mapping):
            return {}
        out: dict[str, str | None] = {}
        for index, info in found.items():
            value = (((info or {}).get("settings") or {}).get("index") or {}).get("gc_deletes")
            out[index] = str(value) if value is not None else None
        return out

    def raise_gc_deletes(self, name: str, wanted: str) -> dict[str, str | None]:
        """Raise ``index.gc_deletes`` to ``wanted`` on every concrete index behind ``name`` whose
        value is lower (unset counts as OpenSearch's default, 60 s); never lowers it.

        Returns concrete index → the value it had before (None: unset) for the indices changed,
        for :meth:`restore_gc_deletes`. Raises ValueError for a ``wanted`` that is not a time value.
        """
        want_ms = duration_ms(wanted)
        changed: dict[str, str | None] = {}
        for index, current in self.gc_deletes(name).items():
            if duration_ms(current or DEFAULT_GC_DELETES) >= want_ms:
                continue
            self.client.indices.put_settings(index=index, body={"index": {"gc_deletes": wanted}})
            changed[index] = current
        return changed

    def restore_gc_deletes(self, raised: Mapping[str, str | None], wanted: str) -> list[str]:
        """Put back what :meth:`raise_gc_deletes` changed (None → unset). An index whose value is no
        longer ``wanted`` (someone else changed it meanwhile) or that is gone is left alone.
        Returns the indices restored."""
        done: list[str] = []
        for index, previous in raised.items():
            current = self.gc_deletes(index).get(index, "<gone>")
            if current != wanted:
                continue
            self.client.indices.put_settings(index=index, body={"index": {"gc_deletes": previous}})
            done.append(index)
        return done

    def ids(self, index: str) -> set[str]:
        """Every document ``_id`` in ``index`` (scrolled, ``_source`` off)."""
        from opensearchpy.helpers import scan

        self.client.indices.refresh(index=index)
        return {hit["_id"] for hit in scan(self.client, index=index, query={"query": {"match_all": {}}},
                                          _source=False, size=1000)}


#: OpenSearch's default ``index.gc_deletes``: "The length of time that a deleted document's version
#: number remains available for further versioned operations. Default is 60s" (OpenSearch
#: documentation, Index settings; Elasticsearch reference, Delete API, "Versioning").
DEFAULT_GC_DELETES = "60s"

def duration_ms(text: str) -> float:
    """An OpenSearch time value in milliseconds (:func:`pipeline.replay.stream.time_value_ms`)."""
    from pipeline.replay.stream import time_value_ms

    return time_value_ms(text)


def _is_404(response: Any) -> bool:
    """An ``ignore=404`` answer: opensearch-py returns the error body instead of raising."""
    return isinstance(response, Mapping) and response.get("status") == 404 and "error" in response


def _spec_of(info: Mapping[str, Any]) -> MappingSpec | None:
    meta = ((info.get("mappings") or {}).get("_meta") or {}).get("ddb_cdc")
    if meta is None:
        return None
    try:
        return MappingSpec.from_meta(meta)
    except MappingSpecError:
        return None


def _same_template(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Do two template bodies agree on patterns, priority, the spec digest, settings and _meta?"""
    if list(current.get("index_patterns") or []) != wanted["index_patterns"]:
        return False
    if current.get("priority") != wanted["priority"]:
        return False
    if (current.get("_meta") or {}) != wanted["_meta"]:
        return False
    cur_t = current.get("template") or {}
    cur_meta = ((cur_t.get("mappings") or {}).get("_meta") or {}).get("ddb_cdc") or {}
    want_meta = wanted["template"]["mappings"]["_meta"]["ddb_cdc"]
    if cur_meta.get("digest") != want_meta.get("digest"):
        return False
    return _flat_settings(cur_t.get("settings") or {}) == _flat_settings(wanted["template"]["settings"])


def _flat_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in settings.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_settings(value, full + "."))
        else:
            out[full if full.startswith("index.") else "index." + full] = str(value).lower()
    return out
