"""Start the companion server (`python -m cache_backend`) as a subprocess on a free loopback port.

Used by tests, benchmarks and the end-to-end scripts so they all start it the same way and always
stop it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ccwarm.harness import REPO, free_port


@dataclass
class ServerProcess:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy:\n{tail}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} was not healthy within {timeout}s")


@contextlib.contextmanager
def companion_server(*args: str, log: Path, port: int | None = None, timeout: float = 300.0,
                     env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`python -m cache_backend --port P ARGS...`, stopped (SIGTERM, then SIGKILL) on exit."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "cache_backend", "--host", "127.0.0.1", "--port", str(port), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            server = ServerProcess(port, proc, log)
            wait_healthy(server.url, proc, timeout, log)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
