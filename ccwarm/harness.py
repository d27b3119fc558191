"""Loopback processes for make run, tests, benchmarks and end-to-end scripts.

Starts real processes (mitmdump, mitmweb) on 127.0.0.1 free ports and always stops them (the recording
upstream for tests is ccwarm/testing/upstream.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # addons/ are loaded by path from the checkout
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mitmproxy_process(
    upstream_port: int,
    *scripts: str,
    options: tuple[str, ...] = (),
    log: Path | None = None,
    tool: str = "mitmdump",
    extra_args: tuple[str, ...] = (),
    also_wait_for: tuple[int, ...] = (),
) -> Iterator[tuple[int, Path]]:
    """A real mitmdump/mitmweb in reverse mode before `upstream_port`; yields (listen port, log)."""
    port = free_port()
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"{tool}-{port}.log"
    cmd = [
        str(BIN / tool),
        "--mode",
        f"reverse:http://127.0.0.1:{upstream_port}@{port}",
        "--listen-host",
        "127.0.0.1",
        "--set",
        "confdir=" + str(log.parent / f"mitm-conf-{port}"),
        *extra_args,
    ]
    for s in scripts:
        cmd += ["-s", str(REPO / s)]
    for o in options:
        cmd += ["--set", o]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            for p in (port, *also_wait_for):
                wait_for_port(p, proc)
            yield port, log
        finally:
            stop_process(proc)


def mitmdump(
    upstream_port: int, *scripts: str, options: tuple[str, ...] = (), log: Path | None = None
) -> contextlib.AbstractContextManager[tuple[int, Path]]:
    """A real `mitmdump -s ... --mode reverse:` process; yields (listen port, log file)."""
    return mitmproxy_process(upstream_port, *scripts, options=options, log=log)
