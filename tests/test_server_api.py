"""End-to-end tests of the Anthropic Messages server: a real subprocess, the official SDK, raw SSE."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import anthropic
import httpx
import pytest
from server_helpers import ServerProcess, build_tiny_model, check_event_order, parse_sse, stream_raw

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

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


@pytest.fixture(scope="module")
def slow_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Slow prefill (1.5 ms per token, so chunks adapt to ~0.5 s), short ping interval, and an API key."""
    d = tmp_path_factory.mktemp("slow")
    srv = ServerProcess(
        tiny_model,
        d / "server.log",
        "--api-key",
        "sekrit",
        "--ping-interval",
        "0.2",
        "--test-slow-prefill",
        "0.0015",
        "--max-output-tokens",
        "3",
        "--progress-after",
        "0.2",
    )
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="anything", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- answers ---------------------------------------------------------------------------------


def test_text_answer(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="claude-opus-4-8", max_tokens=6, messages=user("Hello there"))
    assert msg.id.startswith("msg_")
    assert msg.model == "claude-opus-4-8"
    assert msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 6
    assert msg.usage.input_tokens > 0
    assert msg.usage.cache_read_input_tokens == 0 and msg.usage.cache_creation_input_tokens == 0


def test_text_answer_streaming(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=6, messages=user("Hello there")) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert final.content[0].text == text and text
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6
    assert final.usage.input_tokens > 0


def test_count_tokens_equals_reported_input(client: anthropic.Anthropic) -> None:
    req = dict(
        model="claude-opus-4-8",
        system=[{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Really terse."}],
        tools=TOOLS,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
            {
                "role": "assistant",
                "content": [{"type": "thinking", "thinking": "hm", "signature": "x"}, {"type": "text", "text": "Yes?"}],
            },
            {"role": "system", "content": "Mid-conversation reminder."},
            {"role": "user", "content": "go on"},
        ],
    )
    counted = client.messages.count_tokens(**req).input_tokens
    msg = client.messages.create(max_tokens=2, **req)
    u = msg.usage
    assert counted == u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    # Same request streamed: the prompt length is the same; now most of it comes from the cache.
    with client.messages.stream(max_tokens=2, **req) as s:
        final = s.get_final_message()
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == counted
    assert final.usage.cache_read_input_tokens > 0


def test_ignored_fields_are_accepted(server: ServerProcess) -> None:
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 2,
        "messages": user("hi"),
        "metadata": {"user_id": json.dumps({"session_id": "abc"})},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": []},
        "output_config": {"effort": "high"},
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "stream": False,
    }
    r = httpx.post(server.url + "/v1/messages?beta=true", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["output_tokens"] == 2


# --- tools -----------------------------------------------------------------------------------


def test_tool_round_trip(client: anthropic.Anthropic, server: ServerProcess) -> None:
    first = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.messages.stream(model="claude-opus-4-8", max_tokens=200, tools=TOOLS, messages=first) as s:
        msg = s.get_final_message()
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].text == "Let me check."
    call = msg.content[1]
    assert call.id.startswith("toolu_") and call.name == "get_weather" and call.input == {"city": "Paris"}
    n_forced = msg.usage.output_tokens

    second = first + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny-42 degrees"}]},
    ]
    answer = client.messages.create(model="claude-opus-4-8", max_tokens=200, tools=TOOLS, messages=second)
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].text == "It is sunny in Paris."
    # The follow-up prompt contains the first prompt plus the model's own turn (and more), and
    # the prefix cache restores exactly that: the first prompt and every output token fed back.
    first_prompt = msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens > first_prompt + n_forced
    assert answer.usage.cache_read_input_tokens == first_prompt + n_forced - 1

    # Error results are accepted too, and the raw stream carries input_json_delta pieces.
    raw = stream_raw(server.url, {"model": "claude-x", "max_tokens": 200, "tools": TOOLS, "messages": first})
    events = parse_sse(raw)
    check_event_order(events)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts[1]["type"] == "tool_use" and starts[1]["input"] == {}
    pieces = [
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]
    assert json.loads("".join(pieces)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    err = second[:-1] + [
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "is_error": True,
                    "content": [{"type": "text", "text": "sunny-42 failed"}],
                }
            ],
        }
    ]
    assert client.messages.create(model="claude-x", max_tokens=50, tools=TOOLS, messages=err).stop_reason == "end_turn"


def test_malformed_tool_markup_is_text(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="claude-x", max_tokens=50, tools=TOOLS, messages=user("bad-markup"))
    assert msg.stop_reason == "end_turn"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "<tool_call>\n{not json}\n</tool_call>"


def test_tool_choice_forces_a_call_prefix(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model="claude-x",
        max_tokens=30,
        tools=TOOLS,
        messages=user("anything"),
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    # The random model never closes the call: the unfinished markup comes back as text.
    assert msg.stop_reason == "max_tokens"
    assert msg.content[0].text.startswith('<tool_call>\n{"name": "get_weather", "arguments": ')


def test_stop_sequence(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model="claude-x", max_tokens=50, stop_sequences=["STOP"], messages=user("say-stop-please")
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "STOP"
    assert msg.content[0].text == "alpha beta "


def test_structured_output(client: anthropic.Anthropic, server: ServerProcess) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    body = {
        "model": "claude-x",
        "max_tokens": 50,
        "messages": user("title-please"),
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stop_reason"] == "end_turn"
    assert json.loads(out["content"][0]["text"]) == {"title": "Paris weather"}
    # Unscripted (random model): bounded by the token cap, starts as JSON.
    body["messages"] = user("another title")
    body["max_tokens"] = 5
    out = httpx.post(server.url + "/v1/messages", json=body, timeout=60).json()
    assert out["stop_reason"] == "max_tokens" and out["content"][0]["text"].startswith("{")
    assert "structured output valid" in server.log()


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


# --- SSE protocol, concurrency, cancellation -------------------------------------------------


def test_sse_event_order_raw(server: ServerProcess) -> None:
    raw = stream_raw(server.url, {"model": "claude-x", "max_tokens": 5, "messages": user("Order please")})
    events = parse_sse(raw)
    check_event_order(events)
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] > 0 and start["content"] == [] and start["stop_reason"] is None
    delta = [d for n, d in events if n == "message_delta"][0]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 5


def test_concurrent_streams(server: ServerProcess) -> None:
    results: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            raw = stream_raw(
                server.url, {"model": "claude-x", "max_tokens": 8, "messages": user(f"Request {i}")}, timeout=90
            )
            events = parse_sse(raw)
            check_event_order(events)
            results[i] = [n for n, _ in events]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors
    assert all(r and r[-1] == "message_stop" for r in results)


def test_disconnect_mid_stream_then_normal_request(server: ServerProcess) -> None:
    body = {"model": "claude-x", "max_tokens": 3000, "stream": True, "messages": user("disconnect-me please")}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("event: content_block_delta"):
                seen += 1
                if seen >= 3:
                    break
    # If the abandoned generation kept running, this would wait behind ~3000 tokens.
    t0 = time.monotonic()
    r = httpx.post(
        server.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 3, "messages": user("next")}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 3
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while "cancelled by the client" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "cancelled by the client" in server.log()


LONG_TEXT = " ".join(f"item{i}" for i in range(300))  # ~600+ tokens: ~20 chunks of 32


def test_pings_during_long_prefill(slow_server: ServerProcess) -> None:
    raw = stream_raw(
        slow_server.url,
        {"model": "claude-x", "max_tokens": 2, "messages": user(LONG_TEXT)},
        headers={"x-api-key": "sekrit"},
    )
    events = parse_sse(raw)
    check_event_order(events)
    names = [n for n, _ in events]
    first_block = names.index("content_block_start")
    assert names.index("message_start") == 0
    assert names[:first_block].count("ping") >= 2, names[:first_block]


def test_cancel_during_prefill(slow_server: ServerProcess) -> None:
    long_text = " ".join(f"entry{i}" for i in range(700))  # ~3000 tokens: ~90 chunks, 4.5 s of delays
    body = {"model": "claude-x", "max_tokens": 2, "stream": True, "messages": user(long_text)}
    with httpx.stream(
        "POST", slow_server.url + "/v1/messages", json=body, headers={"x-api-key": "sekrit"}, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: message_start"):
                break
    t0 = time.monotonic()
    r = httpx.post(
        slow_server.url + "/v1/messages",
        json={"model": "claude-x", "max_tokens": 2, "messages": user("quick")},
        headers={"x-api-key": "sekrit"},
        timeout=60,
    )
    assert r.status_code == 200
    assert time.monotonic() - t0 < 3.5
    line = [ln for ln in slow_server.log().splitlines() if "cancelled by the client" in ln][-1]
    fields = dict(f.split("=") for f in line.split(": ", 2)[-1].split() if "=" in f)
    assert int(fields["prefilled"]) < int(fields["prompt"]) and fields["output"] == "0", line


def test_api_key(slow_server: ServerProcess) -> None:
    body = {"model": "claude-x", "max_tokens": 1, "messages": user("hi")}
    url = slow_server.url + "/v1/messages"
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url, json=body, headers={"x-api-key": "wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=body, headers={"x-api-key": "sekrit"}, timeout=30).status_code == 200
    assert httpx.post(url, json=body, headers={"authorization": "Bearer sekrit"}, timeout=30).status_code == 200
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=slow_server.url, api_key="nope", max_retries=0).messages.create(**body)
    ok = anthropic.Anthropic(base_url=slow_server.url, api_key="sekrit", max_retries=0).messages.create(**body)
    assert ok.usage.output_tokens == 1


def test_server_output_cap(slow_server: ServerProcess) -> None:
    c = anthropic.Anthropic(base_url=slow_server.url, api_key="sekrit", max_retries=0)
    msg = c.messages.create(model="claude-x", max_tokens=50, messages=user("cap me"))
    assert msg.usage.output_tokens == 3 and msg.stop_reason == "max_tokens"


def test_queued_request_streams_fine_with_sdk(slow_server: ServerProcess) -> None:
    """A request waiting behind a long prefill gets keep-alive comments, then a normal stream."""
    body = {"model": "claude-x", "max_tokens": 2, "messages": user(LONG_TEXT)}
    t = threading.Thread(target=stream_raw, args=(slow_server.url, body, {"x-api-key": "sekrit"}))
    t.start()
    time.sleep(0.3)
    c = anthropic.Anthropic(base_url=slow_server.url, api_key="sekrit", max_retries=0)
    with c.messages.stream(model="claude-x", max_tokens=2, messages=user("behind the long one")) as s:
        final = s.get_final_message()
    t.join(60)
    assert final.usage.output_tokens == 2 and final.stop_reason == "max_tokens"
    # A prompt no snapshot covers, so the first stream really prefills for a while.
    fresh = {**body, "messages": user(f"{time.time_ns()} {LONG_TEXT}"), "stream": True}
    with httpx.stream("POST", slow_server.url + "/v1/messages", json=fresh, headers={"x-api-key": "sekrit"}) as r1:
        with httpx.stream(
            "POST",
            slow_server.url + "/v1/messages",
            json={**body, "messages": user("second"), "stream": True},
            headers={"x-api-key": "sekrit"},
            timeout=60,
        ) as r2:
            raw2 = r2.read().decode()
        r1.read()
    assert raw2.startswith(": queued")
    check_event_order(parse_sse(raw2))


def test_a_long_prefill_streams_its_progress_as_a_thinking_block(slow_server: ServerProcess) -> None:
    """Claude Code's watchdog ignores pings; a thinking block with progress deltas keeps the stream
    alive and shows the user how far the prefill is. The answer's blocks follow it."""
    long_text = " ".join(f"progress{i}" for i in range(400))
    body = {"model": "claude-x", "max_tokens": 2, "messages": user(long_text), "thinking": {"type": "adaptive"}}
    events = parse_sse(stream_raw(slow_server.url, body, headers={"x-api-key": "sekrit"}))
    check_event_order(events)
    start = next(d for n, d in events if n == "content_block_start")
    assert start["index"] == 0 and start["content_block"]["type"] == "thinking"
    thinking = "".join(
        d["delta"].get("thinking", "") for n, d in events if n == "content_block_delta" and d["index"] == 0
    )
    assert "Prefilling the prompt" in thinking and " prompt tokens, " in thinking and "tok/s" in thinking, thinking
    # Without thinking asked for, no such block: the answer starts at index 0.
    plain = parse_sse(
        stream_raw(slow_server.url, {**body, "thinking": {"type": "disabled"}}, headers={"x-api-key": "sekrit"})
    )
    assert all(d["content_block"]["type"] != "thinking" for n, d in plain if n == "content_block_start")
    # The SDK reads it as an ordinary thinking block before the answer.
    c = anthropic.Anthropic(base_url=slow_server.url, api_key="sekrit", max_retries=0)
    with c.messages.stream(
        model="claude-x", max_tokens=2, messages=user("sdk " + long_text), extra_body={"thinking": {"type": "adaptive"}}
    ) as s:
        final = s.get_final_message()
    assert final.content[0].type == "thinking" and final.usage.output_tokens == 2


def test_an_answer_cut_by_the_context_limit_says_so(tmp_path: Path, tiny_model: Path) -> None:
    """Cut by the server's context limit: `model_context_window_exceeded` (Claude Code continues
    the answer); cut by the request's or the server's output cap: `max_tokens`."""
    srv = ServerProcess(tiny_model, tmp_path / "server.log", "--max-context", "60")
    try:
        c = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
        msg = c.messages.create(model="claude-x", max_tokens=500, messages=user("hi"), extra_body={"temperature": 0})
        if msg.stop_reason != "end_turn":  # the random model may stop by itself first
            assert msg.stop_reason == "model_context_window_exceeded"
            assert msg.usage.input_tokens + msg.usage.output_tokens == 60
        short = c.messages.create(model="claude-x", max_tokens=1, messages=user("hi"))
        assert short.stop_reason == "max_tokens"
        with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: \d+ tokens > 60 maximum"):
            c.messages.create(model="claude-x", max_tokens=5, messages=user("word " * 80))
    finally:
        srv.stop()


def test_a_structured_request_that_hits_its_deadline_answers_and_keeps_the_cache_right(
    tmp_path: Path, tiny_model: Path
) -> None:
    """The deadline exit used to save a snapshot one token off (a 500 on 9 of 10 requests)."""
    srv = ServerProcess(
        tiny_model, tmp_path / "server.log", "--structured-deadline", "0.3", "--test-slow-prefill", "0.002"
    )
    try:
        schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
        body = {
            "model": "claude-x",
            "max_tokens": 2000,
            "messages": user("a title, slowly"),
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        }
        for _ in range(5):
            r = httpx.post(srv.url + "/v1/messages", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["stop_reason"] in ("max_tokens", "end_turn")
        assert "snapshot of" not in srv.log()
    finally:
        srv.stop()


def test_a_non_streamed_client_that_leaves_frees_the_worker(server: ServerProcess) -> None:
    """Dropped during decoding (events flowing), the generation stops: the next request waits
    for ~nothing instead of thousands of tokens."""
    body = {"model": "claude-x", "max_tokens": 100000, "messages": user("decode forever, non-streamed")}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/messages", json=body, timeout=1.0)
    t0 = time.monotonic()
    r = httpx.post(
        server.url + "/v1/messages", json={"model": "claude-x", "max_tokens": 3, "messages": user("next")}, timeout=60
    )
    assert r.status_code == 200
    assert time.monotonic() - t0 < 5
    recent = httpx.get(server.url + "/v1/cache/requests", timeout=10).json()["data"]
    assert recent[-2]["outcome"] == "cancelled" and recent[-2]["output"] < 2000, recent[-2]
