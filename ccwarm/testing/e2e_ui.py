"""The interactive end-to-end run: `claude --permission-mode auto` in tmux through the chain,
answering the first-run dialogs, typing the prompts of `UI_STEPS` and waiting for each scripted
answer on screen, then reading back what went through. Used by scripts/e2e_claude_code.py.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ccwarm.testing.claude_runs import CLI_MODEL, TURN_TIMEOUT, E2EError, cli_env
from ccwarm.testing.e2e_chain import MAX_CONTEXT, chain
from ccwarm.testing.e2e_records import analyse, totals
from ccwarm.testing.e2e_script import ToolNames, forced_replies, make_workspace, probe_tools
from ccwarm.testing.tmux import TerminalError, Tmux, wait_screen

UI_STEPS = (
    ("[[e2e-ui-1]] Say hello.", "E2E-UI-ANSWER-1"),
    ("[[e2e-ui-2]] Create a file and stage it.", "E2E-UI-ANSWER-2"),  # Bash calls that auto mode's
    ("[[e2e-ui-2b]] Unstage it again.", "E2E-UI-ANSWER-2B"),  # classifier checks and allows
    ("/compact", "Compacted"),
    ("[[e2e-ui-3]] Are you still there?", "E2E-UI-ANSWER-3"),
)


def run_interactive(
    cli: Path,
    model_dir: Path,
    root: Path,
    tools: ToolNames | None = None,
    timeout: float = TURN_TIMEOUT,
    max_context: int = MAX_CONTEXT,
) -> dict[str, Any]:
    """`claude --permission-mode auto` under tmux: first-run dialogs, a text answer, a Bash call the
    auto-mode classifier (served locally) allows, /compact, and one more prompt."""
    root.mkdir(parents=True, exist_ok=True)
    if tools is None:
        tools, _ = probe_tools(cli, root / "probe")
    home, work = make_workspace(root / "ui")
    # Offline, the onboarding's connectivity check (GET api.anthropic.com/api/hello) fails and blocks
    # the UI, so the throwaway config marks onboarding done; the trust and API-key dialogs still come.
    (home / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True, "theme": "dark"}))
    script = root / "forced_replies.json"
    script.write_text(json.dumps(forced_replies(work, tools), indent=1))
    screens: list[str] = []
    answered: list[str] = []
    steps: list[dict[str, Any]] = []
    failure = None
    t0 = time.monotonic()
    with chain(root, model_dir, script, normalize=True, max_context=max_context) as stack:
        env = cli_env(home, stack.proxy_port)
        keep = (
            "HOME",
            "PATH",
            "ANTHROPIC_BASE_URL",
            "ANTHROPIC_API_KEY",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
            "IS_SANDBOX",
            "CLAUDE_CODE_AUTO_MODE_SERVER",
            "LANG",
            "LC_ALL",
        )
        env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items() if k in keep)
        command = (
            f"env -i {env_args} TERM=xterm-256color {shlex.quote(str(cli))} --model {CLI_MODEL} --permission-mode auto"
        )
        tmux = Tmux("ccwarm-e2e")
        try:
            tmux.start(command, work)
            ready = r"\? for shortcuts|auto mode on"
            wait_screen(tmux, ready, timeout, screens, answered)
            for prompt, expect in UI_STEPS:
                started = time.monotonic()
                tmux.keys(prompt, literal=True)
                time.sleep(0.3)
                tmux.keys("Enter")
                screen = wait_screen(tmux, re.escape(expect), timeout, screens, answered)
                screens.append(screen)
                steps.append({"prompt": prompt, "expect": expect, "seconds": round(time.monotonic() - started, 2)})
            tmux.keys("C-c")
            time.sleep(0.3)
            tmux.keys("C-c")
        except (E2EError, TerminalError) as e:
            failure = str(e)
        finally:
            screens.append(tmux.screen())
            tmux.close()
    records, rejected = analyse(stack, model_dir)
    return {
        "steps": steps,
        "dialogs_answered": answered,
        "screens": screens,
        "failure": failure,
        "wall_s": round(time.monotonic() - t0, 2),
        "requests": [asdict(r) for r in records],
        "totals": totals(records),
        "server_rejections": rejected,
        "logs": {"server": str(stack.server_log), "mitmdump": str(stack.mitm_log), "flows": str(stack.flows)},
    }
