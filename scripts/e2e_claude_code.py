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

This file parses the arguments and puts the pieces together; they live in ccwarm/testing/:
e2e_chain (the chain and the model), e2e_sessions (the `claude -p` runs), e2e_ui (the tmux run),
e2e_report (the text report), on top of claude_runs, e2e_script and e2e_records.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ccwarm.claude_cli import cli_version
from ccwarm.harness import REPO
from ccwarm.testing.claude_runs import ensure_cli
from ccwarm.testing.e2e_chain import MAX_CONTEXT, resolve_model
from ccwarm.testing.e2e_report import report
from ccwarm.testing.e2e_sessions import run_comparison
from ccwarm.testing.e2e_ui import run_interactive
from ccwarm.testing.tmux import ensure_tmux

DEFAULT_JSON = REPO / "artifacts" / "e2e_claude_code.json"


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
