"""ccwarm.stability: how a change between two consecutive requests is classified (prefix break,
growth, JSON-only), case by case and on arbitrary bodies."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ccwarm import payload, stability
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec

DATE_OLD, DATE_NEW = "2026-11-22", "2026-11-23"


def main_bodies(turns: int = 5, **spec) -> list[dict]:
    return [r.body for r in SessionGenerator(SessionSpec(turns=turns, **spec)).main_turns()]


def tools_chars(body: dict) -> int:
    return sum(len(stability.render_tool(t)) for t in body["tools"])


def system_chars(body: dict) -> int:
    return sum(len(b["text"]) for b in body["system"])


def only(changes, kind=stability.PREFIX_BREAK):
    found = [c for c in changes if c.kind == kind]
    assert len(found) == 1, [c.describe() for c in changes]
    return found[0]


# --- single comparisons -----------------------------------------------------------------------


def test_rotating_cch_is_a_break_at_the_billing_block_with_changed_fields() -> None:
    a, b, c = main_bodies(3)
    for prev, cur in ((a, b), (b, c)):
        diff = stability.compare(prev, cur)
        brk = only(diff.changes)
        old = payload.billing_header_of(prev["system"]).cch
        new = payload.billing_header_of(cur["system"]).cch
        assert old != new
        assert (brk.path, brk.block) == ("system[0].text", "system[0]")
        assert brk.fields == {"cch": [old, new]}
        assert f"cch {old} -> {new}" in brk.reason
        text = prev["system"][0]["text"]
        value_at = text.index("cch=") + 4
        expected = value_at + stability.first_difference(old, new)
        assert brk.offset == expected
        assert brk.prefix_chars == tools_chars(cur) + expected
        assert brk.excerpt["before"].endswith("cch=" + old[: expected - value_at])
        # the new turn's messages are growth; the moved cache_control marker is noted only
        assert [g.path for g in diff.growth] == [
            f"messages[{i}]" for i in range(len(prev["messages"]), len(cur["messages"]))
        ]
        assert diff.json_only and all(j.kind == stability.JSON_ONLY for j in diff.json_only)


def test_billing_field_description_format() -> None:
    old = "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;"
    new = "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=1a2b3; cc_prev_req=req_1;"
    fields = stability.billing_field_changes(old, new)
    assert fields == {"cch": ["56445", "1a2b3"], "cc_prev_req": [None, "req_1"]}
    assert stability.describe_fields(fields) == "cch 56445 -> 1a2b3, cc_prev_req (none) -> req_1"


def test_date_change_in_first_reminder() -> None:
    bodies = main_bodies(3, with_cch=False)
    drifted = copy.deepcopy(bodies[2])
    text = drifted["messages"][0]["content"][0]["text"]
    assert f"Today's date is {DATE_OLD}." in text
    drifted["messages"][0]["content"][0]["text"] = text.replace(DATE_OLD, DATE_NEW)
    diff = stability.compare(bodies[1], drifted)
    brk = only(diff.changes)
    offset = text.index(DATE_OLD) + len(DATE_OLD) - 1  # ...-22 vs ...-23: the last digit
    assert (brk.path, brk.block, brk.offset) == ("messages[0].content[0].text", "messages[0].content[0]", offset)
    assert brk.prefix_chars == tools_chars(drifted) + system_chars(drifted) + offset
    assert brk.reason == "text changed" and brk.fields is None
    assert brk.excerpt["old"] == "2" and brk.excerpt["new"] == "3"
    assert brk.excerpt["after"].startswith(".\n</system-reminder>")


@pytest.mark.parametrize("order", ["swap", "mcp_to_front"])
def test_tool_list_reordered_is_a_break_at_tools(order) -> None:
    bodies = main_bodies(3, with_cch=False)
    cur = copy.deepcopy(bodies[2])
    tools = cur["tools"]
    if order == "swap":
        tools[2], tools[5] = tools[5], tools[2]
        first = 2
    else:  # an MCP server reconnected: its tools move to the front
        cur["tools"] = tools[-3:] + tools[:-3]
        first = 0
    diff = stability.compare(bodies[1], cur)
    brk = only(diff.changes)
    assert (brk.path, brk.block) == ("tools", "tools")
    assert "re-ordered" in brk.reason and f"tools[{first}]" in brk.reason
    assert brk.offset == brk.prefix_chars == sum(len(stability.render_tool(t)) for t in cur["tools"][:first])


def test_tool_added_or_changed() -> None:
    bodies = main_bodies(2, with_cch=False)
    cur = copy.deepcopy(bodies[1])
    cur["tools"].append({"name": "mcp__new__thing", "description": "d", "input_schema": {"type": "object"}})
    brk = only(stability.compare(bodies[0], cur).changes)
    assert brk.path == "tools[25]" and "added mcp__new__thing" in brk.reason
    cur = copy.deepcopy(bodies[1])
    cur["tools"][4]["description"] += " Extra."
    brk = only(stability.compare(bodies[0], cur).changes)
    assert (brk.path, brk.block) == ("tools[4].description", "tools[4]")
    assert brk.offset == stability.render_tool(bodies[0]["tools"][4]).index('","input_schema"')
    assert brk.prefix_chars == sum(len(stability.render_tool(t)) for t in cur["tools"][:4]) + brk.offset


def test_mid_conversation_system_message_inserted_is_a_break_appended_is_growth() -> None:
    bodies = main_bodies(4, with_cch=False)
    prev, cur = bodies[2], copy.deepcopy(bodies[3])
    note = {"role": "system", "content": "The user changed the permission mode to plan."}
    inserted = copy.deepcopy(cur)
    inserted["messages"].insert(3, note)
    brk = only(stability.compare(prev, inserted).changes)
    assert (brk.path, brk.block, brk.offset) == ("messages[3]", "messages[3]", 0)
    assert "role:system message(s) inserted before existing messages" in brk.reason
    assert brk.prefix_chars == tools_chars(cur) + system_chars(cur) + sum(
        stability.message_len(m) for m in cur["messages"][:3]
    )
    appended = copy.deepcopy(cur)
    appended["messages"].append(note)
    diff = stability.compare(prev, appended)
    assert not diff.prefix_breaks
    assert diff.growth[-1].path == f"messages[{len(appended['messages']) - 1}]"
    assert "role:system message appended" in diff.growth[-1].reason


def test_generator_system_message_is_growth() -> None:
    bodies = main_bodies(6, with_cch=False)
    diff = stability.compare(bodies[3], bodies[4])  # turn 5 appends a role:system message
    assert not diff.prefix_breaks
    assert any("role:system message appended" in g.reason for g in diff.growth)


def test_content_list_string_flips_and_cache_control_are_json_only() -> None:
    bodies = main_bodies(3, with_cch=False)
    prev, cur = bodies[1], copy.deepcopy(bodies[2])
    # the generator moves cache_control to the newest block: noted, not flagged
    diff = stability.compare(prev, cur)
    assert not diff.prefix_breaks
    assert [j.reason for j in diff.json_only] == ["cache_control moved"]
    # a one-text-block user message flipped to a string and back
    cur["messages"][0] = {"role": "user", "content": "hello there"}
    before = copy.deepcopy(cur)
    before["messages"][0] = {
        "role": "user",
        "content": [{"type": "text", "text": "hello there", "cache_control": {"type": "ephemeral"}}],
    }
    diff = stability.compare(before, cur)
    assert not diff.prefix_breaks
    note = only(diff.changes, stability.JSON_ONLY)
    assert note.path == "messages[0].content" and "one-block list to a string" in note.reason
    note = only(stability.compare(cur, before).changes, stability.JSON_ONLY)
    assert "a string to a one-block list" in note.reason


def test_options_and_metadata_are_json_only() -> None:
    prev = main_bodies(1, with_cch=False)[0]
    cur = copy.deepcopy(prev)
    cur["metadata"] = {"user_id": json.dumps({"device_id": "x", "session_id": "other"})}
    cur["max_tokens"] = 32000
    cur["output_config"] = {"effort": "low"}
    diff = stability.compare(prev, cur)
    assert not diff.prefix_breaks
    assert sorted(j.path for j in diff.json_only) == ["max_tokens", "metadata.user_id", "output_config.effort"]


def test_messages_removed_is_a_break() -> None:
    bodies = main_bodies(4, with_cch=False)
    compacted = copy.deepcopy(bodies[3])
    del compacted["messages"][1:3]
    diff = stability.compare(bodies[3], compacted)
    brk = diff.prefix_breaks[0]
    assert brk.path == "messages[1]" and "removed" in brk.reason


def test_old_tool_result_edited_reports_deep_path() -> None:
    bodies = main_bodies(4, with_cch=False)
    cur = copy.deepcopy(bodies[3])
    block = cur["messages"][2]["content"][0]
    block["content"] = block["content"][:100] + "X" + block["content"][101:]
    brk = only(stability.compare(bodies[3], cur).changes)
    assert (brk.path, brk.block, brk.offset) == ("messages[2].content[0].content", "messages[2].content[0]", 100)


def test_string_system_prompt_billing_change() -> None:
    prev = {
        "model": "m",
        "system": "x-anthropic-billing-header: cc_version=2.1.39.c39; cch=56445;\nYou are Claude Code.",
        "messages": [{"role": "user", "content": "hi"}],
    }
    cur = dict(prev, system=prev["system"].replace("56445", "1a2b3"))
    brk = only(stability.compare(prev, cur).changes)
    assert brk.path == "system" and brk.fields == {"cch": ["56445", "1a2b3"]}
    assert brk.offset == prev["system"].index("56445")
    flipped = dict(prev, system=[{"type": "text", "text": prev["system"]}])
    note = only(stability.compare(prev, flipped).changes, stability.JSON_ONLY)
    assert "flipped" in note.reason


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), st.text(max_size=40)), min_size=1, max_size=6)
)
def test_appending_messages_is_never_a_break(extra) -> None:
    prev = main_bodies(2, with_cch=False)[1]
    cur = copy.deepcopy(prev)
    cur["messages"] += [{"role": r, "content": t} for r, t in extra]
    diff = stability.compare(prev, cur)
    assert not diff.prefix_breaks
    assert len(diff.growth) == len(extra)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "text", "role", "content", "name", "input", "cache_control", "x"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_bodies = st.fixed_dictionaries(
    {}, optional={"tools": _json, "system": _json, "messages": _json, "model": _json, "metadata": _json}
)


@settings(max_examples=150, deadline=None)
@given(_bodies, _bodies)
# Found by this test: an inserted message whose role was a list (unhashable) raised.
@example({"messages": {}}, {"messages": [{"type": None, "role": []}, None]})
def test_compare_never_raises_on_odd_bodies(a, b) -> None:
    diff = stability.compare(a, b)
    assert all(c.kind in (stability.PREFIX_BREAK, stability.GROWTH, stability.JSON_ONLY) for c in diff.changes)
    assert (a == b) <= (not diff.changes)
    tracker = stability.StabilityTracker()
    tracker.observe(a)
    obs = tracker.observe(b)
    stability.describe_request(b, result=obs.to_dict())
    json.dumps(tracker.summary()) and tracker.markdown()
