"""The whole chain with the real Claude Code CLI: claude -> mitmdump (normalize) -> companion server.

Drives `scripts/e2e_claude_code.py`: session A (four `claude -p` turns with `--continue`: text, a
Bash call, a sub-agent that calls Read, a final answer) and session B (a new `claude -p`), once with
normalize on and once off, each against a fresh server on the tiny model; then the interactive UI
under tmux. Needs npm (the CLI is installed into .claude-cli/ when missing) and, for the UI test, tmux.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest

from ccwarm.harness import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: cannot install the Claude Code CLI"),
]


def _load_script():
    spec = importlib.util.spec_from_file_location("e2e_claude_code", REPO / "scripts" / "e2e_claude_code.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


e2e = _load_script()


@pytest.fixture(scope="module")
def cli():
    return e2e.ensure_cli()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return e2e.tiny_model(tmp_path_factory.mktemp("e2e-model"))


@pytest.fixture(scope="module")
def probed(cli, tmp_path_factory):
    return e2e.probe_tools(cli, tmp_path_factory.mktemp("e2e-probe"))


@pytest.fixture(scope="module")
def result(cli, model_dir, probed, tmp_path_factory):
    out = e2e.run_comparison(cli, model_dir, tmp_path_factory.mktemp("e2e-claude"), probed=probed)
    print(e2e.report(out))
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


def test_every_turn_answered_and_final_answer_on_stdout(result) -> None:
    for name, run in result["runs"].items():
        turns = {t["label"]: t for t in run["turns"]}
        assert len(turns) == len(e2e.SESSION_A) + len(e2e.SESSION_B), name
        assert all(t["rc"] == 0 for t in turns.values()), turns
        assert e2e.FINAL_ANSWER in turns["A4 final"]["stdout"]
        assert e2e.NEW_SESSION_ANSWER in turns["B1 new session"]["stdout"]


def test_tool_call_and_subagent_went_through_the_chain(result) -> None:
    for name, run in result["runs"].items():
        reqs = run["requests"]
        calls = [c for r in reqs for c in r["tool_calls"]]
        assert "Bash" in calls and "Read" in calls and any(c in ("Agent", "Task") for c in calls), (name, calls)
        sub = [r for r in reqs if r["kind"] == "subagent"]
        assert len(sub) >= 2 and all(r["agent_id"] for r in sub), (name, sub)
        assert not any(e2e.UNSCRIPTED in (r["reply"] or "") for r in reqs), f"{name}: a request matched no scripted reply"
        assert all(r["status"] == 200 for r in reqs), [(r["n"], r["status"]) for r in reqs]
        assert run["server_rejections"] == [], run["server_rejections"]


def test_no_billing_block_reaches_the_server_with_normalize(result) -> None:
    on = result["runs"]["normalize_on"]
    assert on["requests"], "no request was recorded"
    for r in on["requests"]:
        assert not r["billing_forwarded"], f"request {r['n']} was forwarded with {e2e.BILLING}"
        assert any(d.startswith("system[0]: billing header") for d in r["normalize_dropped"]), r
        # The server tokenized exactly the forwarded body the flow file holds (same renderer, same count).
        assert r["rendered"] == r["prompt"], r
    # The check sees the block when it is there.
    off = result["runs"]["normalize_off"]
    assert all(r["billing_forwarded"] for r in off["requests"] if r["kind"] != "side")


def test_warm_main_turns_restore_system_and_tools(result) -> None:
    on = result["runs"]["normalize_on"]
    main = main_requests(on, "A")
    assert len(main) >= 6, [r["n"] for r in main]
    cold, warm = main[0], main[1:]
    assert cold["restored"] == 0 and cold["prefilled"] == cold["prompt"]
    assert cold["prompt"] > 20000 and cold["system_tools"] > 20000
    for r in warm:
        assert r["restored"] >= r["system_tools"], r
        assert r["prefilled"] < 0.1 * r["prompt"], r
        assert r["ttft_s"] < cold["ttft_s"], r


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
    # tokens of each reply); without it, a whole system + tools prefix more.
    assert on["prefilled"] <= on["ideal_prefilled"] + 8 * on["served"]
    assert off["ideal_prefilled"] == pytest.approx(on["ideal_prefilled"], abs=200)
    assert off["prefilled"] - on["prefilled"] > 20000


def test_interactive_ui_under_tmux(cli, model_dir, probed, tmp_path_factory) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    ui = e2e.run_interactive(cli, model_dir, tmp_path_factory.mktemp("e2e-ui"), tools=probed[0])
    print(e2e.report({"interactive": ui}))
    assert ui["failure"] is None, ui["failure"] + "\n" + "\n=====\n".join(ui["screens"][-3:])
    assert [s["expect"] for s in ui["steps"]] == ["E2E-UI-ANSWER-1", "E2E-UI-ANSWER-2"]
    assert "trust this folder: yes" in ui["dialogs_answered"]
    assert "use this API key: yes" in ui["dialogs_answered"]
    assert "tool permission: yes" in ui["dialogs_answered"]
    main = [r for r in ui["requests"] if r["kind"] == "main"]
    assert len(main) >= 3 and not any(r["billing_forwarded"] for r in ui["requests"])
    assert all(r["restored"] >= r["system_tools"] for r in main[1:]), main
    assert ui["server_rejections"] == []
