"""Running the real Claude Code CLI headless for the end-to-end script: the pinned install, an
environment that points it at a local endpoint with a throwaway HOME, and `claude -p` turns in
their own process group (killed with every child on a timeout). Used by scripts/e2e_claude_code.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ccwarm.claude_cli import CliInstallError
from ccwarm.claude_cli import ensure_cli as _ensure_cli

CLI_MODEL = "claude-opus-5-5"  # the current CLI's default; auto mode refuses retired models
TURN_TIMEOUT = 180.0


class E2EError(RuntimeError):
    """A step of the end-to-end run failed; the message says which and shows the evidence."""


def ensure_cli() -> Path:
    """The pinned CLI (ccwarm.claude_cli), installed with npm when missing or another version."""
    try:
        return _ensure_cli()
    except CliInstallError as e:
        raise E2EError(str(e)) from None


def cli_env(home: Path, proxy_port: int) -> dict[str, str]:
    """The environment Claude Code runs with: our endpoint, a throwaway HOME, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "CLAUDECODE"))}
    env.update(
        {
            "HOME": str(home),
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{proxy_port}",
            "ANTHROPIC_API_KEY": "local-e2e-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "IS_SANDBOX": "1",  # root may use --dangerously-skip-permissions
            # Auto mode checks each action on Anthropic's side by default; this brings back the CLI's
            # own classifier requests (to the local server), which the e2e wants to see served.
            "CLAUDE_CODE_AUTO_MODE_SERVER": "0",
            "NO_COLOR": "1",
        }
    )
    env.pop("XDG_CONFIG_HOME", None)
    return env


@dataclass
class CliRun:
    label: str
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_claude(
    cli: Path,
    env: dict[str, str],
    cwd: Path,
    prompt: str,
    *,
    cont: bool,
    label: str,
    model: str = CLI_MODEL,
    timeout: float = TURN_TIMEOUT,
) -> CliRun:
    """One `claude -p` turn in its own process group (killed with all its children on timeout)."""
    argv = [str(cli), "-p", prompt, "--model", model, "--dangerously-skip-permissions"]
    if cont:
        argv.insert(1, "--continue")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise E2EError(
            f"{label}: claude did not finish within {timeout:.0f}s\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}"
        ) from None
    finally:
        _kill_group(proc)  # on any exit: claude if still running, and tool subprocesses left behind
    return CliRun(label, argv[1:], proc.returncode, out, err, round(time.monotonic() - t0, 2))


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
