#!/usr/bin/env python3
"""End to end with the real Claude Code CLI: claude -> mitmdump (normalize) -> companion server.

Starts the companion server (`python -m cache_backend`, the tiny random-weight model unless
--model) and `mitmdump -s addons/normalize.py [-s addons/stability.py]` in reverse mode before it,
both on free loopback ports, with a throwaway HOME and a throwaway git repository as the working
folder. Then drives the real CLI (installed into the git-ignored `.claude-cli/` when missing):

  session A  turn 1  `claude -p`              plain answer
             turn 2  `claude -p --continue`   the model calls Bash, then answers
             turn 3  `claude -p --continue`   the model spawns a sub-agent (Agent/Task tool),
                                              which calls Read and reports back
             turn 4  `claude -p --continue`   final answer, checked on stdout
  session B          `claude -p`              a new conversation: a different first message and
                                              so a different `cc_version` suffix in the billing block

A random-weight model never calls a tool by itself, so the server runs with the TEST-ONLY
`--test-forced-replies` script: each prompt (and each tool output) carries a unique marker and
the entry whose marker is in the last message decides the reply, fed through the real model as if
sampled (tool calls as the Hermes markup the server parses into `tool_use` blocks).

The same run is done twice: normalize on, and normalize off (`--set normalize=false`), each with
a fresh server and cache. Per request it reports the kind (main, subagent, side), prompt tokens,
tokens restored from the prefix cache, tokens prefilled, TTFT (from the server's structured
records at `GET /v1/cache/requests`, paired with mitmdump's flow file through the `request-id`
response header), the ideal prefill (a cache that kept every earlier prompt and reply:
computed by rendering each forwarded body with the server's own renderer) and the stability
verdict (the stability addon's diff on the flow, or one computed here; for the first request of a
new session, a diff against the previous session's last main request).

    .venv/bin/python scripts/e2e_claude_code.py [--json artifacts/e2e_claude_code.json]
    .venv/bin/python scripts/e2e_claude_code.py --interactive   # the UI under tmux instead

`--interactive` starts `claude` (no -p) in a tmux session on a private tmux socket, answers the
first-run questions (trust this folder, use this API key), types prompts, approves a Bash tool
call, and checks that the scripted answers appear on screen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from ccwarm import payload
from ccwarm.claude_cli import cli_version
from ccwarm.harness import REPO
from ccwarm.stack import proxy_chain
from ccwarm.testing.claude_runs import CLI_MODEL, TURN_TIMEOUT, CliRun, E2EError, cli_env, ensure_cli, run_claude
from ccwarm.testing.e2e_records import PromptRenderer, Stack, analyse, request_figures, totals
from ccwarm.testing.e2e_script import (
    SESSION_A,
    SESSION_B,
    ToolNames,
    Turn,
    compaction_turns,
    forced_replies,
    make_workspace,
    probe_tools,
)
from ccwarm.testing.tmux import TerminalError, Tmux, ensure_tmux, wait_screen

DEFAULT_JSON = REPO / "artifacts" / "e2e_claude_code.json"
STABILITY_ADDON = "addons/stability.py"
BILLING = payload.BILLING_HEADER_NAME
MAX_CONTEXT = 200000  # Claude Code's first prompt alone is ~29k (-p) / ~32k (interactive) tokens here

# --- the chain ----------------------------------------------------------------------------------


@contextlib.contextmanager
def chain(
    root: Path,
    model_dir: Path,
    script: Path,
    *,
    normalize: bool,
    cache_args: tuple[str, ...] = (),
    max_context: int = MAX_CONTEXT,
) -> Iterator[Stack]:
    """Companion server + mitmdump before it, on free loopback ports; both stopped when the block ends."""
    server_log, mitm_log, flows = root / "server.log", root / "mitmdump.log", root / "flows.mitm"
    args = (
        "--model",
        str(model_dir),
        "--cache-dir",
        str(root / "cache"),
        "--max-context",
        str(max_context),
        "--max-output-tokens",
        "1024",
        "--test-forced-replies",
        str(script),
        *cache_args,
    )
    scripts = ["addons/normalize.py"]
    stability = (REPO / STABILITY_ADDON).exists()
    if stability:
        scripts.append(STABILITY_ADDON)
    options = [f"save_stream_file={flows}", f"normalize={'true' if normalize else 'false'}"]
    if stability:
        options.append("stability_wait_ms=500")  # flags on the flow before -w saves it
    with proxy_chain(args, server_log=server_log, addons=scripts, proxy_options=options, proxy_log=mitm_log) as chain:
        stack = Stack(chain.proxy_port, chain.server.url, server_log, mitm_log, flows, normalize, stability)
        try:
            yield stack
        finally:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                stack.figures = request_figures(chain.server.url)


# --- one run: session A (4 turns) + session B ----------------------------------------------------


def run_sessions(
    cli: Path,
    model_dir: Path,
    root: Path,
    tools: ToolNames,
    *,
    normalize: bool,
    turns: tuple[Turn, ...] = SESSION_A + SESSION_B,
    cache_args: tuple[str, ...] = (),
    max_context: int = MAX_CONTEXT,
) -> dict[str, Any]:
    """Start the chain, drive the turns, stop the chain, analyse what went through."""
    root.mkdir(parents=True, exist_ok=True)
    home, work = make_workspace(root)
    script = root / "forced_replies.json"
    script.write_text(json.dumps(forced_replies(work, tools), indent=1))
    runs: list[CliRun] = []
    t0 = time.monotonic()
    failure = None
    with chain(root, model_dir, script, normalize=normalize, cache_args=cache_args, max_context=max_context) as stack:
        env = cli_env(home, stack.proxy_port)
        for turn in tqdm(turns, desc=f"claude -p, normalize {'on' if normalize else 'off'}", unit="turn", leave=False):
            try:
                run = run_claude(cli, env, work, turn.prompt, cont=turn.cont, label=turn.label)
            except E2EError as e:
                failure = str(e)
                break
            runs.append(run)
            if run.returncode != 0 or turn.expect not in run.stdout:
                failure = (
                    f"{turn.label}: claude rc={run.returncode}, expected {turn.expect!r} on stdout\n"
                    f"stdout: {run.stdout[-1500:]}\nstderr: {run.stderr[-1500:]}"
                )
                break
    wall = time.monotonic() - t0
    records, rejected = analyse(stack, model_dir)
    return {
        "normalize": normalize,
        "stability_addon": stack.stability,
        "turns": [
            {
                "label": r.label,
                "argv": r.argv,
                "rc": r.returncode,
                "seconds": r.seconds,
                "stdout": r.stdout.strip()[-500:],
                "stderr": r.stderr.strip()[-500:],
            }
            for r in runs
        ],
        "requests": [asdict(r) for r in records],
        "totals": totals(records),
        "server_rejections": rejected,
        "failure": failure,
        "wall_s": round(wall, 2),
        "root": str(root),
        "logs": {"server": str(stack.server_log), "mitmdump": str(stack.mitm_log), "flows": str(stack.flows)},
    }


def tiny_model(root: Path) -> Path:
    from cache_backend.testing.tiny_model import make_tiny_model

    return Path(make_tiny_model(root / "tiny-model", seed=0))


def resolve_model(model: str | None, root: Path) -> Path:
    if not model:
        return tiny_model(root)
    if Path(model).is_dir():
        return Path(model).resolve()
    from mlx_lm.utils import hf_repo_to_path

    return Path(hf_repo_to_path(model))


# Session C's sizes in tokens: the compaction request (history + ~1.6k tokens of summary
# instructions) and the turn resent after it must fit; the turn before compacting must not.
COMPACT_FIRST, COMPACT_SECOND, COMPACT_ROOM = 1500, 2500, 3500


def run_compaction(
    cli: Path, model_dir: Path, root: Path, tools: ToolNames, first_request: dict[str, Any]
) -> dict[str, Any]:
    """Session C against a server whose context limit the second turn exceeds: the server answers
    `prompt is too long: N tokens > M maximum`, the CLI compacts and resends the turn."""
    renderer = PromptRenderer(model_dir)
    base = len(renderer.render(json.loads(payload.strip_volatile(json.dumps(first_request).encode()).body)).tokens)
    turns = compaction_turns(renderer.renderer.encode, COMPACT_FIRST, COMPACT_SECOND)
    run = run_sessions(cli, model_dir, root, tools, normalize=True, turns=turns, max_context=base + COMPACT_ROOM)
    run["max_context"] = base + COMPACT_ROOM
    return run


def run_comparison(
    cli: Path,
    model_dir: Path,
    root: Path,
    *,
    modes: tuple[bool, ...] = (True, False),
    probed: tuple[ToolNames, dict[str, Any]] | None = None,
    max_context: int = MAX_CONTEXT,
    compaction: bool = True,
) -> dict[str, Any]:
    """Probe the tool list once (unless given), then the same sessions with normalize on and off,
    then session C (the CLI compacting on a prompt over the server's limit)."""
    tools, probe = probed or probe_tools(cli, root / "probe")
    result: dict[str, Any] = {
        "cli_version": cli_version(cli),
        "cli_model": CLI_MODEL,
        "model": str(model_dir),
        "probe": {k: v for k, v in probe.items() if k != "first_request"},
        "runs": {},
    }
    for normalize in modes:
        name = "normalize_on" if normalize else "normalize_off"
        result["runs"][name] = run_sessions(
            cli, model_dir, root / name, tools, normalize=normalize, max_context=max_context
        )
    if compaction:
        result["runs"]["compaction"] = run_compaction(
            cli, model_dir, root / "compaction", tools, probe["first_request"]
        )
    on, off = result["runs"].get("normalize_on"), result["runs"].get("normalize_off")
    if on and off:
        result["comparison"] = {
            "prefilled_on": on["totals"]["prefilled"],
            "prefilled_off": off["totals"]["prefilled"],
            "ideal_on": on["totals"].get("ideal_prefilled"),
            "ideal_off": off["totals"].get("ideal_prefilled"),
            "ttft_on_s": on["totals"]["ttft_s"],
            "ttft_off_s": off["totals"]["ttft_s"],
        }
    return result


# --- interactive mode under tmux -----------------------------------------------------------------


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


# --- output --------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table(run: dict[str, Any]) -> str:
    head = [
        "#",
        "sess",
        "kind",
        "prompt",
        "restored",
        "prefilled",
        "ideal",
        "sys+tools",
        "ttft s",
        "billing fwd",
        "reply",
        "stability",
    ]
    rows = []
    for r in run["requests"]:
        reply = (r["reply"] or "").replace("\n", " ")
        if r["tool_calls"]:
            reply = "tool_use " + ",".join(r["tool_calls"])
        verdict = r["verdict"]
        if r.get("cross_session"):
            verdict += f" (new session: see #{r['n']} below)"
        rows.append(
            [
                r["n"],
                r["session"],
                r["kind"],
                r["prompt"],
                r["restored"],
                r["prefilled"],
                r["ideal_prefilled"],
                r["system_tools"],
                r["ttft_s"],
                "yes" if r["billing_forwarded"] else "no",
                reply[:28],
                verdict[:90],
            ]
        )
    t = run["totals"]
    rows.append(
        [
            "",
            "",
            "total",
            t["prompt"],
            t["restored"],
            t["prefilled"],
            t.get("ideal_prefilled"),
            "",
            t["ttft_s"],
            "",
            "",
            "",
        ]
    )
    cells = [[_fmt(c) for c in row] for row in [head, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    left = (1, 2, 9, 10, 11)
    lines = [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"#{r['n']} {r['cross_session']}" for r in run["requests"] if r.get("cross_session")]
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    out = []
    for name, run in result.get("runs", {}).items():
        out.append(
            f"\n== {name} (stability addon: {'yes' if run['stability_addon'] else 'no'}; wall {run['wall_s']}s) =="
        )
        out.append(table(run))
        if run["server_rejections"]:
            out.append(
                "server rejected: "
                + "; ".join(f"{r['status']} {r['path']}: {r['message']}" for r in run["server_rejections"])
            )
        if run["failure"]:
            out.append("FAILED: " + run["failure"])
    if "comparison" in result:
        c = result["comparison"]
        out.append(
            f"\nprefilled tokens: normalize on {c['prefilled_on']} (ideal {c['ideal_on']}), "
            f"normalize off {c['prefilled_off']} (ideal {c['ideal_off']}); "
            f"summed TTFT {c['ttft_on_s']}s on vs {c['ttft_off_s']}s off"
        )
    if "interactive" in result:
        ui = result["interactive"]
        out.append(f"\n== interactive (tmux; wall {ui['wall_s']}s) ==")
        out.append(table(ui | {"stability_addon": True}))
        out.append("steps: " + "; ".join(f"{s['prompt']!r} -> {s['expect']} in {s['seconds']}s" for s in ui["steps"]))
        out.append("dialogs answered: " + ", ".join(ui["dialogs_answered"]))
        if ui["failure"]:
            out.append("FAILED: " + ui["failure"])
        elif ui["screens"]:
            out.append("last screen:\n" + "\n".join(line for line in ui["screens"][-2].splitlines() if line.strip()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model for the companion server (default: the tiny random-weight test model)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    ap.add_argument(
        "--interactive", action="store_true", help="drive the interactive UI under tmux instead of `claude -p`"
    )
    ap.add_argument(
        "--max-context",
        type=int,
        default=MAX_CONTEXT,
        help="the server's context limit in tokens (default: %(default)s)",
    )
    ap.add_argument("--only", choices=("on", "off"), help="run only normalize on or off")
    ap.add_argument(
        "--keep",
        type=Path,
        help="keep logs, flow files and workspaces under this folder (default: a temp folder, removed unless the run "
        "fails)",
    )
    args = ap.parse_args(argv)

    cli = ensure_cli()
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="ccwarm-e2e-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = resolve_model(args.model, root)
        if args.interactive:
            ensure_tmux()
            result: dict[str, Any] = {
                "cli_version": cli_version(cli),
                "model": str(model_dir),
                "interactive": run_interactive(cli, model_dir, root / "interactive", max_context=args.max_context),
            }
            failed = bool(result["interactive"]["failure"])
        else:
            modes = {"on": (True,), "off": (False,)}.get(args.only or "", (True, False))
            result = run_comparison(cli, model_dir, root, modes=modes, max_context=args.max_context)
            failed = any(r["failure"] for r in result["runs"].values())
        print(report(result))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {args.json}")
        if failed:
            print(f"logs, flow files and workspaces kept in {root}")
            return 1
    except BaseException:
        print(f"e2e: failed; logs, flow files and workspaces kept in {root}", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
