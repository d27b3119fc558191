"""What a comparison reports: `Change` and `RequestDiff`, and the helpers that locate and
describe one difference (JSON paths, first differing character, excerpts, billing fields,
deepdiff leaves)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepdiff import DeepDiff

from ccwarm import payload

PREFIX_BREAK = "prefix_break"
GROWTH = "growth"
JSON_ONLY = "json_only"

EXCERPT_CONTEXT = 60
EXCERPT_MAX = 240
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NO_CACHE_CONTROL = [re.compile(r"\['cache_control'\]")]


@dataclass
class Change:
    """One classified difference between two consecutive requests."""

    kind: str  # PREFIX_BREAK, GROWTH or JSON_ONLY
    path: str  # JSON path of the first difference, e.g. messages[3].content[0].text
    block: str  # the rendered unit it belongs to, e.g. system[0], messages[3].content[0], tools
    reason: str
    offset: int | None = None  # first differing character in the block's rendered text
    prefix_chars: int | None = None  # rendered characters of the new request before the difference
    fields: dict[str, list[str | None]] | None = None  # billing fields: {"cch": ["56445", "1a2b3"]}
    excerpt: dict[str, str] | None = None  # before / old / new / after around the difference
    details: list[str] = field(default_factory=list)  # deepdiff findings, short

    def describe(self) -> str:
        where = self.path + (f" @{self.offset}" if self.offset is not None else "")
        label = {PREFIX_BREAK: "prefix break", GROWTH: "growth", JSON_ONLY: "json-only"}[self.kind]
        return f"{label} at {where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "path": self.path,
            "block": self.block,
            "reason": self.reason,
            "offset": self.offset,
            "prefix_chars": self.prefix_chars,
        }
        if self.fields:
            out["fields"] = {k: list(v) for k, v in self.fields.items()}
        if self.excerpt:
            out["excerpt"] = dict(self.excerpt)
        if self.details:
            out["details"] = list(self.details)
        return out


@dataclass
class RequestDiff:
    changes: list[Change]

    @property
    def prefix_breaks(self) -> list[Change]:
        return [c for c in self.changes if c.kind == PREFIX_BREAK]

    @property
    def growth(self) -> list[Change]:
        return [c for c in self.changes if c.kind == GROWTH]

    @property
    def json_only(self) -> list[Change]:
        return [c for c in self.changes if c.kind == JSON_ONLY]

    @property
    def broken(self) -> bool:
        return any(c.kind == PREFIX_BREAK for c in self.changes)

    def summary_line(self) -> str:
        breaks = self.prefix_breaks
        if not breaks:
            return f"no prefix break ({len(self.growth)} appended, {len(self.json_only)} json-only)"
        first = breaks[0]
        more = f" (+{len(breaks) - 1} more)" if len(breaks) > 1 else ""
        return f"prefix break at {first.path}: {first.reason}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix_breaks": [c.to_dict() for c in self.prefix_breaks],
            "growth": [c.to_dict() for c in self.growth],
            "json_only": [c.to_dict() for c in self.json_only],
        }


# --- helpers ----------------------------------------------------------------------------------


def format_path(elements: Iterable[Any]) -> str:
    out = ""
    for e in elements:
        if isinstance(e, int):
            out += f"[{e}]"
        elif not out:
            out = str(e)
        elif isinstance(e, str) and _IDENT.match(e):
            out += f".{e}"
        else:
            out += f"[{json.dumps(e, ensure_ascii=False)}]"
    return out


def first_difference(a: str, b: str) -> int:
    """Index of the first differing character (len of the shorter string if one prefixes the other)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def excerpt(old: str, new: str, offset: int | None = None) -> dict[str, str]:
    """The changed span of two texts with some common context, for side-by-side display."""
    p = first_difference(old, new) if offset is None else offset
    max_suffix = min(len(old), len(new)) - p
    s = 0
    while s < max_suffix and old[len(old) - 1 - s] == new[len(new) - 1 - s]:
        s += 1
        if s >= 4096:
            break
    old_mid, new_mid = old[p : len(old) - s], new[p : len(new) - s]
    return {
        "before": old[max(0, p - EXCERPT_CONTEXT) : p],
        "old": old_mid[:EXCERPT_MAX] + ("…" if len(old_mid) > EXCERPT_MAX else ""),
        "new": new_mid[:EXCERPT_MAX] + ("…" if len(new_mid) > EXCERPT_MAX else ""),
        "after": new[len(new) - s : len(new) - s + EXCERPT_CONTEXT],
    }


def billing_field_changes(old_text: str, new_text: str) -> dict[str, list[str | None]] | None:
    a, b = payload.parse_billing_header(old_text), payload.parse_billing_header(new_text)
    if a is None or b is None:
        return None
    keys = list(dict.fromkeys([*a.fields, *b.fields]))
    return {k: [a.fields.get(k), b.fields.get(k)] for k in keys if a.fields.get(k) != b.fields.get(k)}


def describe_fields(fields: Mapping[str, Sequence[str | None]]) -> str:
    return ", ".join(
        f"{k} {a if a is not None else '(none)'} -> {b if b is not None else '(none)'}" for k, (a, b) in fields.items()
    )


def child(node: Any, key: Any) -> Any:
    try:
        return node[key]
    except (KeyError, IndexError, TypeError):
        return None


def _order_key(a: Any, b: Any, elements: list[Any]) -> list[int]:
    """Position of a path in document order (dict keys in their order, list items by index)."""
    key: list[int] = []
    for e in elements:
        if isinstance(e, int):
            key.append(e)
        else:
            container = b if isinstance(b, dict) and e in b else a
            if isinstance(container, dict):
                for i, k in enumerate(container):
                    if k == e:
                        key.append(i)
                        break
                else:
                    key.append(len(container))
            else:
                key.append(0)
        a, b = child(a, e), child(b, e)
    return key


_DD_KINDS = {
    "values_changed": "value changed",
    "type_changes": "type changed",
    "dictionary_item_added": "key added",
    "dictionary_item_removed": "key removed",
    "iterable_item_added": "item added",
    "iterable_item_removed": "item removed",
    "attribute_added": "attribute added",
    "attribute_removed": "attribute removed",
    "set_item_added": "item added",
    "set_item_removed": "item removed",
}


def _kind_of(t: Any) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }.get(type(t), type(t).__name__)


def deep_changes(a: Any, b: Any, *, ignore_cache_control: bool = True) -> list[tuple[list[Any], str]]:
    """deepdiff's leaf changes between two values as (path elements, short description), in document order."""
    kwargs: dict[str, Any] = {"view": "tree"}
    if ignore_cache_control:
        kwargs["exclude_regex_paths"] = _NO_CACHE_CONTROL
    dd = DeepDiff(a, b, **kwargs)
    found: list[tuple[list[int], list[Any], str]] = []
    for report, levels in dd.items():
        what = _DD_KINDS.get(report, report.replace("_", " "))
        for level in levels:
            elements = level.path(output_format="list")
            if report == "type_changes":
                what_here = f"{what} {_kind_of(level.t1)} -> {_kind_of(level.t2)}"
            else:
                what_here = what
            found.append((_order_key(a, b, elements), elements, what_here))
    found.sort(key=lambda x: x[0])
    return [(elements, what) for _, elements, what in found]
