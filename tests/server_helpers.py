"""Helpers for the cache_backend server tests: the tiny model, a real server subprocess, SSE parsing,
request bodies, and the scripted server that the test_server_api_*.py files share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from ccwarm import server_proc


def build_tiny_model(base: Path, max_position_embeddings: int = 4096) -> Path:
    from cache_backend.testing.tiny_model import make_tiny_model

    return make_tiny_model(base / "tiny-model", seed=0, max_position_embeddings=max_position_embeddings)


def ServerProcess(model_dir: Path, log_path: Path, *extra: str) -> server_proc.ServerProcess:  # noqa: N802
    """The companion server on `model_dir` (see ccwarm.server_proc), stopped by the caller.

    Snapshots go to a folder beside the log, never to the user's ~/.cache.
    """
    if "--cache-dir" not in extra:
        extra = (*extra, "--cache-dir", str(Path(log_path).parent / "cache"))
    return server_proc.ServerProcess("--model", str(model_dir), *extra, log_path=log_path, timeout=120.0)


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
    with httpx.stream(
        "POST", url + "/v1/messages?beta=true", json={**body, "stream": True}, headers=headers, timeout=timeout
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read().decode()


def base(**kw: Any) -> dict[str, Any]:
    """A minimal valid Messages request body, with `kw` added or replaced."""
    return {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **kw}


# --- the Messages API tests' server (test_server_api_*.py import these fixtures) ---------------

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
TOOL_REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SCRIPT = [
    {"when": "weather in Paris", "reply": TOOL_REPLY},
    {"when": "sunny-42", "reply": "It is sunny in Paris."},
    {"when": "say-stop-please", "reply": "alpha beta STOP gamma"},
    {"when": "title-please", "reply": '```json\n{"title": "Paris weather"}\n```'},
    {"when": "fail-midway", "reply": "one two three four five six", "fail_after_tokens": 2},
    {"when": "bad-markup", "reply": "<tool_call>\n{not json}\n</tool_call>"},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("server")
    script = d / "script.json"
    script.write_text(json.dumps(SCRIPT))
    srv = ServerProcess(
        tiny_model, d / "server.log", "--test-forced-replies", str(script), "--ping-interval", "2", "--max-body", "2MB"
    )
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="anything", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
