"""Messages API end to end: invalid requests (400 naming the field), oversized bodies (413), clients
that leave early, unknown routes and models, the models endpoint, an error event mid-stream."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest
from server_helpers import (  # noqa: F401 - fixtures
    ServerProcess,
    client,
    parse_sse,
    server,
    stream_raw,
    tiny_model,
    user,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"max_tokens": 5, "messages": user("x")}), "model: field required"),
        (json.dumps({"model": "claude-x", "messages": user("x")}), "max_tokens: field required"),
        (
            json.dumps({"model": "claude-x", "max_tokens": "5", "messages": user("x")}),
            "max_tokens: expected an integer, got a string",
        ),
        (json.dumps({"model": "claude-x", "max_tokens": 5, "messages": []}), "messages: at least one message"),
        (
            json.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role: unknown role 'robot'",
        ),
        (
            json.dumps(
                {
                    "model": "claude-x",
                    "max_tokens": 5,
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                        {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "foo"}]},
                    ],
                }
            ),
            "messages[2].content[1].type: unknown block type 'foo'",
        ),
        (
            json.dumps({"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": 7}]}),
            "messages[0].content: expected a string or an array of content blocks, got an integer",
        ),
        (
            json.dumps({"model": "claude-x", "max_tokens": 5, "temperature": 3, "messages": user("x")}),
            "temperature: must be between",
        ),
        (json.dumps({"model": "claude-x", "max_tokens": 5, "system": 5, "messages": user("x")}), "system: expected"),
        (
            json.dumps({"model": "claude-x", "max_tokens": 5, "tools": [{"name": "t"}], "messages": user("x")}),
            "tools[0].input_schema: field required",
        ),
        (json.dumps({"model": "claude-x", "max_tokens": 5, "messages": user("word " * 5000)}), "prompt is too long"),
        # Findings 5, 6 and 8 of the hardening issue: each was a 500 or a 200 before.
        (
            b'{"model": "claude-x", "max_tokens": 5, "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "too deeply to decode",
        ),
        (
            '{"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "metadata": {"a": '
            + "[" * 130
            + "]" * 130
            + "}}",
            "more than 128 levels",
        ),
        (b'{"model": "claude-x", "max_tokens": ' + b"9" * 5000 + b', "messages": []}', "4300 digits"),
        (
            json.dumps({"model": "claude-x", "max_tokens": 5, "messages": user("x" * 400_000)}),
            "characters are at least",
        ),  # refused from its length, before tokenizing
        (
            json.dumps(
                {
                    "model": "claude-x",
                    "max_tokens": 5,
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}],
                        }
                    ],
                }
            ),
            "messages[0].content[0].tool_use_id: no tool_use with id 'toolu_1'",
        ),
        (
            json.dumps(
                {
                    "model": "claude-x",
                    "max_tokens": 5,
                    "messages": [
                        {"role": "user", "content": "weather?"},
                        {
                            "role": "assistant",
                            "content": [{"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}],
                        },
                        {"role": "user", "content": "never mind"},
                    ],
                }
            ),
            "messages[1].content[0].id: tool_use 'toolu_2' has no tool_result",
        ),
        (
            json.dumps(
                {
                    "model": "claude-x",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": [{"type": "image", "source": 5}]}],
                }
            ),
            "messages[0].content[0].source: expected an object",
        ),
        (
            json.dumps({"model": "claude-x", "max_tokens": 5, "stop_sequences": 0, "messages": user("x")}),
            "stop_sequences: expected an array, got an integer",
        ),
        (
            '{"model": "claude-x", "max_tokens": 5, "system": [{"type": "text", "text": "a\\ud800b"}], "messages": '
            '[{"role": "user", "content": "x"}]}',
            "system[0].text: contains a lone UTF-16 surrogate",
        ),
    ],
)
def test_invalid_requests(server: ServerProcess, body: bytes | str, fragment: str) -> None:
    r = httpx.post(server.url + "/v1/messages", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert fragment in err["error"]["message"]


def test_oversized_body_is_a_413_before_it_is_read(server: ServerProcess) -> None:
    big = json.dumps({"model": "claude-x", "max_tokens": 5, "messages": user("x" * (3 * 2**20))})
    r = httpx.post(server.url + "/v1/messages", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == {"type": "request_too_large", "message": r.json()["error"]["message"]}
    assert "larger than the server's limit of 2000000 bytes (--max-body)" in r.json()["error"]["message"]

    def chunks():  # no content-length: the limit is enforced while reading
        for _ in range(40):
            yield b"x" * 100_000

    r = httpx.post(server.url + "/v1/messages/count_tokens", content=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = httpx.post(
        server.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 2, "messages": user("hi")}, timeout=60
    )
    assert r.status_code == 200


def test_client_that_leaves_before_its_body_costs_one_log_line(server: ServerProcess) -> None:
    import socket

    before = server.log_path.read_text(errors="replace")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 5000\r\n\r\n{"model": '
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new = server.log_path.read_text(errors="replace")[len(before) :]
        if "before sending its whole body" in new:
            break
        time.sleep(0.1)
    assert "before sending its whole body" in new
    time.sleep(0.5)
    new = server.log_path.read_text(errors="replace")[len(before) :]
    assert "Traceback" not in new and "500" not in new
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_sdk_sees_bad_request(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model="claude-x", max_tokens=5, messages=[{"role": "user", "content": [{"type": "foo"}]}]
        )
    assert "messages[0].content[0].type" in str(e.value)


def test_routes_404_405_and_unknown_model(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/v1/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = httpx.post(server.url + "/v1/messages", json={"model": "gpt-4", "max_tokens": 5, "messages": user("x")})
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_models_alias(client: anthropic.Anthropic, server: ServerProcess) -> None:
    assert client.models.retrieve("claude-opus-4-8").id == "claude-opus-4-8"
    r = httpx.get(server.url + "/v1/models/claude-haiku-4-5?beta=true")
    assert r.status_code == 200 and r.json()["id"] == "claude-haiku-4-5" and r.json()["type"] == "model"
    listed = httpx.get(server.url + "/v1/models").json()
    assert listed["data"] and listed["has_more"] is False


def test_error_event_mid_stream(server: ServerProcess) -> None:
    raw = stream_raw(server.url, {"model": "claude-x", "max_tokens": 50, "messages": user("fail-midway")})
    events = parse_sse(raw)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "error"
    assert "message_stop" not in names
    assert events[-1][1]["error"]["type"] == "api_error"
    # The server keeps working.
    r = httpx.post(
        server.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 2, "messages": user("ok")}, timeout=60
    )
    assert r.status_code == 200
