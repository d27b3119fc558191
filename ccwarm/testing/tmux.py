"""Claude Code's interactive UI driven in a real terminal: tmux on a private socket, a screen
reader that answers the CLI's first-run dialogs (trust this folder, use this API key, tool
permission) on the way to what it waits for. Used by the e2e script and first_contact.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class TerminalError(RuntimeError):
    """tmux is missing, a tmux command failed, or the screen never showed what was awaited."""


def ensure_tmux() -> str:
    """tmux, installed with apt-get when missing and we are root; TerminalError otherwise."""
    found = shutil.which("tmux")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("e2e: installing tmux (apt-get install -y tmux) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "tmux"], env=env, capture_output=True, timeout=600)
    found = shutil.which("tmux")
    if not found:
        raise TerminalError("tmux is not installed and could not be installed (apt-get install -y tmux)")
    return found


class Tmux:
    """A tmux server on a private socket (so nothing else's sessions are touched); killed on close."""

    def __init__(self, name: str) -> None:
        self.tmux = shutil.which("tmux")
        if self.tmux is None:
            raise TerminalError("tmux is not installed (apt-get install -y tmux)")
        self.dir = Path(tempfile.mkdtemp(prefix="ccwarm-tmux-"))  # short: socket paths are limited to ~100 bytes
        self.socket = str(self.dir / "sock")
        self.session = name
        self.pane_pid: int | None = None

    def _run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run([self.tmux, "-S", self.socket, *args], capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise TerminalError(f"tmux {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, command: str, cwd: Path, width: int = 200, height: int = 50) -> None:
        self._run(
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            self.session,
            "-x",
            str(width),
            "-y",
            str(height),
            "-c",
            str(cwd),
            command,
        )
        self._run("set-option", "-t", self.session, "remain-on-exit", "on", check=False)
        self.pane_pid = int(self._run("display-message", "-p", "-t", self.session, "#{pane_pid}").strip())

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._run("send-keys", "-t", self.session, *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-J", "-t", self.session, check=False)

    def close(self) -> None:
        self._run("kill-server", check=False)
        if self.pane_pid:  # the pane's process group (claude under its shell), if it survived SIGHUP
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pane_pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_screen(tmux: Tmux, pattern: str, timeout: float, screens: list[str], answered: list[str]) -> str:
    """Wait until `pattern` (regex) is on screen, answering the dialogs that come on the way."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux.screen()
        if re.search(pattern, screen):
            return screen
        if "Pane is dead" in screen:
            raise TerminalError(f"interactive: claude exited while waiting for {pattern!r}; screen:\n{screen}")
        if "Yes, I trust this folder" in screen:
            screens.append(screen)
            if not re.search(r"❯\s*(?:\d\.\s*)?Yes, I trust", screen):
                tmux.keys("Down")  # the current CLI preselects "No, exit"; look again before Enter
                time.sleep(0.5)
                continue
            tmux.keys("Enter")
            answered.append("trust this folder: yes")
            time.sleep(1.0)
        elif "Do you want to use this API key?" in screen:
            screens.append(screen)
            if not re.search(r"❯\s*(?:1\.\s*)?Yes", screen):
                tmux.keys("Up")  # "2. No (recommended)" is preselected; look again before Enter
                time.sleep(0.5)
                continue
            tmux.keys("Enter")
            answered.append("use this API key: yes")
            time.sleep(1.0)
        elif "Do you want to proceed?" in screen and re.search(r"❯\s*1\.\s*Yes", screen):
            screens.append(screen)
            tmux.keys("Enter")  # a tool permission prompt: "1. Yes" is preselected
            answered.append("tool permission: yes")
            time.sleep(1.0)
        time.sleep(0.25)
    raise TerminalError(f"interactive: {pattern!r} did not appear within {timeout:.0f}s; screen:\n{screen}")
