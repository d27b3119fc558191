"""ccwarm.stability: classification of changes between consecutive requests, and the tracker."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
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


# --- the tracker over whole sessions ------------------------------------------------------------


def drifted_session() -> list:
    """Main turns with every kind of drift, a title side request and a sub-agent interleaved."""
    gen = SessionGenerator(SessionSpec(turns=7))
    requests = gen.session()
    mains = [r for r in requests if r.label.startswith("main")]
    for r in mains[2:]:  # from main 3 on: the date rolled over
        block = r.body["messages"][0]["content"][0]
        block["text"] = block["text"].replace(DATE_OLD, DATE_NEW)
    for r in mains[4:]:  # from main 5 on: an MCP server reconnected, its tools come first
        r.body["tools"] = r.body["tools"][-2:] + r.body["tools"][:-2]
    for r in mains[5:]:  # from main 6 on: a role:system message inserted before existing ones
        r.body["messages"].insert(1, {"role": "system", "content": "Plan mode is on."})
    return requests


def test_tracker_on_interleaved_drifted_session() -> None:
    requests = drifted_session()
    tracker = stability.StabilityTracker(keep_history=True)
    seen = {}
    for r in requests:
        seen[r.label] = tracker.observe(json.loads(r.raw()), r.headers, label=r.label)
    # side request and sub-agent are their own conversations: first requests, never compared with main
    assert seen["side: title"].diff is None and seen["side: title"].key.endswith("/side")
    assert seen["subagent 1"].diff is None and "/agent:" in seen["subagent 1"].key
    assert seen["subagent 2"].previous_label == "subagent 1"
    assert [c.path for c in seen["subagent 2"].diff.prefix_breaks] == ["system[0].text"]
    assert seen["main 4"].previous_label == "main 3"  # the sub-agent in between does not count
    paths = {
        label: [c.path for c in o.diff.prefix_breaks]
        for label, o in seen.items()
        if o.diff and label.startswith("main")
    }
    assert paths == {
        "main 2": ["system[0].text"],
        "main 3": ["system[0].text", "messages[0].content[0].text"],
        "main 4": ["system[0].text"],
        "main 5": ["tools", "system[0].text"],
        "main 6": ["system[0].text", "messages[1]"],
        "main 7": ["system[0].text"],
    }
    main = next(c for c in tracker.summary()["conversations"] if c["kind"] == "main")
    assert main["counts"]["requests"] == 7 and main["counts"]["requests_with_prefix_breaks"] == 6
    assert main["volatile_blocks"][0] == {
        "block": "system[0]",
        "changed": 6,
        "requests": 7,
        "text": "system[0] changed in 6 of 7 requests",
    }
    assert {v["block"] for v in main["volatile_blocks"]} == {
        "system[0]",
        "tools",
        "messages[0].content[0]",
        "messages[1]",
    }


def test_normalized_session_has_zero_prefix_breaks() -> None:
    tracker = stability.StabilityTracker()
    for r in SessionGenerator(SessionSpec(turns=8)).session():
        body = json.loads(payload.strip_volatile(r.raw()).body)
        tracker.observe(body, r.headers)
    totals = tracker.summary()["totals"]
    assert totals["requests"] == 11 and totals["compared"] == 8
    assert totals["prefix_breaks"] == 0 and totals["json_only"] > 0


def test_summary_exports_json_and_markdown(tmp_path) -> None:
    tracker = stability.StabilityTracker()
    for r in SessionGenerator(SessionSpec(turns=4)).session():
        tracker.observe(r.body, r.headers, label=r.label)
    written = tracker.write(tmp_path / "report.json")
    assert [p.name for p in written] == ["report.json", "report.md"]
    data = json.loads(written[0].read_text())
    assert data["schema_version"] == stability.SCHEMA_VERSION
    assert data["volatile_blocks"][0] == {"block": "system[0]", "changed": 4, "conversations": 2}
    md = written[1].read_text()
    assert "system[0]` changed in 3 of 4 requests" in md and "| `system[0]` | 4 | 2 |" in md
    assert [p.name for p in tracker.write(tmp_path / "plain")] == ["plain.json", "plain.md"]


def test_tracker_bounds_memory() -> None:
    tracker = stability.StabilityTracker(max_conversations=3)
    for seed in range(6):
        gen = SessionGenerator(SessionSpec(seed=seed, turns=1, tools=2, tools_json_bytes=3000, system_bytes=300))
        tracker.observe(gen.main_turns()[0].body, gen.headers())
    assert len(tracker._previous) == 3 and len(tracker.conversations()) == 6


def test_redactor() -> None:
    red = stability.Redactor()
    headers = red.headers(
        {
            "x-api-key": "sk-ant-test-secret",
            "Authorization": "Bearer abcdef123456",
            "cookie": "a=sessionvalue99",
            "x-app": "cli",
        }
    )
    assert headers == {"x-api-key": "[REDACTED]", "Authorization": "[REDACTED]", "cookie": "[REDACTED]", "x-app": "cli"}
    text = red.text("key sk-ant-test-secret, token abcdef123456, cookie sessionvalue99, other sk-ant-api03-zzzz")
    assert "secret" not in text and "abcdef" not in text and "sessionvalue99" not in text and "zzzz" not in text


def test_describe_request_marks_blocks_dropped_by_normalize() -> None:
    req = SessionGenerator(SessionSpec(turns=2)).main_turns()[-1]
    stripped = payload.strip_volatile(req.raw())
    dropped = [{"where": d.where, "reason": d.reason, "text": d.text} for d in stripped.dropped]
    text = stability.describe_request(json.loads(stripped.body), headers=req.headers, dropped=dropped)
    assert "system: 3 blocks, 1 dropped by normalize, 2 forwarded" in text
    assert "[0]" in text and "DROPPED by normalize (billing header" in text
    assert "forwarded as system[0]" in text
    assert "tools: 25 tools" in text and "messages: 3 (user 2, assistant 1)" in text


# --- a realistic session (its speed is measured by scripts/bench_proxy.py) ----------------------


def test_a_generated_90kb_session_grows_without_breaks() -> None:
    requests = SessionGenerator(SessionSpec(turns=10)).main_turns()
    raws = [r.raw() for r in requests]
    assert 85_000 < len(raws[0]) < 120_000
    tracker = stability.StabilityTracker()
    observations = [tracker.observe(json.loads(raw), r.headers) for r, raw in zip(requests, raws)]
    # The generator rotates only the billing block: every later turn breaks there and only there.
    assert all({c.block for c in o.diff.prefix_breaks} == {"system[0]"} for o in observations[1:])


def test_normalized_subagent_without_agent_header_stays_apart() -> None:
    """After normalize removed the billing block, `cc_is_subagent=true` is only in what it dropped."""
    tracker = stability.StabilityTracker()
    keys = set()
    for r in SessionGenerator(SessionSpec(turns=4)).session():
        headers = {k: v for k, v in r.headers.items() if k.lower() != "x-claude-code-agent-id"}
        stripped = payload.strip_volatile(r.raw())
        dropped = [{"where": d.where, "reason": d.reason, "text": d.text} for d in stripped.dropped]
        obs = tracker.observe(json.loads(stripped.body), headers, dropped=dropped)
        keys.add((obs.key, str(obs.identity.kind)))
        assert not obs.broken
    assert {kind for _, kind in keys} == {"main", "side", "subagent"} and len(keys) == 3


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
def test_compare_never_raises_on_odd_bodies(a, b) -> None:
    diff = stability.compare(a, b)
    assert all(c.kind in (stability.PREFIX_BREAK, stability.GROWTH, stability.JSON_ONLY) for c in diff.changes)
    assert (a == b) <= (not diff.changes)
    tracker = stability.StabilityTracker()
    tracker.observe(a)
    obs = tracker.observe(b)
    stability.describe_request(b, result=obs.to_dict())
    json.dumps(tracker.summary()) and tracker.markdown()


def test_redactor_knows_credential_headers_by_name() -> None:
    red = stability.Redactor()
    headers = red.headers(
        {
            "x-goog-api-key": "AIzaSyExample123",
            "api-key": "azure0123456789",
            "X-Auth-Token": "tkn-999888",
            "x-session-secret": "hush-hush-1",
            "x-db-password": "pw-12345",
            "x-request-id": "req-1",
        }
    )
    assert headers == {
        "x-goog-api-key": "[REDACTED]",
        "api-key": "[REDACTED]",
        "X-Auth-Token": "[REDACTED]",
        "x-session-secret": "[REDACTED]",
        "x-db-password": "[REDACTED]",
        "x-request-id": "req-1",
    }
    assert "AIzaSyExample123" not in red.text("the key AIzaSyExample123 leaked")


def test_redactor_keeps_ordinary_words() -> None:
    red = stability.Redactor()
    red.headers({"authorization": "Bearer tok_abcdef123", "cookie": "theme=darkmode; sid=s3cr3tvalue"})
    assert (
        red.text("Bearer tokens: tok_abcdef123 and s3cr3tvalue, theme darkmode")
        == "Bearer tokens: [REDACTED] and [REDACTED], theme [REDACTED]"
    )


def test_the_outline_of_a_normalized_subagent_request_names_its_kind() -> None:
    """normalize removed the `cc_is_subagent=true` billing block and no agent-id header came: the
    content view must still say sub-agent, as the tracker's conversation key does."""
    body = {
        "model": "claude-x",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "You are a search agent."}],
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "find it"}],
        "metadata": {"user_id": "user_abc_account__session_11111111-2222-3333-4444-555555555555"},
    }
    billing = "x-anthropic-billing-header: cc_version=2.1.332.a1b; cc_entrypoint=cli; cc_is_subagent=true; cch=9f3c1;"
    dropped = [{"where": "system[0]", "reason": "billing header", "text": billing}]
    outline = stability.describe_request(body, dropped=dropped)
    assert "(subagent" in outline, outline
    tracker = stability.StabilityTracker()
    assert tracker.observe(body, dropped=dropped).identity.kind == payload.RequestKind.SUBAGENT
    assert "(main" in stability.describe_request(body)
