"""Helpers for the cache_backend server tests: the tiny model, a real server subprocess, SSE parsing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(base: Path, max_position_embeddings: int = 4096) -> Path:
    from cache_backend.tiny_model import make_tiny_model

    return make_tiny_model(base / "tiny-model", seed=0, max_position_embeddings=max_position_embeddings)


class ServerProcess:
    """`python -m cache_backend --model DIR --port P ...` as a subprocess; stderr goes to a log file."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "cache_backend", "--model", str(model_dir), "--port", str(self.port), *extra]
        self._log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs; comment lines are skipped."""
    events = []
    for chunk in raw.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in chunk.split("\n"):
            if line.startswith(":") or not line:
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if name is not None or data:
            events.append((name or "message", json.loads("\n".join(data)) if data else {}))
    return events


def check_event_order(events: list[tuple[str, dict[str, Any]]]) -> None:
    """Anthropic's grammar: message_start, blocks (start, delta*, stop), message_delta, message_stop; pings anywhere."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start", names
    assert names[-2:] == ["message_delta", "message_stop"], names
    open_index = None
    next_index = 0
    for name, data in events[1:]:
        if name == "ping":
            continue
        if name == "content_block_start":
            assert open_index is None, "block started while another is open"
            assert data["index"] == next_index
            open_index = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index, next_index = None, next_index + 1
        elif name in ("message_delta", "message_stop"):
            assert open_index is None, "message ended with a block open"
        else:
            raise AssertionError(f"unexpected event {name}")
    for n, d in events:
        assert d.get("type") == n, (n, d)


def stream_raw(url: str, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 60.0) -> str:
    with httpx.stream("POST", url + "/v1/messages?beta=true", json={**body, "stream": True}, headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read().decode()
