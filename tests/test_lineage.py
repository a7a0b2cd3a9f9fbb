"""pipeline.lineage: the one place that answers "what came before this shard"."""

from __future__ import annotations

from pipeline.lineage import ancestors, blocked_by, parent_ids, parents_done, parents_first


def test_parent_ids_accepts_every_form():
    assert parent_ids(None) == parent_ids("") == () and parent_ids("a") == ("a",) and parent_ids({"b"}) == ("b",)


def test_ancestors_of_single_and_set_parents_stop_at_cycles():
    assert ancestors("d", {"d": "c", "c": "b", "b": None}) == {"c", "b"}
    assert ancestors("d", {"d": ("c",), "c": ("b",), "b": ("x",)}) == {"c", "b", "x"}  # x: unknown, still named
    assert ancestors("a", {"a": "b", "b": "a"}) == {"b"}


def _shard(sid, parent=None, rank=0):
    return {"id": sid, "parent": parent, "rank": rank}


def test_parents_first_orders_a_forest_and_keeps_the_given_order_otherwise():
    items = [_shard("c2", "b"), _shard("a"), _shard("b", "a"), _shard("z"), _shard("c1", "b")]
    got = [s["id"] for s in parents_first(items, shard_id=lambda s: s["id"], parents=lambda s: s["parent"])]
    assert got.index("a") < got.index("b") < got.index("c2") and got.index("b") < got.index("c1")
    assert got == ["a", "b", "c2", "z", "c1"]  # ties by position in the list


def test_parents_first_ranks_ties_ignores_absent_parents_and_breaks_cycles():
    items = [_shard("x", "gone", rank=2), _shard("y", rank=1), _shard("p", "q", rank=5), _shard("q", "p", rank=4)]
    got = [s["id"] for s in parents_first(items, shard_id=lambda s: s["id"], parents=lambda s: s["parent"],
                                          rank=lambda s: s["rank"])]
    assert got[:2] == ["y", "x"] and set(got[2:]) == {"p", "q"} and got[2] == "q"


def test_parents_done_rules():
    leases = {"open": True, "closed": False}
    stream = {"open", "closed", "listed-no-lease"}
    ok = lambda *ps: parents_done(ps, unfinished=leases.get, in_stream=stream.__contains__)  # noqa: E731
    assert ok() and ok("closed") and ok("trimmed-away")
    assert not ok("open") and not ok("listed-no-lease") and not ok("closed", "open")


def test_blocked_by_a_stopped_ancestor_through_unfinished_ones_only():
    parents = {"c": ("b",), "b": ("a",), "a": ()}
    assert blocked_by("c", parents, {"a"}, unfinished=lambda s: True)
    assert not blocked_by("c", parents, {"a"}, unfinished=lambda s: s != "b")  # b finished: c may start
    cyclic = {"a": ("b",), "b": ("a",)}
    assert not blocked_by("a", cyclic, set(), unfinished=lambda s: True)
