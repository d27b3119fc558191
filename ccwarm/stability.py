"""Prefix stability: what changed between two consecutive requests of one conversation.

A local server renders a /v1/messages request into one prompt text, in this order: `tools`, then
`system`, then `messages`, and reuses the KV cache of the longest prefix it has seen before. So
between two consecutive requests of one conversation, every change is one of:

- **growth** (`growth`): new messages appended at the end (or blocks appended to the last message).
  Expected: the cached prefix is still valid.
- **prefix break** (`prefix_break`): an earlier part changed (a tool, a system block, an old
  message, a message inserted before existing ones, messages removed). Everything after it must
  be prefilled again. Reported with the JSON path of the first difference (`system[0].text`,
  `messages[0].content[0].text`, `tools` for a re-ordered tool list), the block it belongs to
  (`system[0]`, `messages[0].content[0]`), the character offset of the first difference in that
  block's rendered text, the approximate number of rendered characters before it
  (`prefix_chars`), and for the billing block the fields that changed (`cch 56445 -> 1a2b3`).
- **JSON-only** (`json_only`): the JSON changed but the rendered text did not: `cache_control`
  markers moved, a one-text-block content list flipped to a plain string, `metadata`,
  `max_tokens` and other request options. Noted, never flagged.

"Rendered text" is this module's model of what a chat template prints, not any one server's
template: tool definitions as JSON without `cache_control`, system and text blocks as their text,
`tool_use` as name and input JSON, `tool_result` as its text, thinking blocks as their thinking
text. Offsets are in that model's characters.

Speed: blocks are compared by equality first (C-level dict/list comparison); deepdiff only runs
on blocks whose rendered text differs, and cheap detectors classify the common JSON-only changes
(moved `cache_control`, list/string flips) without it.

`StabilityTracker` groups requests by `payload.identify(...).conversation_key`, keeps the
previous request of each conversation, counts per block how often it broke the prefix, and
exports a summary as JSON (`summary()`, with `schema_version`) and Markdown (`markdown()`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepdiff import DeepDiff

from ccwarm import payload

SCHEMA_VERSION = 1

PREFIX_BREAK = "prefix_break"
GROWTH = "growth"
JSON_ONLY = "json_only"

EXCERPT_CONTEXT = 60
EXCERPT_MAX = 240
_CORE_KEYS = ("tools", "system", "messages")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NO_CACHE_CONTROL = [re.compile(r"\['cache_control'\]")]


# --- rendering model --------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _without_cache_control(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_without_cache_control(v) for v in value]
    return value


def render_tool(tool: Any) -> str:
    if isinstance(tool, dict) and "cache_control" in tool:
        tool = {k: v for k, v in tool.items() if k != "cache_control"}
    return _dumps(tool)


def render_block(block: Any) -> str:
    """The text a chat template would print for one content or system block."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return _dumps(block)
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return text if isinstance(text, str) else _dumps(text)
    if kind == "tool_use":
        return f"{block.get('name')}({_dumps(block.get('input'))})"
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            content = "".join(render_block(b) for b in content)
        elif not isinstance(content, str):
            content = "" if content is None else _dumps(content)
        return ("[error] " if block.get("is_error") else "") + content
    if kind == "thinking":
        return str(block.get("thinking", ""))
    if kind == "redacted_thinking":
        return str(block.get("data", ""))
    return _dumps(_without_cache_control(block))


def message_blocks(message: Any) -> list[Any]:
    """A message's content as a block list (a plain string is one text block)."""
    if not isinstance(message, dict):
        return [message]
    content = message.get("content")
    if isinstance(content, list):
        return content
    return [content if isinstance(content, str) else _dumps(content)]


def render_message(message: Any) -> tuple[str, tuple[str, ...]]:
    role = message.get("role") if isinstance(message, dict) else None
    return (str(role), tuple(render_block(b) for b in message_blocks(message)))


def _message_len(message: Any) -> int:
    return sum(len(t) for t in render_message(message)[1])


def _system_blocks(system: Any) -> list[Any]:
    if system is None:
        return []
    if isinstance(system, list):
        return system
    return [system]


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    return "\n".join(render_block(b) for b in _system_blocks(system))


def short_hash(text: str | bytes) -> str:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:8]


# --- result types -----------------------------------------------------------------------------


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


def _child(node: Any, key: Any) -> Any:
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
        a, b = _child(a, e), _child(b, e)
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


# --- the comparison ---------------------------------------------------------------------------


class _Layout:
    """Rendered lengths of one request's sections, computed lazily (only when a break needs them)."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self._tools: list[int] | None = None
        self._system: list[int] | None = None
        self._messages: list[int] | None = None

    @property
    def tools(self) -> list[int]:
        if self._tools is None:
            self._tools = [len(render_tool(t)) for t in upfront_tools(self.body)]
        return self._tools

    @property
    def system(self) -> list[int]:
        if self._system is None:
            self._system = [len(render_block(b)) for b in _system_blocks(self.body.get("system"))]
        return self._system

    @property
    def messages(self) -> list[int]:
        if self._messages is None:
            self._messages = [_message_len(m) for m in _as_list(self.body.get("messages"))]
        return self._messages

    def before(self, section: str, index: int = 0) -> int:
        """Rendered characters before item `index` of `section`."""
        total = 0
        for name in _CORE_KEYS:
            lengths = getattr(self, name)
            if name == section:
                return total + sum(lengths[:index])
            total += sum(lengths)
        return total

    def adopt_tools(self, other: _Layout) -> None:
        if other._tools is not None:
            self._tools = other._tools


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else ([] if value is None else [value])


def upfront_tools(body: Mapping[str, Any]) -> list[Any]:
    """The tools a server puts before the messages: deferred ones (`defer_loading: true`) are
    rendered where a tool_reference loads them, so adding one to `tools` moves no prefix."""
    return [t for t in _as_list(body.get("tools")) if not (isinstance(t, dict) and t.get("defer_loading") is True)]


def _tool_name(tool: Any) -> str:
    return str(tool.get("name")) if isinstance(tool, dict) else _dumps(tool)[:40]


def _describe_message(message: Any) -> str:
    role = message.get("role") if isinstance(message, dict) else "?"
    kinds = [str(b.get("type", "?")) if isinstance(b, dict) else "text" for b in message_blocks(message)]
    return f"{role}: {', '.join(kinds)}"


class _Comparer:
    def __init__(self, prev: Mapping[str, Any], cur: Mapping[str, Any], prev_layout: _Layout | None = None) -> None:
        self.prev, self.cur = prev, cur
        self.layout = _Layout(cur)
        self.prev_layout = prev_layout or _Layout(prev)
        self.changes: list[Change] = []

    def run(self) -> list[Change]:
        self.tools()
        self.system()
        self.messages()
        self.options()
        return self.changes

    # A block whose rendered text differs: locate the first leaf change with deepdiff.
    def _changed_block(
        self,
        section: str,
        a_index: int,
        b_index: int,
        a: Any,
        b: Any,
        a_text: str,
        b_text: str,
        *,
        block: str | None = None,
        base: list[Any] | None = None,
    ) -> Change:
        base = base if base is not None else [section, b_index]
        block = block or format_path(base)
        leaves = _text_only_change(a, b)
        if leaves is None:
            leaves = deep_changes(a, b)
        path = format_path(base + leaves[0][0]) if leaves else block
        what = leaves[0][1] if leaves else "rendered text changed"
        offset = first_difference(a_text, b_text)
        fields = billing_field_changes(a_text, b_text) if section == "system" else None
        if fields:
            reason = "billing header changed: " + describe_fields(fields)
        elif leaves and what.startswith("value changed") and isinstance(_child_path(a, leaves[0][0]), str):
            reason = "text changed"
        else:
            reason = what
        return Change(
            PREFIX_BREAK,
            path,
            block,
            reason,
            offset=offset,
            excerpt=excerpt(a_text, b_text, offset),
            fields=fields or None,
            details=[f"{format_path(base + e)}: {w}" for e, w in leaves[:8]],
        )

    def _json_only(self, base: list[Any], a: Any, b: Any, *, section: str) -> Change:
        block = format_path(base)
        if _without_cache_control(a) == _without_cache_control(b):
            return Change(JSON_ONLY, block, block, "cache_control moved")
        if section == "messages" and isinstance(a, dict) and isinstance(b, dict):
            ca, cb = a.get("content"), b.get("content")
            if (
                isinstance(ca, list) != isinstance(cb, list)
                and isinstance(ca, (list, str))
                and isinstance(cb, (list, str))
            ):
                way = "a one-block list to a string" if isinstance(ca, list) else "a string to a one-block list"
                return Change(JSON_ONLY, f"{block}.content", block, f"content flipped from {way} (same text)")
        leaves = deep_changes(a, b, ignore_cache_control=False)
        path = format_path(base + leaves[0][0]) if leaves else block
        return Change(
            JSON_ONLY,
            path,
            block,
            (leaves[0][1] if leaves else "JSON changed") + " (rendered text unchanged)",
            details=[f"{format_path(base + e)}: {w}" for e, w in leaves[:8]],
        )

    def _break(self, change: Change, section: str, index: int) -> None:
        change.prefix_chars = self.layout.before(section, index) + (change.offset or 0)
        self.changes.append(change)

    # -- tools ------------------------------------------------------------------------------------

    def tools(self) -> None:
        ta, tb = upfront_tools(self.prev), upfront_tools(self.cur)
        if ta == tb:
            self.layout.adopt_tools(self.prev_layout)
            return
        names_a, names_b = [_tool_name(t) for t in ta], [_tool_name(t) for t in tb]
        if names_a != names_b and sorted(names_a) == sorted(names_b):
            k = next(i for i, (x, y) in enumerate(zip(names_a, names_b)) if x != y)
            moved = [f"tools[{i}] {x} -> {y}" for i, (x, y) in enumerate(zip(names_a, names_b)) if x != y]
            offset = self.layout.before("tools", k)
            self._break(
                Change(
                    PREFIX_BREAK,
                    "tools",
                    "tools",
                    f"tool list re-ordered: first difference at tools[{k}] ({names_a[k]} -> {names_b[k]})",
                    offset=offset,
                    excerpt={
                        "before": ", ".join(names_a[max(0, k - 3) : k]),
                        "old": ", ".join(names_a[k : k + 6]),
                        "new": ", ".join(names_b[k : k + 6]),
                        "after": "",
                    },
                    details=moved[:8],
                ),
                "tools",
                0,
            )
            by_name = {}
            for t in ta:
                by_name.setdefault(_tool_name(t), t)
            for j, t in enumerate(tb):
                old = by_name.get(_tool_name(t))
                if old is not None and old != t:
                    self._tool_pair(old, t, ta.index(old), j)
            return
        sm = difflib.SequenceMatcher(None, names_a, names_b, autojunk=False)
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op == "equal":
                for i, j in zip(range(i1, i2), range(j1, j2)):
                    if ta[i] != tb[j]:
                        self._tool_pair(ta[i], tb[j], i, j)
            elif op == "replace" and i2 - i1 == j2 - j1:
                for i, j in zip(range(i1, i2), range(j1, j2)):
                    self._tool_pair(ta[i], tb[j], i, j)
            else:
                added, removed = names_b[j1:j2], names_a[i1:i2]
                parts = ([f"added {', '.join(added)}"] if added else []) + (
                    [f"removed {', '.join(removed)}"] if removed else []
                )
                self._break(
                    Change(
                        PREFIX_BREAK,
                        f"tools[{j1}]",
                        "tools",
                        "tool list changed: " + "; ".join(parts),
                        offset=self.layout.before("tools", j1),
                        excerpt={
                            "before": ", ".join(names_b[max(0, j1 - 3) : j1]),
                            "old": ", ".join(removed),
                            "new": ", ".join(added),
                            "after": "",
                        },
                    ),
                    "tools",
                    0,
                )
                self.changes[-1].prefix_chars = self.changes[-1].offset

    def _tool_pair(self, a: Any, b: Any, i: int, j: int) -> None:
        ra, rb = render_tool(a), render_tool(b)
        if ra == rb:
            self.changes.append(self._json_only(["tools", j], a, b, section="tools"))
        else:
            self._break(self._changed_block("tools", i, j, a, b, ra, rb), "tools", j)

    # -- system -----------------------------------------------------------------------------------

    def system(self) -> None:
        sa, sb = self.prev.get("system"), self.cur.get("system")
        if sa == sb:
            return
        if isinstance(sa, list) and isinstance(sb, list):
            self._system_lists(sa, sb)
            return
        # string <-> string, or one form <-> the other
        ta, tb = _system_text(sa), _system_text(sb)
        if isinstance(sa, list) != isinstance(sb, list) and _flip_equal(sa, sb):
            self.changes.append(
                Change(JSON_ONLY, "system", "system", "system flipped between a string and a block list (same text)")
            )
            return
        if ta == tb:
            self.changes.append(self._json_only(["system"], sa, sb, section="system"))
            return
        offset = first_difference(ta, tb)
        fields = billing_field_changes(ta, tb)
        reason = "billing header changed: " + describe_fields(fields) if fields else "system text changed"
        self._break(
            Change(
                PREFIX_BREAK,
                "system",
                "system",
                reason,
                offset=offset,
                fields=fields or None,
                excerpt=excerpt(ta, tb, offset),
            ),
            "system",
            0,
        )

    def _system_lists(self, sa: list[Any], sb: list[Any]) -> None:
        ra, rb = [render_block(b) for b in sa], [render_block(b) for b in sb]
        sm = difflib.SequenceMatcher(None, ra, rb, autojunk=False)
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            pairs = list(zip(range(i1, i2), range(j1, j2))) if op in ("equal", "replace") else []
            for i, j in pairs:
                if sa[i] == sb[j]:
                    continue
                if ra[i] == rb[j]:
                    self.changes.append(self._json_only(["system", j], sa[i], sb[j], section="system"))
                else:
                    self._break(self._changed_block("system", i, j, sa[i], sb[j], ra[i], rb[j]), "system", j)
            extra_a, extra_b = list(range(i1 + len(pairs), i2)), list(range(j1 + len(pairs), j2))
            if extra_a or extra_b:
                where = extra_b[0] if extra_b else j1 + len(pairs)
                if extra_b and not extra_a:
                    reason = f"system block(s) inserted: {', '.join(f'system[{j}]' for j in extra_b)}"
                    ex = {"before": "", "old": "", "new": rb[extra_b[0]][:EXCERPT_MAX], "after": ""}
                elif extra_a and not extra_b:
                    reason = (
                        f"system block(s) removed: {', '.join(f'system[{i}]' for i in extra_a)} of the previous request"
                    )
                    ex = {"before": "", "old": ra[extra_a[0]][:EXCERPT_MAX], "new": "", "after": ""}
                else:
                    reason = "system blocks replaced"
                    ex = {
                        "before": "",
                        "old": ra[extra_a[0]][:EXCERPT_MAX],
                        "new": rb[extra_b[0]][:EXCERPT_MAX],
                        "after": "",
                    }
                removed_billing = [payload.parse_billing_header(ra[i]) for i in extra_a]
                if any(removed_billing):
                    reason += " (billing block)"
                self._break(
                    Change(PREFIX_BREAK, f"system[{where}]", f"system[{where}]", reason, offset=0, excerpt=ex),
                    "system",
                    where,
                )

    # -- messages ---------------------------------------------------------------------------------

    def messages(self) -> None:
        ma, mb = _as_list(self.prev.get("messages")), _as_list(self.cur.get("messages"))
        n = min(len(ma), len(mb))
        differing = [i for i in range(n) if ma[i] != mb[i]]
        rendered: dict[int, tuple[Any, Any]] = {}
        fast = True
        for i in differing:
            ra, rb = render_message(ma[i]), render_message(mb[i])
            rendered[i] = (ra, rb)
            if ra != rb:
                fast = False
                break
        if fast:
            for i in differing:
                self.changes.append(self._json_only(["messages", i], ma[i], mb[i], section="messages"))
            if len(mb) > len(ma):
                for j in range(len(ma), len(mb)):
                    self.changes.append(self._appended(mb[j], j))
            elif len(mb) < len(ma):
                self._removed(ma, len(mb), len(ma), len(mb))
            return
        self._messages_aligned(ma, mb)

    def _appended(self, message: Any, j: int) -> Change:
        what = (
            "role:system message appended"
            if isinstance(message, dict) and message.get("role") == "system"
            else "message appended"
        )
        return Change(GROWTH, f"messages[{j}]", f"messages[{j}]", f"{what} ({_describe_message(message)})")

    def _removed(self, ma: list[Any], i1: int, i2: int, j: int) -> None:
        text = "".join(render_message(ma[i1])[1])
        self._break(
            Change(
                PREFIX_BREAK,
                f"messages[{j}]",
                f"messages[{j}]",
                f"{i2 - i1} message(s) removed: messages[{i1}:{i2}] of the previous request",
                offset=0,
                excerpt={"before": "", "old": text[:EXCERPT_MAX], "new": "", "after": ""},
            ),
            "messages",
            j,
        )

    def _messages_aligned(self, ma: list[Any], mb: list[Any]) -> None:
        ra, rb = [render_message(m) for m in ma], [render_message(m) for m in mb]
        sm = difflib.SequenceMatcher(None, ra, rb, autojunk=False)
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op == "equal":
                for i, j in zip(range(i1, i2), range(j1, j2)):
                    if ma[i] != mb[j]:
                        self.changes.append(self._json_only(["messages", j], ma[i], mb[j], section="messages"))
                continue
            if op == "insert":
                if i1 >= len(ma):  # after everything the previous request had: growth
                    for j in range(j1, j2):
                        self.changes.append(self._appended(mb[j], j))
                    continue
                roles = {m.get("role") if isinstance(m, dict) else None for m in mb[j1:j2]}
                what = "role:system message" if roles == {"system"} else "message"
                text = "".join(rb[j1][1])
                self._break(
                    Change(
                        PREFIX_BREAK,
                        f"messages[{j1}]",
                        f"messages[{j1}]",
                        f"{j2 - j1} {what}(s) inserted before existing messages ({_describe_message(mb[j1])})",
                        offset=0,
                        excerpt={"before": "", "old": "", "new": text[:EXCERPT_MAX], "after": ""},
                    ),
                    "messages",
                    j1,
                )
                continue
            if op == "delete":
                self._removed(ma, i1, i2, j1)
                continue
            # replace: pair items one to one, the rest are inserted/removed
            pairs = list(zip(range(i1, i2), range(j1, j2)))
            for i, j in pairs:
                self._message_pair(ma, mb, ra, rb, i, j)
            if i2 - i1 > len(pairs):
                self._removed(ma, i1 + len(pairs), i2, j1 + len(pairs))
            elif j2 - j1 > len(pairs):
                start = j1 + len(pairs)
                if i2 >= len(ma):
                    for j in range(start, j2):
                        self.changes.append(self._appended(mb[j], j))
                else:
                    self._break(
                        Change(
                            PREFIX_BREAK,
                            f"messages[{start}]",
                            f"messages[{start}]",
                            f"{j2 - start} message(s) inserted before existing messages "
                            f"({_describe_message(mb[start])})",
                            offset=0,
                        ),
                        "messages",
                        start,
                    )

    def _message_pair(self, ma: list[Any], mb: list[Any], ra: list[Any], rb: list[Any], i: int, j: int) -> None:
        a, b = ma[i], mb[j]
        (role_a, blocks_a), (role_b, blocks_b) = ra[i], rb[j]
        if ra[i] == rb[j]:
            self.changes.append(self._json_only(["messages", j], a, b, section="messages"))
            return
        # the last message of the previous request grew new blocks: still append-only
        if i == len(ma) - 1 and role_a == role_b and blocks_b[: len(blocks_a)] == blocks_a:
            self.changes.append(
                Change(
                    GROWTH,
                    f"messages[{j}].content[{len(blocks_a)}]",
                    f"messages[{j}]",
                    f"{len(blocks_b) - len(blocks_a)} block(s) appended to the last message",
                )
            )
            return
        if role_a != role_b:
            ta, tb = "".join(blocks_a), "".join(blocks_b)
            self._break(
                Change(
                    PREFIX_BREAK,
                    f"messages[{j}].role",
                    f"messages[{j}]",
                    f"role changed {role_a} -> {role_b}",
                    offset=0,
                    excerpt=excerpt(ta, tb, 0),
                ),
                "messages",
                j,
            )
            return
        # same role: find the first block that differs in rendered text
        k = next((k for k, (x, y) in enumerate(zip(blocks_a, blocks_b)) if x != y), min(len(blocks_a), len(blocks_b)))
        content_a = a.get("content") if isinstance(a, dict) else None
        content_b = b.get("content") if isinstance(b, dict) else None
        base_len = sum(len(t) for t in blocks_b[:k])
        if k < len(blocks_a) and k < len(blocks_b):
            if isinstance(content_a, list) and isinstance(content_b, list):
                change = self._changed_block(
                    "messages",
                    i,
                    j,
                    content_a[k],
                    content_b[k],
                    blocks_a[k],
                    blocks_b[k],
                    base=["messages", j, "content", k],
                )
            else:  # string content on one side: compare the messages themselves
                change = self._changed_block(
                    "messages",
                    i,
                    j,
                    a,
                    b,
                    blocks_a[k],
                    blocks_b[k],
                    block=f"messages[{j}].content"
                    if not isinstance(content_b, list)
                    else f"messages[{j}].content[{k}]",
                    base=["messages", j],
                )
            change.prefix_chars = self.layout.before("messages", j) + base_len + (change.offset or 0)
            self.changes.append(change)
            return
        if len(blocks_b) < len(blocks_a):
            reason = f"{len(blocks_a) - len(blocks_b)} block(s) removed from the message"
        else:
            reason = f"{len(blocks_b) - len(blocks_a)} block(s) added to a message that is not the last"
        change = Change(PREFIX_BREAK, f"messages[{j}].content[{k}]", f"messages[{j}]", reason, offset=base_len)
        change.prefix_chars = self.layout.before("messages", j) + base_len
        self.changes.append(change)

    # -- everything else --------------------------------------------------------------------------

    def options(self) -> None:
        keys = [k for k in dict.fromkeys([*self.prev.keys(), *self.cur.keys()]) if k not in _CORE_KEYS]
        for key in keys:
            a, b = self.prev.get(key), self.cur.get(key)
            if a == b:
                continue
            if key == "model":
                reason = f"model changed {a} -> {b} (a server keyed by model will not reuse this cache)"
                self.changes.append(Change(JSON_ONLY, "model", "model", reason))
                continue
            if key not in self.prev or key not in self.cur:
                self.changes.append(
                    Change(JSON_ONLY, key, key, ("added" if key in self.cur else "removed") + " (not rendered)")
                )
                continue
            leaves = (
                deep_changes(a, b, ignore_cache_control=False)
                if isinstance(a, (dict, list)) and isinstance(b, (dict, list))
                else []
            )
            path = format_path([key, *leaves[0][0]]) if leaves else key
            self.changes.append(
                Change(
                    JSON_ONLY,
                    path,
                    key,
                    (leaves[0][1] if leaves else "value changed") + " (not rendered)",
                    details=[f"{format_path([key, *e])}: {w}" for e, w in leaves[:8]],
                )
            )


def _text_only_change(a: Any, b: Any) -> list[tuple[list[Any], str]] | None:
    """Fast path for the most common break (a text block whose text changed): no deepdiff needed."""
    if (
        not (isinstance(a, dict) and isinstance(b, dict))
        or not isinstance(a.get("text"), str)
        or not isinstance(b.get("text"), str)
    ):
        return None
    keys = (a.keys() | b.keys()) - {"text", "cache_control"}
    if any(a.get(k, _MISSING) != b.get(k, _MISSING) for k in keys):
        return None
    return [(["text"], "value changed")]


_MISSING = object()


def _child_path(value: Any, elements: list[Any]) -> Any:
    for e in elements:
        value = _child(value, e)
    return value


def _flip_equal(sa: Any, sb: Any) -> bool:
    text = sa if isinstance(sa, str) else sb
    blocks = sb if isinstance(sa, str) else sa
    if not isinstance(text, str) or not isinstance(blocks, list):
        return False
    parts = [render_block(b) for b in blocks]
    return text in ("".join(parts), "\n".join(parts), "\n\n".join(parts))


def compare(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> RequestDiff:
    """Classify every change between two consecutive parsed request bodies of one conversation."""
    return RequestDiff(_Comparer(prev, cur).run())


# --- secrets ----------------------------------------------------------------------------------

SECRET_HEADERS = frozenset(
    {"x-api-key", "authorization", "proxy-authorization", "cookie", "set-cookie", "anthropic-api-key"}
)
# Any other header whose name says it carries a credential (x-goog-api-key, api-key, x-auth-token...).
_SECRET_HEADER_NAME = re.compile(r"key|token|secret|auth|cookie|passw(or)?d|credential", re.IGNORECASE)
REDACTED = "[REDACTED]"


def is_secret_header(name: str) -> bool:
    return name.lower() in SECRET_HEADERS or bool(_SECRET_HEADER_NAME.search(name))


_SECRET_PATTERNS = re.compile(r"sk-ant-[A-Za-z0-9_\-]{4,}|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}")


class Redactor:
    """Redacts secret headers, and any value seen in one, wherever it appears in output."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> dict[str, str]:
        items = headers.items() if isinstance(headers, Mapping) else (headers or [])
        out: dict[str, str] = {}
        for k, v in items:
            name = k.lower()
            if is_secret_header(name):
                pieces = [v.strip()]
                if name.endswith("authorization"):
                    pieces.append(v.strip().split(None, 1)[-1])  # the credential without its scheme
                elif "cookie" in name:
                    pieces += [p.split("=", 1)[-1].strip() for p in v.split(";")]
                self.secrets.update(p for p in pieces if len(p) >= 6)
                out[k] = REDACTED
            else:
                out[k] = v
        return out

    def text(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _SECRET_PATTERNS.sub(REDACTED, text)

    def data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value


# --- per-conversation tracking ----------------------------------------------------------------


def identify(
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    *,
    dropped: Iterable[Mapping[str, Any] | str] = (),
) -> payload.RequestIdentity:
    """`payload.identify`, also for a body whose billing block a proxy removed.

    `dropped` holds what normalize removed (its `{"where", "reason", "text"}` records or texts): a
    removed `cc_is_subagent=true` billing block still makes the request a sub-agent's, so that a
    normalized sub-agent without an agent-id header is not mixed into the main conversation.
    """
    ident = payload.identify(body, headers)
    if ident.billing is not None:
        return ident
    for d in dropped:
        text = d if isinstance(d, str) else d.get("text")
        billing = payload.parse_billing_header(text) if isinstance(text, str) else None
        if billing is None:
            continue
        kind = ident.kind
        if kind is payload.RequestKind.MAIN and billing.is_subagent:
            kind = payload.RequestKind.SUBAGENT
        return dataclasses.replace(ident, kind=kind, billing=billing)
    return ident


@dataclass
class Observation:
    """One request seen by the tracker and what changed since the previous one of its conversation."""

    key: str
    identity: payload.RequestIdentity
    index: int  # 1-based position within the conversation
    label: str | None
    previous_label: str | None
    diff: RequestDiff | None  # None for the first request of a conversation
    elapsed_ms: float
    size: int | None = None

    @property
    def broken(self) -> bool:
        return self.diff is not None and self.diff.broken

    def summary_line(self) -> str:
        if self.diff is None:
            return "first request of the conversation"
        return self.diff.summary_line()

    def to_dict(self) -> dict[str, Any]:
        diff = self.diff.to_dict() if self.diff else {"prefix_breaks": [], "growth": [], "json_only": []}
        return {
            "index": self.index,
            "label": self.label,
            "compared_to": self.previous_label,
            "first": self.diff is None,
            "size": self.size,
            **diff,
            "summary": self.summary_line(),
        }


@dataclass
class ConversationStats:
    key: str
    session_id: str | None
    agent_id: str | None
    kind: str
    requests: int = 0
    compared: int = 0
    requests_with_breaks: int = 0
    prefix_breaks: int = 0
    growth: int = 0
    json_only: int = 0
    changed_blocks: Counter = field(default_factory=Counter)  # block -> requests where it broke the prefix
    json_only_blocks: Counter = field(default_factory=Counter)
    history: list[dict[str, Any]] = field(default_factory=list)
    recent_breaks: deque = field(default_factory=lambda: deque(maxlen=20))

    def ranked_blocks(self) -> list[dict[str, Any]]:
        return [
            {
                "block": b,
                "changed": n,
                "requests": self.requests,
                "text": f"{b} changed in {n} of {self.requests} requests",
            }
            for b, n in sorted(self.changed_blocks.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    def to_dict(self, *, with_history: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "session_id": self.session_id,
            "agent_id": self.agent_id,
            "kind": self.kind,
            "counts": {
                "requests": self.requests,
                "compared": self.compared,
                "requests_with_prefix_breaks": self.requests_with_breaks,
                "prefix_breaks": self.prefix_breaks,
                "growth": self.growth,
                "json_only": self.json_only,
            },
            "volatile_blocks": self.ranked_blocks(),
            "json_only_blocks": [{"block": b, "changed": n} for b, n in self.json_only_blocks.most_common()],
        }
        if with_history:
            out["requests"] = list(self.history)
        else:
            out["recent_breaks"] = list(self.recent_breaks)
        return out


class StabilityTracker:
    """Consecutive-request diffs per conversation, with counters for a summary. Thread-safe."""

    def __init__(self, *, max_conversations: int = 128, keep_history: bool = False) -> None:
        self.max_conversations = max_conversations
        self.keep_history = keep_history
        self._previous: OrderedDict[str, tuple[Mapping[str, Any], _Layout, str | None]] = OrderedDict()
        self._stats: OrderedDict[str, ConversationStats] = OrderedDict()
        self._lock = threading.RLock()

    def observe(
        self,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
        *,
        label: str | None = None,
        size: int | None = None,
        extra: Mapping[str, Any] | None = None,
        dropped: Iterable[Mapping[str, Any] | str] = (),
    ) -> Observation:
        """Compare `body` with the previous request of its conversation and count what changed.

        `dropped`: what a proxy removed from the body before (see `identify`). `extra` is merged into
        the kept history record (`keep_history=True`), e.g. a request's source.
        """
        started = time.perf_counter()
        ident = identify(body, headers, dropped=dropped)
        key = ident.conversation_key
        with self._lock:
            prev = self._previous.pop(key, None)
            diff = None
            layout = None
            if prev is not None:
                comparer = _Comparer(prev[0], body, prev[1])
                diff = RequestDiff(comparer.run())
                layout = comparer.layout
            self._previous[key] = (body, layout or _Layout(body), label)
            while len(self._previous) > self.max_conversations:
                self._previous.popitem(last=False)
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = ConversationStats(key, ident.session_id, ident.agent_id, str(ident.kind))
            stats.requests += 1
            obs = Observation(
                key,
                ident,
                stats.requests,
                label,
                prev[2] if prev else None,
                diff,
                (time.perf_counter() - started) * 1000,
                size,
            )
            if diff is not None:
                stats.compared += 1
                breaks = diff.prefix_breaks
                if breaks:
                    stats.requests_with_breaks += 1
                    stats.recent_breaks.append(
                        {"index": obs.index, "label": label, "breaks": [c.to_dict() for c in breaks]}
                    )
                stats.prefix_breaks += len(breaks)
                stats.growth += len(diff.growth)
                stats.json_only += len(diff.json_only)
                stats.changed_blocks.update({c.block for c in breaks})
                stats.json_only_blocks.update({c.block for c in diff.json_only})
            if self.keep_history:
                stats.history.append({**obs.to_dict(), **(extra or {})})
            self._stats.move_to_end(key)
            while len(self._stats) > max(self.max_conversations * 8, 1024):
                self._stats.popitem(last=False)
        return obs

    def conversations(self) -> list[ConversationStats]:
        with self._lock:
            return list(self._stats.values())

    def summary(self) -> dict[str, Any]:
        with self._lock:
            convs = list(self._stats.values())
            overall: Counter = Counter()
            spread: Counter = Counter()
            for c in convs:
                overall.update(c.changed_blocks)
                spread.update(set(c.changed_blocks))
            return {
                "schema_version": SCHEMA_VERSION,
                "totals": {
                    "conversations": len(convs),
                    "requests": sum(c.requests for c in convs),
                    "compared": sum(c.compared for c in convs),
                    "requests_with_prefix_breaks": sum(c.requests_with_breaks for c in convs),
                    "prefix_breaks": sum(c.prefix_breaks for c in convs),
                    "json_only": sum(c.json_only for c in convs),
                },
                "volatile_blocks": [
                    {"block": b, "changed": n, "conversations": spread[b]}
                    for b, n in sorted(overall.items(), key=lambda kv: (-kv[1], kv[0]))
                ],
                "conversations": [c.to_dict(with_history=self.keep_history) for c in convs],
            }

    def markdown(self, summary: Mapping[str, Any] | None = None) -> str:
        return summary_markdown(summary or self.summary())

    def write(self, path: str | Path, redactor: Redactor | None = None) -> list[Path]:
        """Write the summary as JSON and Markdown: `x.json` + `x.md` (or both next to a path without either suffix)."""
        return write_summary(self.summary(), path, redactor)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    t = summary["totals"]
    lines = [
        "# Prompt prefix stability",
        "",
        f"{_n(t['requests'], 'request')} in {_n(t['conversations'], 'conversation')}; "
        f"{t['requests_with_prefix_breaks']} of {t['compared']} compared requests broke the prefix "
        f"({_n(t['prefix_breaks'], 'break')}); {_n(t['json_only'], 'JSON-only change')} noted.",
        "",
    ]
    if summary.get("volatile_blocks"):
        lines += ["## Volatile blocks", "", "| block | prefix breaks | conversations |", "| --- | --- | --- |"]
        lines += [
            f"| `{_md(v['block'])}` | {v['changed']} | {v['conversations']} |" for v in summary["volatile_blocks"]
        ]
        lines.append("")
    lines += ["## Conversations", ""]
    for c in summary["conversations"]:
        n = c["counts"]
        lines += [
            f"### `{_md(c['key'])}` ({c['kind']})",
            "",
            f"{_n(n['requests'], 'request')}, {n['requests_with_prefix_breaks']} with prefix breaks, "
            f"{n['growth']} appended, {_n(n['json_only'], 'JSON-only change')}.",
            "",
        ]
        if c["volatile_blocks"]:
            lines += [
                f"- `{_md(v['block'])}` changed in {v['changed']} of {v['requests']} requests"
                for v in c["volatile_blocks"]
            ]
            lines.append("")
        requests = c.get("requests")
        if requests:
            lines += ["| # | request | result |", "| --- | --- | --- |"]
            for r in requests:
                if r["prefix_breaks"]:
                    text = "; ".join(
                        f"**break** `{_md(b['path'])}` @{b['offset']}: {_md(b['reason'])}" for b in r["prefix_breaks"]
                    )
                else:
                    text = _md(r["summary"])
                lines.append(f"| {r['index']} | {_md(r.get('source') or r.get('label') or '')} | {text} |")
            lines.append("")
        elif c.get("recent_breaks"):
            lines += ["Recent breaks:", ""]
            for rb in c["recent_breaks"]:
                for b in rb["breaks"]:
                    lines.append(
                        f"- request {rb['index']} ({_md(rb.get('label') or '')}): `{_md(b['path'])}` @{b['offset']}: "
                        f"{_md(b['reason'])}"
                    )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_summary(summary: Mapping[str, Any], path: str | Path, redactor: Redactor | None = None) -> list[Path]:
    path = Path(path).expanduser()
    if path.suffix.lower() in (".json", ".md"):
        stem = path.with_suffix("")
    else:
        stem = path
    json_path, md_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
    redactor = redactor or Redactor()
    data = redactor.data(summary)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(redactor.text(json.dumps(data, indent=2, ensure_ascii=False)) + "\n", encoding="utf-8")
    md_path.write_text(redactor.text(summary_markdown(data)), encoding="utf-8")
    return [json_path, md_path]


# --- a readable outline of one request (the mitmweb content view) ------------------------------


def _size(n: int) -> str:
    return f"{n} B" if n < 10_000 else f"{n / 1000:.1f} KB"


def _oneline(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _original_system(
    system: Any, dropped: Sequence[Mapping[str, Any]]
) -> list[tuple[int, Any, Mapping[str, Any] | None]]:
    """System blocks in the client's indexing: the forwarded blocks with normalize's drops put back."""
    blocks = _system_blocks(system)
    by_index: dict[int, Mapping[str, Any]] = {}
    for d in dropped or ():
        m = re.fullmatch(r"system\[(\d+)\]", str(d.get("where", "")))
        if m:
            by_index[int(m.group(1))] = d
    out: list[tuple[int, Any, Mapping[str, Any] | None]] = []
    forwarded = iter(blocks)
    index = 0
    total = len(blocks) + len(by_index)
    while index < total:
        if index in by_index:
            d = by_index[index]
            out.append((index, {"type": "text", "text": d.get("text", "")}, d))
        else:
            try:
                out.append((index, next(forwarded), None))
            except StopIteration:
                break
        index += 1
    return out


def _change_lines(change: Mapping[str, Any], indent: str = "  ") -> list[str]:
    lines = [
        f"{indent}{change['path']}"
        + (f" @{change['offset']}" if change.get("offset") is not None else "")
        + (f" ({change['prefix_chars']} chars before it unchanged)" if change.get("prefix_chars") is not None else "")
        + f": {change['reason']}"
    ]
    ex = change.get("excerpt")
    if ex:
        before = " ".join(ex.get("before", "").split())[-40:]
        lines.append(f"{indent}  - …{before}[{_oneline(ex.get('old', ''), 80)}]{_oneline(ex.get('after', ''), 30)}")
        lines.append(f"{indent}  + …{before}[{_oneline(ex.get('new', ''), 80)}]{_oneline(ex.get('after', ''), 30)}")
    return lines


def describe_request(
    body: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    size: int | None = None,
    dropped: Sequence[Mapping[str, Any]] = (),
    result: Mapping[str, Any] | None = None,
) -> str:
    """Plain-text outline of a /v1/messages body: system blocks, tools, messages, and the stability result."""
    ident = payload.identify(body, headers)
    lines: list[str] = []
    head = [f"model {body.get('model')}"]
    if body.get("stream"):
        head.append("stream")
    if "max_tokens" in body:
        head.append(f"max_tokens {body.get('max_tokens')}")
    if size is not None:
        head.append(_size(size))
    lines.append("Claude Code request: " + ", ".join(head))
    key = (result or {}).get("conversation") or ident.conversation_key
    index = f", request {result['index']} of it" if result and result.get("index") else ""
    lines.append(f"conversation {key} ({ident.kind}{index})")
    lines.append("")

    system = body.get("system")
    entries = _original_system(system, dropped)
    n_dropped = sum(1 for _, _, d in entries if d is not None)
    form = "a string" if isinstance(system, str) else f"{len(entries)} blocks"
    extra = f", {n_dropped} dropped by normalize, {len(entries) - n_dropped} forwarded" if n_dropped else ""
    lines.append(f"system: {form}{extra}")
    forwarded_index = 0
    for index_, block, d in entries:
        text = render_block(block)
        flags = []
        if d is not None:
            flags.append(f"DROPPED by normalize ({d.get('reason', '')})")
        else:
            if isinstance(block, dict) and block.get("cache_control"):
                flags.append("cache_control")
            if forwarded_index != index_:
                flags.append(f"forwarded as system[{forwarded_index}]")
            forwarded_index += 1
        if payload.parse_billing_header(text) and d is None:
            flags.append("billing block")
        lines.append(
            f"  [{index_}] {len(text):>7} chars  {short_hash(text)}  {_oneline(text, 50)!r}"
            + (f"  <- {'; '.join(flags)}" if flags else "")
        )
    for d in dropped or ():
        if not str(d.get("where", "")).startswith("system["):
            lines.append(f"  {d.get('where')}: DROPPED by normalize ({d.get('reason', '')})")
    tools = _as_list(body.get("tools"))
    if tools:
        tools_json = sum(len(render_tool(t)) for t in tools)
        names = [_tool_name(t) for t in tools]
        lines.append(
            f"tools: {len(tools)} tools, {_size(tools_json)} JSON, hash "
            f"{short_hash(''.join(render_tool(t) for t in tools))}"
        )
        lines.append("  " + ", ".join(names[:40]) + (f", … ({len(names) - 40} more)" if len(names) > 40 else ""))
    else:
        lines.append("tools: none (a side request)")
    messages = _as_list(body.get("messages"))
    roles = Counter(str(m.get("role")) if isinstance(m, dict) else "?" for m in messages)
    kinds = Counter(
        str(b.get("type", "?")) if isinstance(b, dict) else "string" for m in messages for b in message_blocks(m)
    )
    lines.append(
        f"messages: {len(messages)} ({', '.join(f'{r} {n}' for r, n in roles.items())}); blocks: "
        + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    )
    if len(messages) <= 60:
        shown: list[tuple[int | None, Any]] = list(enumerate(messages))
    else:
        shown = [
            *enumerate(messages[:10]),
            (None, None),
            *((len(messages) - 40 + i, m) for i, m in enumerate(messages[-40:])),
        ]
    for real, m in shown:
        if real is None:
            lines.append(f"  … {len(messages) - 50} messages not shown …")
            continue
        rendered = render_message(m)[1]
        types = [str(b.get("type", "?")) if isinstance(b, dict) else "string" for b in message_blocks(m)]
        cc = (
            " cache_control"
            if isinstance(m, dict)
            and isinstance(m.get("content"), list)
            and any(isinstance(b, dict) and b.get("cache_control") for b in m["content"])
            else ""
        )
        lines.append(
            f"  [{real}] {str(m.get('role') if isinstance(m, dict) else '?'):<9} {', '.join(types)} "
            f"({sum(len(t) for t in rendered)} chars){cc}"
        )
    lines.append("")

    if result is None:
        lines.append("diff to the previous request: not available (not diffed yet, or not a /v1/messages request)")
        return "\n".join(lines) + "\n"
    if result.get("first") or not result.get("compared_to"):
        lines.append("diff: first request of this conversation seen by the proxy")
    else:
        lines.append(
            f"diff to the previous request of this conversation (flow {result.get('compared_to')}): "
            f"{result.get('summary', '')}"
        )
    breaks = result.get("prefix_breaks") or []
    if breaks:
        lines.append(f"PREFIX BREAKS ({len(breaks)}):")
        for c in breaks:
            lines += _change_lines(c)
    growth = result.get("growth") or []
    if growth:
        lines.append(f"appended ({len(growth)}): " + "; ".join(f"{c['path']} {c['reason']}" for c in growth[:12]))
    notes = result.get("json_only") or []
    if notes:
        lines.append(f"JSON-only, not rendered ({len(notes)}):")
        lines += [f"  {c['path']}: {c['reason']}" for c in notes[:20]]
    if result.get("normalize_dropped"):
        lines.append(
            "normalize dropped before forwarding: "
            + "; ".join(f"{d.get('where')} ({d.get('reason')})" for d in result["normalize_dropped"])
        )
    return "\n".join(lines) + "\n"
