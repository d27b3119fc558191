"""Compare two consecutive requests of one conversation: tools, system, options here; the
message list in `messages.py`.

Speed: blocks are compared by equality first (C-level dict/list comparison); deepdiff only runs
on blocks whose rendered text differs, and cheap detectors classify the common JSON-only changes
(moved `cache_control`, list/string flips) without it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from ccwarm import payload
from ccwarm.stability.changes import (
    EXCERPT_MAX,
    JSON_ONLY,
    PREFIX_BREAK,
    Change,
    RequestDiff,
    billing_field_changes,
    child,
    deep_changes,
    describe_fields,
    excerpt,
    first_difference,
    format_path,
)
from ccwarm.stability.messages import compare_messages
from ccwarm.stability.render import (
    as_list,
    message_len,
    render_block,
    render_tool,
    system_blocks,
    system_text,
    tool_name,
    upfront_tools,
    without_cache_control,
)

_CORE_KEYS = ("tools", "system", "messages")


class Layout:
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
            self._system = [len(render_block(b)) for b in system_blocks(self.body.get("system"))]
        return self._system

    @property
    def messages(self) -> list[int]:
        if self._messages is None:
            self._messages = [message_len(m) for m in as_list(self.body.get("messages"))]
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

    def adopt_tools(self, other: Layout) -> None:
        if other._tools is not None:
            self._tools = other._tools


class Comparer:
    def __init__(self, prev: Mapping[str, Any], cur: Mapping[str, Any], prev_layout: Layout | None = None) -> None:
        self.prev, self.cur = prev, cur
        self.layout = Layout(cur)
        self.prev_layout = prev_layout or Layout(prev)
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
        if without_cache_control(a) == without_cache_control(b):
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
        names_a, names_b = [tool_name(t) for t in ta], [tool_name(t) for t in tb]
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
                by_name.setdefault(tool_name(t), t)
            for j, t in enumerate(tb):
                old = by_name.get(tool_name(t))
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
        ta, tb = system_text(sa), system_text(sb)
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
        compare_messages(self)

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
        value = child(value, e)
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
    return RequestDiff(Comparer(prev, cur).run())
