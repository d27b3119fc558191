#!/usr/bin/env python3
"""First contact, as a new user has it: `make run` with the bundled model, then the real Claude Code.

On a fresh cache folder it starts `scripts/run_stack.py` (what `make run` runs), copies the
environment line its banner prints, and drives the real CLI (ccwarm/claude_cli.py's version):

  1. `claude -p "say hi"`            time to the first answer, from a cold cache
  2. `claude -p --continue "..."`    time to the second answer
  3. `claude` under tmux, one prompt  (interactive UI; skipped without tmux)

It reports the time to each answer, the requests the server saw (the CLI's retries included:
more than one request for one turn), how many of them resumed a partial prefill, and the tokens
prefilled against the ideal (each prompt token computed once). Figures come from the server's
`/v1/cache/requests`. Long on a CPU (minutes): not part of `make test`.

`make run` starts Claude Code in its bare mode for the bundled model (CLAUDE_CODE_SIMPLE=1 in its
line: a ~1.2k-token prompt); --full-prompt drops that to measure Claude Code's full prompt.

    .venv/bin/python scripts/first_contact.py [--json artifacts/first_contact.json] [--no-ui] [--full-prompt]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from run_stack import BARE_MODE
from tqdm import tqdm

from ccwarm.claude_cli import cli_version, ensure_cli
from ccwarm.harness import REPO, free_port
from ccwarm.testing.tmux import TerminalError, Tmux, wait_screen

TURN_TIMEOUT = 1800.0
DEFAULT_JSON = REPO / "artifacts" / "first_contact.json"
BARE = f"{BARE_MODE}=1"  # what make run's line carries for the bundled model


class Stack:
    """run_stack.py as a user starts it; its banner's environment line."""

    def __init__(self, cache_dir: Path, log: Path) -> None:
        self.proxy_port, self.server_port = free_port(), free_port()
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "scripts/run_stack.py",
                "--proxy-port",
                str(self.proxy_port),
                "--server-port",
                str(self.server_port),
                "--cache-dir",
                str(cache_dir),
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 1800.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = re.search(r"^\s+(ANTHROPIC_BASE_URL=\S+(?: \S+=\S+)*) claude$", text, re.M)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"make run's stack exited ({self.proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError("make run's stack did not print its banner")

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.server_url}/v1/cache/requests", params={"limit": 512}, timeout=30).json()["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def env_from(line: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "CLAUDECODE"))}
    env.update(dict(part.split("=", 1) for part in shlex.split(line)))
    env.update({"HOME": str(home), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "NO_COLOR": "1"})
    return env


def workspace(root: Path) -> tuple[Path, Path]:
    home, work = root / "home", root / "work"
    home.mkdir(parents=True)
    work.mkdir(parents=True)
    (home / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True}))  # the README's line
    (work / "README.md").write_text("# hello\n")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return home, work


def turn(cli: Path, env: dict[str, str], work: Path, prompt: str, cont: bool) -> dict[str, Any]:
    argv = [str(cli), "-p", prompt] + (["--continue"] if cont else [])
    t0 = time.monotonic()
    proc = subprocess.run(
        argv, cwd=work, env=env, capture_output=True, text=True, timeout=TURN_TIMEOUT, stdin=subprocess.DEVNULL
    )
    return {
        "prompt": prompt,
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "stdout": proc.stdout.strip()[-400:],
        "stderr": proc.stderr.strip()[-400:],
    }


def interactive(cli: Path, env: dict[str, str], work: Path, prompt: str) -> dict[str, Any]:
    """The UI under tmux: answer the first-run dialogs, send one prompt, wait for the answer."""
    tmux = Tmux("ccwarm-first-contact")
    screens: list[str] = []
    answered: list[str] = []
    keep = ("HOME", "PATH", "LANG", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC")
    env_args = " ".join(
        shlex.quote(f"{k}={v}") for k, v in env.items() if k in keep or k.startswith(("ANTHROPIC_", "CLAUDE_", "API_"))
    )
    t0 = time.monotonic()
    try:
        tmux.start(f"env -i {env_args} TERM=xterm-256color {shlex.quote(str(cli))}", work)
        wait_screen(tmux, r"\? for shortcuts|auto mode on", 300, screens, answered)
        tmux.keys(prompt, literal=True)
        time.sleep(0.3)
        tmux.keys("Enter")
        started = time.monotonic()
        # Answered when the spinner line says how long it took ("✻ Cooked for 12s").
        screen = wait_screen(tmux, r"✻ \w+ for \d", TURN_TIMEOUT, screens, answered)
        return {
            "prompt": prompt,
            "seconds": round(time.monotonic() - started, 1),
            "dialogs": answered,
            "screen": "\n".join(line for line in screen.splitlines() if line.strip())[-1500:],
            "wall_s": round(time.monotonic() - t0, 1),
        }
    except TerminalError as e:
        return {"prompt": prompt, "failure": str(e)[-1500:], "dialogs": answered}
    finally:
        tmux.close()


def summary(reqs: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests of one step: answered, cancelled (the CLI gave up and retried), resumed, and the
    tokens prefilled against the ideal. Attempts at one prompt are the requests with its length;
    the ideal for them is the prompt less what the first attempt restored (each token once)."""
    attempts: dict[int, list[dict[str, Any]]] = {}
    for r in reqs:
        attempts.setdefault(r["prompt"], []).append(r)
    ideal = sum(group[0]["prompt"] - group[0]["restored"] for group in attempts.values())
    prefilled = sum(r["prefilled"] for r in reqs)
    return {
        "requests": len(reqs),
        "answered": sum(r["outcome"] not in ("cancelled", "shutdown", "failed") for r in reqs),
        "cancelled": sum(r["outcome"] == "cancelled" for r in reqs),
        "resumed": sum(r["resumed"] for r in reqs),
        "prefilled": prefilled,
        "ideal_prefilled": ideal,
        "prefilled_over_ideal": round(prefilled / ideal, 3) if ideal else None,
        "ttft_s": [r["ttft_s"] for r in reqs],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--no-ui", action="store_true", help="skip the interactive UI step")
    ap.add_argument("--full-prompt", action="store_true", help=f"drop {BARE} from make run's line")
    args = ap.parse_args(argv)
    # A SIGTERM (e.g. from `timeout`) takes the normal exit path, so the stack below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cli = ensure_cli()
    root = Path(tempfile.mkdtemp(prefix="ccwarm-first-contact-"))
    home, work = workspace(root)
    stack = Stack(root / "cache", root / "make-run.log")
    result: dict[str, Any] = {"cli_version": cli_version(cli), "root": str(root), "turns": []}
    try:
        t0 = time.monotonic()
        line = stack.wait_ready()
        result["stack_up_s"] = round(time.monotonic() - t0, 1)
        if args.full_prompt:
            line = " ".join(part for part in shlex.split(line) if part != BARE)
        result["env_line"] = line
        result["bare"] = BARE in shlex.split(line)
        env = env_from(line, home)
        steps = [("say hi", False), ("Now say it in French.", True)]
        for prompt, cont in tqdm(steps, desc="claude -p", unit="turn"):
            before = len(stack.requests())
            t = turn(cli, env, work, prompt, cont)
            t["server"] = summary(stack.requests()[before:])
            result["turns"].append(t)
            print(
                f"\n{prompt!r}: rc={t['rc']} in {t['seconds']}s, server {t['server']}: {t['stdout'][:200]!r}",
                flush=True,
            )
        if not args.no_ui:
            before = len(stack.requests())
            ui = interactive(cli, env, work, "What does this folder hold?")
            ui["server"] = summary(stack.requests()[before:])
            result["interactive"] = ui
            print(f"\ninteractive: {ui.get('seconds', ui.get('failure'))} {ui['server']}", flush=True)
        reqs = stack.requests()
        result["requests"] = reqs
        result["totals"] = summary(reqs)
    finally:
        stack.stop()
        shutil.rmtree(root / "cache", ignore_errors=True)  # the model and KV blocks, 1-2 GB; logs stay
    print(json.dumps(result["totals"], indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}; logs in {root}")
    return 0 if all(t["rc"] == 0 for t in result["turns"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
