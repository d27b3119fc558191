"""Messages API end to end: SSE event order, concurrent streams, cancellation (a client that
leaves mid-stream, during prefill or a non-streamed answer), pings and the progress thinking block
during a long prefill, queued requests, the API key, output and context limits, structured deadlines."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anthropic
import httpx
import pytest
from server_helpers import (  # noqa: F401 - fixtures
    ServerProcess,
    check_event_order,
    parse_sse,
    server,
    stream_raw,
    tiny_model,
    user,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


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
