"""Shard lineage: a stream's shards form a forest in which a child starts when its parent is
split or closed (DynamoDB Streams API reference, ``Shard.ParentShardId``; a shard has at most one
parent in DynamoDB Streams, the lease table's ``parentShardId`` is a set as in the KCL). Every
caller that asks "what came before this shard" or "in which order do shards go" uses this module:
the worker (may a child start?), stream and archive replays (order, start positions), checkpoint
import (which leases are older than an exported one).

``parents`` arguments map a shard id to its parent ids — an iterable (lease, archive metadata)
or a single id / None (``ShardInfo.parent_shard_id``); both forms are accepted everywhere. A
parent id that is not a key of the mapping is a shard that is no longer known (trimmed away,
removed after its children started): it counts as done and has no further ancestors. Cycles
(only possible in corrupt metadata) never loop: each function says how it breaks them.
"""

from __future__ import annotations

import heapq
from typing import Callable, Hashable, Iterable, Mapping, Sequence, TypeVar

T = TypeVar("T")

__all__ = ["parent_ids", "ancestors", "parents_first", "parents_done", "blocked_by"]


def parent_ids(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """One shard's parents as a tuple: ``None``/``""`` → ``()``, ``"shardId-…"`` → ``("shardId-…",)``."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(p for p in value if p)


def ancestors(shard_id: str, parents: Mapping[str, str | Iterable[str] | None]) -> set[str]:
    """Every ancestor of ``shard_id`` (parents, their parents, …), not the shard itself, also the
    unknown ones named as parents. A cycle ends the walk (each shard is visited once)."""
    seen: set[str] = set()
    todo = list(parent_ids(parents.get(shard_id)))
    while todo:
        parent = todo.pop()
        if parent not in seen and parent != shard_id:
            seen.add(parent)
            todo.extend(parent_ids(parents.get(parent)))
    return seen


def parents_first(items: Sequence[T], *, shard_id: Callable[[T], str],
                  parents: Callable[[T], str | Iterable[str] | None],
                  rank: Callable[[T], Hashable] | None = None) -> list[T]:
    """``items`` in an order where every shard comes after all of its parents that are among
    ``items`` (topological). Among shards that are ready at the same time the smallest ``rank``
    goes first (default: the position in ``items``, so an already ordered list keeps its order).
    A parent not among ``items`` is ignored (its child is a root). A cycle is broken by releasing
    the smallest-ranked shard still waiting. Duplicate shard ids keep their first item."""
    order_key = rank or (lambda item: 0)
    members: dict[str, tuple[Hashable, int, T]] = {}
    for index, item in enumerate(items):
        members.setdefault(shard_id(item), (order_key(item), index, item))
    waiting = {sid: {p for p in parent_ids(parents(entry[2])) if p in members and p != sid}
               for sid, entry in members.items()}
    children: dict[str, list[str]] = {}
    for sid, pending in waiting.items():
        for parent in pending:
            children.setdefault(parent, []).append(sid)

    def key(sid: str) -> tuple:
        entry = members[sid]
        return entry[0], entry[1], sid

    ready = [key(sid) for sid, pending in waiting.items() if not pending]
    heapq.heapify(ready)
    done: set[str] = set()
    ordered: list[T] = []
    while len(done) < len(members):
        if not ready:  # a cycle: release the smallest shard still waiting
            heapq.heappush(ready, min(key(sid) for sid in members if sid not in done))
        sid = heapq.heappop(ready)[-1]
        if sid in done:
            continue
        done.add(sid)
        ordered.append(members[sid][2])
        for child in children.get(sid, ()):
            pending = waiting[child]
            if sid in pending:
                pending.discard(sid)
                if not pending and child not in done:
                    heapq.heappush(ready, key(child))
    return ordered


def parents_done(parents: Iterable[str], *, unfinished: Callable[[str], bool | None],
                 in_stream: Callable[[str], bool]) -> bool:
    """True when a child may start: for each parent, ``unfinished(parent)`` is False (its lease
    reached SHARD_END and is not moved back), or it is None — no lease — and the parent is not
    ``in_stream`` (trimmed away, or removed after its children started: done). A parent that is
    in the stream without a lease yet is not done (its lease is about to be created)."""
    for parent in parents:
        state = unfinished(parent)
        if state is None:
            if in_stream(parent):
                return False
            continue
        if state:
            return False
    return True


def blocked_by(shard_id: str, parents: Mapping[str, str | Iterable[str] | None], stopped: set[str],
               unfinished: Callable[[str], bool]) -> bool:
    """True when ``shard_id`` can never start because a stopped shard (failed or trimmed) lies on
    its lineage through ancestors that are still unfinished. Each ancestor is visited once."""
    seen: set[str] = set()
    todo = list(parent_ids(parents.get(shard_id)))
    while todo:
        parent = todo.pop()
        if parent in seen:
            continue
        seen.add(parent)
        if parent in stopped:
            return True
        if parent in parents and unfinished(parent):
            todo.extend(parent_ids(parents.get(parent)))
    return False
