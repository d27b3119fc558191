"""Messages API end to end (a real subprocess, the official SDK, raw SSE): answers, token counts,
tool calls and their round trip, stop sequences, structured output."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from server_helpers import (  # noqa: F401 - fixtures
    TOOLS,
    ServerProcess,
    check_event_order,
    client,
    parse_sse,
    server,
    stream_raw,
    tiny_model,
    user,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


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
