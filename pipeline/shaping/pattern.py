"""AWS event filter patterns (Lambda ``FilterCriteria``) compiled once, matched per change.

Syntax and semantics follow the AWS Lambda developer guide, "Lambda event filtering" (filter rule
syntax: "Lambda supports the same set of syntax and rules as Amazon EventBridge") and "Filtering
DynamoDB events" (the ``dynamodb`` key, ``Keys`` / ``NewImage`` / ``OldImage`` in DynamoDB JSON):

- A pattern is a JSON object shaped like the record (:mod:`pipeline.shaping.view`); every leaf is
  a non-empty **array of rules**, OR-ed; the fields of a pattern are AND-ed. A record matches only
  if it has every field the pattern names (except ``{"exists": false}``).
- Rules: a literal (``"Alice"``, ``5``, ``true``, ``null``, ``""`` — equality by type and text:
  "for numbers, Lambda also uses string representation. For example, 300, 300.0, and 3.0e2 are
  not considered equal"); ``{"prefix": "us-"}``; ``{"suffix": ".png"}``;
  ``{"equals-ignore-case": "x"}``; ``{"anything-but": v | [v, ...] | {"prefix": s} |
  {"suffix": s}}`` (the field must be there); ``{"numeric": [">", 10, "<=", 20]}`` or
  ``{"numeric": ["=", 100]}``; ``{"exists": true | false}``.
- Rules apply to **leaf** values only ("The Exists operator only works on leaf nodes"), and arrays
  in the record are flattened: ``{"L": {"S": ["a"]}}`` matches a list holding ``{"S": "a"}``,
  ``{"SS": ["a"]}`` a string set holding ``"a"``.
- DynamoDB values are typed JSON and numbers are strings: match a number attribute with
  ``{"N": ["5"]}`` (its exact text), and compare it with ``{"N": [{"numeric": [">", 4]}]}`` —
  ``numeric`` on a string under ``N`` / ``NS`` reads it as the number it is (DynamoDB JSON keeps
  numbers as strings; elsewhere ``numeric`` needs a JSON number, as in EventBridge).
- Several patterns (a list, or Lambda's ``{"Filters": [{"Pattern": "<json>"}, ...]}`` pasted as it
  is) are OR-ed, like the filters of one event source mapping.

Not supported (a clear config error, never a silent non-match): ``$or``, ``wildcard``, ``cidr``,
nested operators such as ``{"prefix": {"equals-ignore-case": ...}}``. ddb-cdc is stricter than
Lambda where Lambda would accept a pattern that can never match: a rule array placed directly on
an attribute (``{"NewImage": {"status": ["x"]}}``, the attribute is an object, not a leaf) or an
unknown field name (``dynamodb.NewImag``) is an error naming the path and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import orjson

from pipeline.errors import FilterPatternError
from pipeline.events import ChangeEvent
from pipeline.shaping.view import DYNAMODB_FIELDS, TOP_LEVEL_FIELDS, LambdaView

#: AttributeValue type keys (DynamoDB API reference, AttributeValue).
AV_TYPES = ("S", "N", "B", "BOOL", "NULL", "M", "L", "SS", "NS", "BS")
_NUMBER_TYPES = ("N", "NS")
OPERATORS = ("prefix", "suffix", "equals-ignore-case", "anything-but", "numeric", "exists")
_UNSUPPORTED = {"$or": "use a list of patterns (OR-ed) instead of $or",
                "wildcard": "use prefix / suffix",
                "cidr": "IP address matching does not apply to DynamoDB records"}
_LOWER = (">", ">=")
_UPPER = ("<", "<=")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _literal_key(value: Any) -> tuple[str, str]:
    """Type-and-text identity of a JSON scalar (numbers by their JSON text, as Lambda compares them)."""
    if value is None:
        return ("null", "")
    if isinstance(value, bool):
        return ("bool", "true" if value else "false")
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, Decimal):
        return ("num", str(value))
    return ("num", orjson.dumps(value).decode())


def _as_number(value: Any, numeric_text: bool) -> Decimal | None:
    if _is_number(value):
        return Decimal(str(value))
    if numeric_text and isinstance(value, str):
        try:
            number = Decimal(value)
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


#: A compiled rule: (leaf value, the leaf sits under N/NS) -> bool
Rule = Callable[[Any, bool], bool]


@dataclass(frozen=True)
class Condition:
    """One leaf of a pattern: the values at ``path`` must satisfy one of ``rules``."""

    path: tuple[str, ...]
    rules: tuple[Rule, ...]
    exists: bool | None  # an {"exists": ...} rule of the array (OR-ed with the others), else None
    numeric_text: bool  # the leaf is under N / NS: numeric rules read strings as numbers

    def matches(self, view: LambdaView) -> bool:
        leaves = [v for v in view.resolve(self.path) if type(v) is not dict and not isinstance(v, Mapping)]
        if not leaves:
            return self.exists is False
        if self.exists is True:
            return True
        return any(rule(leaf, self.numeric_text) for leaf in leaves for rule in self.rules)


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern: every condition must hold (AND)."""

    conditions: tuple[Condition, ...]

    def matches(self, view: LambdaView) -> bool:
        return all(c.matches(view) for c in self.conditions)


@dataclass(frozen=True)
class FilterPattern:
    """A sink's filter: one or more patterns, OR-ed. ``source`` is the configured text (for
    messages); ``attributes`` the ``(image, attribute)`` pairs the patterns name — the only
    attributes a match ever reads."""

    patterns: tuple[Pattern, ...]
    attributes: frozenset[tuple[str, str]]

    def matches(self, event: ChangeEvent) -> bool:
        """True when ``event``'s Lambda-shaped view matches one of the patterns."""
        view = LambdaView(event)
        return any(p.matches(view) for p in self.patterns)


def compile_filter(value: Any) -> FilterPattern:
    """Compile a configured filter: a pattern object, a JSON string of one, a list of them (OR),
    or Lambda's ``{"Filters": [{"Pattern": "<json>"}, ...]}``.

    Raises :class:`pipeline.errors.FilterPatternError` naming the bad part (``where``, a dotted
    path into the pattern) — AWS Lambda developer guide, "Lambda event filtering".
    """
    raw_patterns = _split_filters(value)
    compiled = []
    attributes: set[tuple[str, str]] = set()
    for index, (label, pattern) in enumerate(raw_patterns):
        conditions: list[Condition] = []
        _walk(pattern, (), conditions, label, attributes)
        compiled.append(Pattern(tuple(conditions)))
    return FilterPattern(tuple(compiled), frozenset(attributes))


def _split_filters(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, str):
        value = _parse_json(value, "")
    if isinstance(value, Mapping) and "Filters" in value:
        filters = value["Filters"]
        if set(value) - {"Filters"}:
            raise FilterPatternError("", "FilterCriteria holds only 'Filters'")
        if not isinstance(filters, list) or not filters:
            raise FilterPatternError("Filters", "must be a non-empty list of {\"Pattern\": \"<json>\"}")
        out = []
        for i, item in enumerate(filters):
            if not isinstance(item, Mapping) or set(item) != {"Pattern"}:
                raise FilterPatternError(f"Filters[{i}]", "must be {\"Pattern\": \"<json pattern>\"}")
            pattern = item["Pattern"]
            out.append((f"Filters[{i}].Pattern", _parse_json(pattern, f"Filters[{i}].Pattern")
                        if isinstance(pattern, str) else pattern))
        return out
    if isinstance(value, list):
        if not value:
            raise FilterPatternError("", "an empty list of patterns matches nothing; remove filter or add a pattern")
        return [(f"[{i}]", _parse_json(p, f"[{i}]") if isinstance(p, str) else p) for i, p in enumerate(value)]
    return [("", value)]


def _parse_json(text: str, where: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FilterPatternError(where, f"not valid JSON ({exc})") from None


def _join(label: str, path: tuple[str, ...]) -> str:
    dotted = ".".join(path)
    if label and dotted:
        return f"{label}.{dotted}"
    return label or dotted or "(pattern)"


def _level(path: tuple[str, ...]) -> str:
    """What the keys at ``path`` name: top, dynamodb, attr (attribute names), type (AV types), any."""
    if not path:
        return "top"
    if path == ("dynamodb",):
        return "dynamodb"
    if path[0] == "dynamodb" and len(path) >= 2 and path[1] in ("Keys", "NewImage", "OldImage"):
        level = "attr"
        for segment in path[2:]:
            if level == "attr":
                level = "type"
            elif level == "type":
                level = "attr" if segment == "M" else "type" if segment == "L" else "leaf"
            else:
                return "leaf"
        return level
    if path[0] == "userIdentity" and len(path) == 1:
        return "identity"
    return "leaf"


def _walk(node: Any, path: tuple[str, ...], out: list[Condition], label: str,
          attributes: set[tuple[str, str]]) -> None:
    where = _join(label, path)
    if not isinstance(node, Mapping):
        raise FilterPatternError(where, "must be an object of fields (a pattern is JSON shaped like the record, "
                                        "with an array of rules at each leaf)")
    if not node:
        raise FilterPatternError(where, "an empty object matches nothing; name a field or remove it")
    level = _level(path)
    for key, child in node.items():
        if not isinstance(key, str):
            raise FilterPatternError(where, "field names must be strings")
        if key in _UNSUPPORTED:
            raise FilterPatternError(_join(label, path + (key,)), f"{key} is not supported: {_UNSUPPORTED[key]}")
        sub = path + (key,)
        sub_where = _join(label, sub)
        if level == "top" and key not in TOP_LEVEL_FIELDS:
            raise FilterPatternError(sub_where, f"unknown field; a DynamoDB record has {', '.join(TOP_LEVEL_FIELDS)}")
        if level == "dynamodb" and key not in DYNAMODB_FIELDS:
            raise FilterPatternError(sub_where, f"unknown field; dynamodb has {', '.join(DYNAMODB_FIELDS)}")
        if level == "identity" and key not in ("type", "principalId"):
            raise FilterPatternError(sub_where, "unknown field; userIdentity has type, principalId")
        if level == "type" and key not in AV_TYPES:
            raise FilterPatternError(sub_where, f"unknown AttributeValue type; use one of {', '.join(AV_TYPES)}")
        if len(sub) == 3 and sub[0] == "dynamodb" and sub[1] in ("Keys", "NewImage", "OldImage"):
            attributes.add((sub[1], key))
        if isinstance(child, list):
            child_level = _level(sub)
            if child_level == "type":
                raise FilterPatternError(sub_where, f'put the rules under the attribute\'s type, e.g. '
                                                    f'{{"{key}": {{"S": [...]}}}} (values are DynamoDB JSON; '
                                                    "rules on the attribute object never match in Lambda)")
            if child_level != "leaf":
                raise FilterPatternError(sub_where, "this is an object in the record, not a leaf: name a field "
                                                    "inside it")
            out.append(_compile_rules(child, sub, sub_where))
        elif isinstance(child, Mapping):
            _walk(child, sub, out, label, attributes)
        else:
            raise FilterPatternError(sub_where, f"must be an array of rules (e.g. [{orjson.dumps(child).decode()}]) "
                                                "or an object of fields" if child is None or isinstance(child, (str, int, float, bool))
                                     else "must be an array of rules or an object of fields")


def _compile_rules(items: Sequence[Any], path: tuple[str, ...], where: str) -> Condition:
    if not items:
        raise FilterPatternError(where, "an empty rule array matches nothing; give at least one rule")
    numeric_text = path[-1] in _NUMBER_TYPES and _level(path[:-1]) == "type"
    rules: list[Rule] = []
    exists: bool | None = None
    for i, item in enumerate(items):
        item_where = f"{where}[{i}]"
        if isinstance(item, Mapping):
            if len(item) != 1:
                raise FilterPatternError(item_where, "a rule object holds exactly one operator "
                                                     f"({', '.join(OPERATORS)})")
            (op, arg), = item.items()
            if op == "exists":
                if not isinstance(arg, bool):
                    raise FilterPatternError(item_where, "exists takes true or false")
                if exists is not None and exists is not arg:
                    raise FilterPatternError(item_where, "exists true and false together match everything; "
                                                         "remove the rule")
                exists = arg
                continue
            rules.append(_compile_operator(op, arg, item_where))
        elif isinstance(item, list):
            raise FilterPatternError(item_where, "a rule is a value or an operator object, not an array")
        elif item is None or isinstance(item, (str, bool)) or _is_number(item):
            wanted = _literal_key(item)
            rules.append(lambda value, _nt, wanted=wanted: _literal_key(value) == wanted)
        else:
            raise FilterPatternError(item_where, f"unsupported rule value of type {type(item).__name__}")
    if exists is True:
        rules = []  # exists true OR value rules: any leaf there matches
    return Condition(path=path, rules=tuple(rules), exists=exists, numeric_text=numeric_text)


def _string_arg(op: str, arg: Any, where: str) -> str:
    if not isinstance(arg, str):
        raise FilterPatternError(where, f"{op} takes a string")
    return arg


def _compile_operator(op: str, arg: Any, where: str) -> Rule:
    if op in _UNSUPPORTED:
        raise FilterPatternError(where, f"{op} is not supported: {_UNSUPPORTED[op]}")
    if op == "prefix":
        text = _string_arg(op, arg, where)
        return lambda value, _nt: isinstance(value, str) and value.startswith(text)
    if op == "suffix":
        text = _string_arg(op, arg, where)
        return lambda value, _nt: isinstance(value, str) and value.endswith(text)
    if op == "equals-ignore-case":
        text = _string_arg(op, arg, where).casefold()
        return lambda value, _nt: isinstance(value, str) and value.casefold() == text
    if op == "anything-but":
        return _compile_anything_but(arg, where)
    if op == "numeric":
        return _compile_numeric(arg, where)
    raise FilterPatternError(where, f"unknown operator {op!r}; supported: {', '.join(OPERATORS)}")


def _compile_anything_but(arg: Any, where: str) -> Rule:
    if isinstance(arg, Mapping):
        if len(arg) != 1:
            raise FilterPatternError(where, "anything-but takes a value, a list of values, {\"prefix\": s} "
                                            "or {\"suffix\": s}")
        (op, text), = arg.items()
        if op == "prefix":
            text = _string_arg("anything-but prefix", text, where)
            return lambda value, _nt: isinstance(value, str) and not value.startswith(text)
        if op == "suffix":
            text = _string_arg("anything-but suffix", text, where)
            return lambda value, _nt: isinstance(value, str) and not value.endswith(text)
        raise FilterPatternError(where, f"anything-but {{{op!r}: ...}} is not supported; use prefix or suffix")
    values = arg if isinstance(arg, list) else [arg]
    if not values:
        raise FilterPatternError(where, "anything-but needs at least one value")
    for v in values:
        if not (isinstance(v, str) or _is_number(v)):
            raise FilterPatternError(where, "anything-but values must be strings or numbers")
    excluded = frozenset(_literal_key(v) for v in values)
    return lambda value, _nt: _literal_key(value) not in excluded


def _compile_numeric(arg: Any, where: str) -> Rule:
    if not isinstance(arg, list) or len(arg) not in (2, 4):
        raise FilterPatternError(where, 'numeric takes ["=", n], [">", n], [">", n, "<=", m] and the like')
    bounds: list[tuple[str, Decimal]] = []
    for i in range(0, len(arg), 2):
        op, number = arg[i], arg[i + 1]
        if op not in ("=", ">", ">=", "<", "<="):
            raise FilterPatternError(where, f"numeric operator {op!r} is not one of =, >, >=, <, <=")
        if not _is_number(number):
            raise FilterPatternError(where, f"numeric bound {number!r} is not a JSON number")
        bounds.append((op, Decimal(str(number))))
    if len(bounds) == 2:
        ops = {bounds[0][0], bounds[1][0]}
        if "=" in ops or not (ops & set(_LOWER) and ops & set(_UPPER)):
            raise FilterPatternError(where, "a numeric range needs one lower bound (> or >=) and one upper "
                                            "bound (< or <=)")
        low = next(b for b in bounds if b[0] in _LOWER)
        high = next(b for b in bounds if b[0] in _UPPER)
        if low[1] > high[1]:
            raise FilterPatternError(where, "the numeric range is empty (lower bound above upper bound)")

    def rule(value: Any, numeric_text: bool) -> bool:
        number = _as_number(value, numeric_text)
        if number is None:
            return False
        for op, bound in bounds:
            if op == "=" and not number == bound:
                return False
            if op == ">" and not number > bound:
                return False
            if op == ">=" and not number >= bound:
                return False
            if op == "<" and not number < bound:
                return False
            if op == "<=" and not number <= bound:
                return False
        return True

    return rule
