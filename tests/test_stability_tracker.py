"""ccwarm.stability over whole sessions: the per-conversation tracker, its reports, the redactor
and the one-request outline. The case-by-case classification is in test_stability_compare.py."""

from __future__ import annotations

import json

from test_stability_compare import DATE_NEW, DATE_OLD

from ccwarm import payload, stability
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec

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
