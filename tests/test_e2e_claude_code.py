"""The whole chain with the real Claude Code CLI (the version in ccwarm/claude_cli.py):
claude -> mitmdump (normalize) -> companion server.

Drives the runs behind `scripts/e2e_claude_code.py` (ccwarm/testing/e2e_*.py): session A (five
`claude -p` turns with `--continue`: text, a Bash call, a ToolSearch that loads a deferred tool
which is then called, a background sub-agent that calls Read and reports back, a final answer) and
session B (a new `claude -p`), once with normalize on and once off, each against a fresh server on
the tiny model; session C, where a turn goes over the server's context limit and the CLI compacts;
then the interactive UI under tmux in auto mode (classifier requests) with a /compact. Needs npm
(the CLI is installed into .claude-cli/ when missing) and, for the UI test, tmux.
"""

from __future__ import annotations

import re
import shutil

import pytest

from ccwarm.payload import BILLING_HEADER_NAME
from ccwarm.testing import e2e_script as scenario
from ccwarm.testing.claude_runs import ensure_cli
from ccwarm.testing.e2e_chain import tiny_model
from ccwarm.testing.e2e_report import report
from ccwarm.testing.e2e_sessions import run_comparison
from ccwarm.testing.e2e_ui import UI_STEPS, run_interactive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: cannot install the Claude Code CLI"),
]


@pytest.fixture(scope="module")
def cli():
    return ensure_cli()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("e2e-model"))


@pytest.fixture(scope="module")
def probed(cli, tmp_path_factory):
    return scenario.probe_tools(cli, tmp_path_factory.mktemp("e2e-probe"))


@pytest.fixture(scope="module")
def result(cli, model_dir, probed, tmp_path_factory):
    out = run_comparison(cli, model_dir, tmp_path_factory.mktemp("e2e-claude"), probed=probed)
    print(report(out))
    for name, run in out["runs"].items():
        assert run["failure"] is None, f"{name}: {run['failure']}\nlogs: {run['logs']}"
    return out


def main_requests(run, session=None):
    return [r for r in run["requests"] if r["kind"] == "main" and (session is None or r["session"] == session)]


def test_probe_finds_the_tools_the_script_calls(probed) -> None:
    tools, info = probed
    assert tools.bash == "Bash" and tools.read == "Read"
    assert tools.agent in ("Agent", "Task")
    assert "general-purpose" in tools.agent_types, info["agent_types"]
    assert "ToolSearch" in info["tools"]


def test_every_turn_answered_and_final_answer_on_stdout(result) -> None:
    for name in ("normalize_on", "normalize_off"):
        run = result["runs"][name]
        turns = {t["label"]: t for t in run["turns"]}
        assert len(turns) == len(scenario.SESSION_A) + len(scenario.SESSION_B), name
        assert all(t["rc"] == 0 for t in turns.values()), turns
        assert scenario.FINAL_ANSWER in turns["A5 final"]["stdout"]
        assert scenario.NEW_SESSION_ANSWER in turns["B1 new session"]["stdout"]


def test_tools_deferred_tool_and_background_subagent_went_through_the_chain(result) -> None:
    for name in ("normalize_on", "normalize_off"):
        reqs = result["runs"][name]["requests"]
        calls = [c for r in reqs for c in r["tool_calls"]]
        for tool in ("Bash", "Read", "ToolSearch", scenario.DEFERRED_TOOL):
            assert tool in calls, (name, calls)
        assert any(c in ("Agent", "Task") for c in calls), (name, calls)
        sub = [r for r in reqs if r["kind"] == "subagent"]
        assert len(sub) >= 2 and all(r["agent_id"] for r in sub), (name, sub)
        assert not any(scenario.UNSCRIPTED in (r["reply"] or "") for r in reqs), (
            f"{name}: a request matched no scripted reply"
        )
        assert all(r["status"] == 200 for r in reqs), [(r["n"], r["status"]) for r in reqs]
        assert result["runs"][name]["server_rejections"] == [], result["runs"][name]["server_rejections"]


def test_no_billing_block_reaches_the_server_with_normalize(result) -> None:
    on = result["runs"]["normalize_on"]
    assert on["requests"], "no request was recorded"
    for r in on["requests"]:
        assert not r["billing_forwarded"], f"request {r['n']} was forwarded with {BILLING_HEADER_NAME}"
        assert any(d.startswith("system[0]: billing header") for d in r["normalize_dropped"]), r
        # The server tokenized exactly the forwarded body the flow file holds (same renderer, same count).
        assert r["rendered"] == r["prompt"], r
    off = result["runs"]["normalize_off"]
    assert all(r["billing_forwarded"] for r in off["requests"] if r["kind"] != "side")


def test_warm_main_turns_prefill_no_more_than_the_ideal(result) -> None:
    """Every warm main turn, the one after ToolSearch loaded a tool included, prefills at most
    1.05x what a cache holding every earlier prompt and answer would (plus the end-of-turn token)."""
    on = result["runs"]["normalize_on"]
    main = main_requests(on, "A")
    assert len(main) >= 8, [r["n"] for r in main]
    cold, warm = main[0], main[1:]
    assert cold["restored"] == 0 and cold["prefilled"] == cold["prompt"]
    assert cold["prompt"] > 8000 and cold["system_tools"] > 5000
    for r in warm:
        assert r["restored"] >= r["system_tools"], r
        assert r["prefilled"] <= 1.05 * r["ideal_prefilled"] + 2, r
    loaded = [r for r in warm if scenario.DEFERRED_TOOL in r["tool_calls"]]
    assert loaded, "the deferred tool was never called"


def test_new_session_reuses_the_prefix_only_with_normalize(result) -> None:
    on, off = result["runs"]["normalize_on"], result["runs"]["normalize_off"]
    b_on, b_off = main_requests(on, "B")[0], main_requests(off, "B")[0]
    # normalize on: system + tools left by session A is restored, the break is in the first message
    assert b_on["restored"] >= b_on["system_tools"], b_on
    assert b_on["cross_session_block"] and b_on["cross_session_block"].startswith("messages["), b_on
    # normalize off: the billing block's cc_version suffix differs per conversation, at token ~0
    assert b_off["restored"] < 0.02 * b_off["prompt"], b_off
    assert b_off["prefilled"] > 0.98 * b_off["prompt"], b_off
    assert b_off["cross_session_block"] == "system[0]", b_off["cross_session"]
    assert "cc_version" in b_off["cross_session"], b_off["cross_session"]


def test_prefilled_against_ideal(result) -> None:
    on, off = result["runs"]["normalize_on"]["totals"], result["runs"]["normalize_off"]["totals"]
    # With normalize, the server prefills what an ideal cache would (give or take the end-of-turn
    # tokens of each reply); without it, at least one system + tools prefix more.
    assert on["prefilled"] <= 1.05 * on["ideal_prefilled"] + 2 * on["served"]
    assert off["ideal_prefilled"] == pytest.approx(on["ideal_prefilled"], rel=0.05)
    b_on = main_requests(result["runs"]["normalize_on"], "B")[0]
    assert off["prefilled"] - on["prefilled"] > 0.8 * b_on["system_tools"]


def test_a_prompt_over_the_limit_makes_the_cli_compact(result) -> None:
    run = result["runs"]["compaction"]
    assert run["failure"] is None, run["failure"]
    limit = run["max_context"]
    refused = run["server_rejections"]
    assert refused and all(r["status"] == 400 for r in refused), refused
    assert all(re.fullmatch(rf"prompt is too long: \d+ tokens > {limit} maximum", r["message"]) for r in refused), (
        refused
    )
    kinds = [r["kind"] for r in run["requests"] if r["status"] == 200]
    assert "compaction" in kinds, kinds
    assert "E2E-ANSWER-C2" in run["turns"][-1]["stdout"]


def test_interactive_ui_under_tmux(cli, model_dir, probed, tmp_path_factory) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    ui = run_interactive(cli, model_dir, tmp_path_factory.mktemp("e2e-ui"), tools=probed[0])
    print(report({"interactive": ui}))
    assert ui["failure"] is None, ui["failure"] + "\n" + "\n=====\n".join(ui["screens"][-3:])
    assert [s["expect"] for s in ui["steps"]] == [expect for _, expect in UI_STEPS]
    assert "trust this folder: yes" in ui["dialogs_answered"]
    assert "use this API key: yes" in ui["dialogs_answered"]
    reqs = ui["requests"]
    assert all(r["status"] == 200 for r in reqs) and ui["server_rejections"] == []
    assert not any(r["billing_forwarded"] for r in reqs)
    main = [r for r in reqs if r["kind"] == "main"]
    assert len(main) >= 4 and all(r["restored"] >= r["system_tools"] for r in main[1:]), main
    classifier = [r for r in reqs if r["kind"] == "classifier"]
    assert classifier, [r["kind"] for r in reqs]
    # After the first, a classifier check restores at least 90% of its ~33k-token prompt.
    assert all(r["restored"] >= 0.9 * r["prompt"] for r in classifier[1:]), classifier
    assert any(r["kind"] == "compaction" for r in reqs)
