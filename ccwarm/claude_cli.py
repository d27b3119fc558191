"""The Claude Code CLI version ccwarm is checked against, in one place, and its local install.

The e2e script, its test, the synthetic sessions and `make run`'s advice all read the version
from here. The CLI is installed from npm into the git-ignored `.claude-cli/`; a different
version (or `@latest`) is one environment variable away:
`CCWARM_CLAUDE_CODE_PACKAGE=@anthropic-ai/claude-code@latest`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

CLAUDE_CODE_VERSION = "2.1.332"
PACKAGE_ENV = "CCWARM_CLAUDE_CODE_PACKAGE"
NODE_MAJOR_REQUIRED = 22  # the CLI's package.json `engines`; on node 20 it warns and runs

REPO = Path(__file__).resolve().parent.parent
CLI_DIR = REPO / ".claude-cli"
CLI = CLI_DIR / "node_modules" / ".bin" / "claude"
_MARKER = CLI_DIR / ".ccwarm-package"  # the package spec the folder was installed from


class CliInstallError(RuntimeError):
    """npm is missing or the install failed; the message says which and shows npm's output."""


def package_spec() -> str:
    return os.environ.get(PACKAGE_ENV) or f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"


def installed_version(cli_dir: Path = CLI_DIR) -> str | None:
    pkg = cli_dir / "node_modules" / "@anthropic-ai" / "claude-code" / "package.json"
    try:
        return json.loads(pkg.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_cli(spec: str | None = None) -> Path:
    """The claude binary under .claude-cli/, (re)installed when it is missing or another spec's."""
    spec = spec or package_spec()
    if CLI.exists() and _MARKER.exists() and _MARKER.read_text().strip() == spec:
        return CLI
    npm = shutil.which("npm")
    if npm is None:
        raise CliInstallError(
            "npm is not installed: cannot install the Claude Code CLI (node >= 22 and npm are needed)"
        )
    CLI_DIR.mkdir(exist_ok=True)
    print(f"claude_cli: installing {spec} into {CLI_DIR} ...", flush=True)
    proc = subprocess.run(
        [npm, "install", "--prefix", str(CLI_DIR), "--no-audit", "--no-fund", spec],
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0 or not CLI.exists():
        raise CliInstallError(
            f"npm install {spec} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    _MARKER.write_text(spec + "\n")
    return CLI


def cli_version(cli: Path = CLI) -> str:
    out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return out.stdout.strip()
