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
from pathlib import Path

from ccwarm.harness import REPO, free_port, stop_process


class ServerProcess:
    """`python -m cache_backend --host 127.0.0.1 --port P ARGS...`; output goes to `log_path`
    (or, with None, to this process's own terminal, as `make run` wants)."""

    def __init__(
        self,
        *args: str,
        log_path: Path | None,
        port: int | None = None,
        timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path is not None else None
        cmd = [sys.executable, "-m", "cache_backend", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._out,
            stderr=subprocess.STDOUT if self._out else None,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before it was healthy:\n{self.log()[-3000:]}"
                )
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.1)
        raise TimeoutError(f"server at {self.url} was not healthy within {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        if self._out is None or self.log_path is None:
            return ""
        if not self._out.closed:
            self._out.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc, grace=20.0)  # a clean stop lets queued snapshot writes finish
        if self._out is not None:
            self._out.close()


@contextlib.contextmanager
def companion_server(
    *args: str, log: Path, port: int | None = None, timeout: float = 300.0, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A ServerProcess that is stopped (SIGTERM, then SIGKILL) when the block ends."""
    server = ServerProcess(*args, log_path=log, port=port, timeout=timeout, env=env)
    try:
        yield server
    finally:
        server.stop()
