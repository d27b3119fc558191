"""What the end-to-end run asks the real CLI and what the scripted model answers: the markers each
prompt and tool output carries, the forced-replies script keyed on them, the sessions' turns,
the throwaway repository, and a probe of which tools the CLI offers. Used by
scripts/e2e_claude_code.py (and its test, through the script's names).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccwarm import payload
from ccwarm.testing.claude_runs import E2EError, cli_env, run_claude
from ccwarm.testing.upstream import RecordingUpstream

# Markers: each prompt and each tool output carries one, and the forced-replies script keys on them.
FINAL_ANSWER = "E2E-FINAL-ANSWER: the chain works."
NEW_SESSION_ANSWER = "E2E-NEW-SESSION-ANSWER: hello again."
SUBAGENT_DONE = "E2E-SUBAGENT-DONE"
READ_MARKER = "e2e-read-marker"
BASH_MARKER = "e2e-bash-output"
UNSCRIPTED = "E2E-UNSCRIPTED"
TITLE_JSON = '{"title": "Scripted end-to-end session"}'


def make_workspace(root: Path) -> tuple[Path, Path]:
    """(HOME, working folder): a throwaway home and a small git repository with two files."""
    home, work = root / "home", root / "work"
    home.mkdir(parents=True)
    work.mkdir(parents=True)
    (work / "hello.py").write_text(f'print("{READ_MARKER}: hello from the e2e repo")\n')
    (work / "README.md").write_text("# e2e demo\n\nA throwaway repository for the ccwarm end-to-end run.\n")
    git = ["git", "-c", "user.name=ccwarm e2e", "-c", "user.email=e2e@example.invalid", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "Initial commit"]):
        subprocess.run([*git, *args], cwd=work, check=True, capture_output=True, env={**os.environ, "HOME": str(home)})
    return home, work


@dataclass(frozen=True)
class ToolNames:
    """What the captured request offers: the names our scripted calls use, checked against the schemas."""

    bash: str
    read: str
    agent: str
    agent_types: tuple[str, ...]
    all_names: tuple[str, ...]


def tool_call(name: str, args: dict[str, Any]) -> str:
    from cache_backend.hermes import tool_call_markup

    return tool_call_markup(name, args)


NOTEBOOK = "e2e-notebook-cell.ipynb"  # the deferred tool's target; its name is the marker of its result
DEFERRED_TOOL = "NotebookEdit"  # behind ToolSearch in the current CLI, and local (no network)
COMPACT_SUMMARY = "E2E-SUMMARY: the user sent a long log and asked about it."


def forced_replies(work: Path, tools: ToolNames) -> list[dict[str, str]]:
    """The forced-replies script: first entry whose `when` is in the last message's JSON wins."""
    subagent_type = (
        "general-purpose" if "general-purpose" in tools.agent_types or not tools.agent_types else tools.agent_types[0]
    )
    return [
        # Auto mode's permission classifier (its transcript quotes our prompts, so it comes first).
        {"when": "<transcript>", "reply": "<severity>5</severity>"},
        # /compact's summary request (it carries the last user message and so its marker too).
        {"when": "CRITICAL: Respond with TEXT ONLY", "reply": f"<summary>{COMPACT_SUMMARY}</summary>"},
        # Side request: session title generation (interactive mode), a json_schema answer.
        {"when": "<session>", "reply": TITLE_JSON},
        # Main thread, told by the task notification that the background sub-agent finished.
        {"when": SUBAGENT_DONE, "reply": "The sub-agent read hello.py: it prints a greeting. E2E-ANSWER-4"},
        # Sub-agent, after its Read call returned the file.
        {"when": READ_MARKER, "reply": f"hello.py prints {READ_MARKER}. {SUBAGENT_DONE}"},
        # Sub-agent, first request: its prompt.
        {"when": "[[e2e-subagent]]", "reply": tool_call(tools.read, {"file_path": str(work / "hello.py")})},
        # Main thread, right after launching the background agent.
        {"when": "Async agent launched", "reply": "A sub-agent is reading hello.py in the background."},
        # Main thread, after Bash returned.
        {"when": BASH_MARKER, "reply": "The folder holds README.md and hello.py. E2E-ANSWER-2"},
        # ToolSearch loaded the deferred tool: call it; then answer on its result.
        {
            "when": f'"tool_name": "{DEFERRED_TOOL}"',
            "reply": tool_call(
                DEFERRED_TOOL,
                {
                    "notebook_path": str(work / NOTEBOOK),
                    "new_source": "print('e2e')",
                    "cell_type": "code",
                    "edit_mode": "insert",
                },
            ),
        },
        {"when": NOTEBOOK, "reply": "The notebook has a new cell. E2E-ANSWER-3"},
        {"when": "[[e2e-turn-1]]", "reply": "Hello! This answer comes from the local model. E2E-ANSWER-1"},
        {
            "when": "[[e2e-turn-2]]",
            "reply": tool_call(tools.bash, {"command": f"echo {BASH_MARKER} && ls", "description": "List files"}),
        },
        {
            "when": "[[e2e-turn-3]]",
            "reply": tool_call("ToolSearch", {"query": f"select:{DEFERRED_TOOL}", "max_results": 1}),
        },
        {
            "when": "[[e2e-turn-4]]",
            "reply": tool_call(
                tools.agent,
                {
                    "description": "Inspect hello.py",
                    "prompt": "[[e2e-subagent]] Read hello.py and say what it prints.",
                    "subagent_type": subagent_type,
                },
            ),
        },
        {"when": "[[e2e-turn-5]]", "reply": FINAL_ANSWER},
        {"when": "[[e2e-session-2]]", "reply": NEW_SESSION_ANSWER},
        # Session C: a turn over the server's context limit, answered after the CLI compacted.
        {"when": "[[e2e-compact-2]]", "reply": "After compaction: the log is long. E2E-ANSWER-C2"},
        {"when": "[[e2e-compact-1]]", "reply": "Noted the log. E2E-ANSWER-C1"},
        # Interactive run.
        {"when": "[[e2e-ui-1]]", "reply": "E2E-UI-ANSWER-1: hello on screen."},
        # Not a read-only command: auto mode asks the classifier first.
        {
            "when": "[[e2e-ui-2]]",
            "reply": tool_call(
                tools.bash,
                {
                    "command": "touch e2e-ui-created.txt && git add e2e-ui-created.txt && echo e2e-ui-bash",
                    "description": "Create and stage a file",
                },
            ),
        },
        {"when": "e2e-ui-bash-2", "reply": "E2E-UI-ANSWER-2B: unstaged it."},
        {"when": "e2e-ui-bash", "reply": "E2E-UI-ANSWER-2: created the file."},
        {
            "when": "[[e2e-ui-2b]]",
            "reply": tool_call(
                tools.bash,
                {
                    "command": "git rm -q --cached e2e-ui-created.txt && echo e2e-ui-bash-2",
                    "description": "Unstage the file",
                },
            ),
        },
        {"when": "[[e2e-ui-3]]", "reply": "E2E-UI-ANSWER-3: still here after compacting."},
        # NotebookEdit's result, should it not name the file (the other tool results carry markers).
        {"when": '"type": "tool_result"', "reply": "The notebook has a new cell. E2E-ANSWER-3"},
        # Anything else (a request we did not foresee): answer at once instead of sampling 32k tokens.
        {"reply": UNSCRIPTED},
    ]


@dataclass(frozen=True)
class Turn:
    label: str
    prompt: str
    cont: bool
    expect: str  # text that must be on stdout


SESSION_A = (
    Turn("A1 text", "[[e2e-turn-1]] Say hello.", False, "E2E-ANSWER-1"),
    Turn("A2 bash", "[[e2e-turn-2]] List the files in this folder.", True, "E2E-ANSWER-2"),
    Turn("A3 deferred tool", "[[e2e-turn-3]] Load the notebook tool and add a cell.", True, "E2E-ANSWER-3"),
    Turn("A4 background agent", "[[e2e-turn-4]] Ask a sub-agent what hello.py prints.", True, "E2E-ANSWER-4"),
    Turn("A5 final", "[[e2e-turn-5]] Thanks. Summarise in one line.", True, FINAL_ANSWER),
)
SESSION_B = (Turn("B1 new session", "[[e2e-session-2]] Hello again, new session.", False, NEW_SESSION_ANSWER),)
LOG_LINE = "2026-12-02 12:00:00 INFO worker {i}: processed batch {i} of the nightly import without errors"


def compaction_turns(encode: Any, first_tokens: int, second_tokens: int) -> tuple[Turn, ...]:
    """Session C: a long first turn, then one that pushes the prompt over the server's limit."""

    def log_text(tokens: int, start: int) -> str:
        lines: list[str] = []
        while len(encode(" ".join(lines))) < tokens:
            lines += [LOG_LINE.format(i=start + len(lines) + k) for k in range(10)]
        return " ".join(lines)

    return (
        Turn(
            "C1 long log",
            f"[[e2e-compact-1]] Keep this log in mind: {log_text(first_tokens, 0)}",
            False,
            "E2E-ANSWER-C1",
        ),
        Turn(
            "C2 over the limit",
            f"[[e2e-compact-2]] And this one: {log_text(second_tokens, 10_000)}",
            True,
            "E2E-ANSWER-C2",
        ),
    )


def probe_tools(cli: Path, root: Path) -> tuple[ToolNames, dict[str, Any]]:
    """One real request captured by a recording upstream: which tools (and input schemas) it offers."""
    home, work = make_workspace(root)
    upstream = RecordingUpstream(hold_seconds=0.0)
    with upstream.serve():
        run = run_claude(
            cli, cli_env(home, upstream.port), work, "[[e2e-probe]] hi", cont=False, label="probe", timeout=90
        )
    posts = [r for r in upstream.requests if r.method == "POST" and payload.is_messages_path(r.path)]
    bodies = [json.loads(r.body) for r in posts if "count_tokens" not in r.path]
    main = next((b for b in bodies if b.get("tools")), None)
    if main is None:
        raise E2EError(
            f"probe: no /v1/messages request with tools was captured (claude rc={run.returncode}: {run.stderr[-1000:]})"
        )
    schemas = {t["name"]: t.get("input_schema", {}) for t in main["tools"] if isinstance(t, dict) and "name" in t}
    names = tuple(schemas)

    def pick(*candidates: str, required: tuple[str, ...]) -> str:
        for c in candidates:
            if c in schemas:
                props = schemas[c].get("properties", {})
                missing = [r for r in schemas[c].get("required", []) if r not in required]
                unknown = [r for r in required if r not in props]
                if missing or unknown:
                    raise E2EError(
                        f"probe: tool {c} schema changed: required {schemas[c].get('required')}, properties "
                        f"{list(props)}"
                    )
                return c
        raise E2EError(f"probe: none of {candidates} among the offered tools {names}")

    agent = pick("Agent", "Task", required=("description", "prompt", "subagent_type"))
    agent_types: tuple[str, ...] = ()
    enum = schemas[agent].get("properties", {}).get("subagent_type", {}).get("enum")
    if isinstance(enum, list):
        agent_types = tuple(enum)
    else:  # listed in a reminder: "Available agent types for the Agent tool:\n- general-purpose: ..."
        text = "\n".join(
            b.get("text", "")
            for m in main["messages"]
            if isinstance(m.get("content"), list)
            for b in m["content"]
            if isinstance(b, dict)
        )
        section = re.search(r"Available agent types[^\n]*\n((?:- [^\n]*\n?)+)", text)
        if section:
            agent_types = tuple(re.findall(r"^- ([\w-]+):", section.group(1), re.M))
    found = ToolNames(
        bash=pick("Bash", required=("command", "description")),
        read=pick("Read", required=("file_path",)),
        agent=agent,
        agent_types=agent_types,
        all_names=names,
    )
    info = {
        "tools": list(names),
        "agent_tool": agent,
        "agent_types": list(agent_types),
        "first_request": main,
        "schemas": {n: schemas[n] for n in (found.bash, found.read, found.agent)},
        "body_keys": sorted(main),
        "beta": next((r.headers.get("anthropic-beta") for r in posts), None),
    }
    return found, info
