"""The message list of two consecutive requests: appended, removed, inserted, changed.

Equal messages are skipped by equality; when only JSON changed (no rendered difference) the
fast path reports JSON-only changes; otherwise difflib aligns the two lists by rendered text.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from ccwarm.stability.changes import EXCERPT_MAX, GROWTH, PREFIX_BREAK, Change, excerpt
from ccwarm.stability.render import as_list, describe_message, render_message

if TYPE_CHECKING:
    from ccwarm.stability.compare import Comparer


class _Messages:
    """The messages part of one `Comparer` run; appends to its `changes`."""

    def __init__(self, comparer: Comparer) -> None:
        self.c = comparer

    def run(self) -> None:
        ma, mb = as_list(self.c.prev.get("messages")), as_list(self.c.cur.get("messages"))
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
                self.c.changes.append(self.c._json_only(["messages", i], ma[i], mb[i], section="messages"))
            if len(mb) > len(ma):
                for j in range(len(ma), len(mb)):
                    self.c.changes.append(self._appended(mb[j], j))
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
        return Change(GROWTH, f"messages[{j}]", f"messages[{j}]", f"{what} ({describe_message(message)})")

    def _removed(self, ma: list[Any], i1: int, i2: int, j: int) -> None:
        text = "".join(render_message(ma[i1])[1])
        self.c._break(
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
                        self.c.changes.append(self.c._json_only(["messages", j], ma[i], mb[j], section="messages"))
                continue
            if op == "insert":
                if i1 >= len(ma):  # after everything the previous request had: growth
                    for j in range(j1, j2):
                        self.c.changes.append(self._appended(mb[j], j))
                    continue
                roles = {rb[j][0] for j in range(j1, j2)}  # rendered: a role of any JSON type is a str
                what = "role:system message" if roles == {"system"} else "message"
                text = "".join(rb[j1][1])
                self.c._break(
                    Change(
                        PREFIX_BREAK,
                        f"messages[{j1}]",
                        f"messages[{j1}]",
                        f"{j2 - j1} {what}(s) inserted before existing messages ({describe_message(mb[j1])})",
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
                        self.c.changes.append(self._appended(mb[j], j))
                else:
                    self.c._break(
                        Change(
                            PREFIX_BREAK,
                            f"messages[{start}]",
                            f"messages[{start}]",
                            f"{j2 - start} message(s) inserted before existing messages "
                            f"({describe_message(mb[start])})",
                            offset=0,
                        ),
                        "messages",
                        start,
                    )

    def _message_pair(self, ma: list[Any], mb: list[Any], ra: list[Any], rb: list[Any], i: int, j: int) -> None:
        a, b = ma[i], mb[j]
        (role_a, blocks_a), (role_b, blocks_b) = ra[i], rb[j]
        if ra[i] == rb[j]:
            self.c.changes.append(self.c._json_only(["messages", j], a, b, section="messages"))
            return
        # the last message of the previous request grew new blocks: still append-only
        if i == len(ma) - 1 and role_a == role_b and blocks_b[: len(blocks_a)] == blocks_a:
            self.c.changes.append(
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
            self.c._break(
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
                change = self.c._changed_block(
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
                change = self.c._changed_block(
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
            change.prefix_chars = self.c.layout.before("messages", j) + base_len + (change.offset or 0)
            self.c.changes.append(change)
            return
        if len(blocks_b) < len(blocks_a):
            reason = f"{len(blocks_a) - len(blocks_b)} block(s) removed from the message"
        else:
            reason = f"{len(blocks_b) - len(blocks_a)} block(s) added to a message that is not the last"
        change = Change(PREFIX_BREAK, f"messages[{j}].content[{k}]", f"messages[{j}]", reason, offset=base_len)
        change.prefix_chars = self.c.layout.before("messages", j) + base_len
        self.c.changes.append(change)

    # -- everything else --------------------------------------------------------------------------


def compare_messages(comparer: Comparer) -> None:
    _Messages(comparer).run()
