"""The prefix cache through the real server: restored greedy output equals a cold run's.

Two real servers on the same 2-layer tiny model: one with the snapshot cache, one with
`--cache-memory 0` (every request prefilled from scratch) as the reference. Requests go through
the official anthropic SDK; temperature 0 makes decoding greedy, so outputs must match token for
token, and the usage fields tell how much each request restored.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import anthropic
import httpx
import pytest

from cache_backend.hermes import tool_call_markup
from ccwarm.server_proc import ServerProcess
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec

GEN = SessionGenerator(SessionSpec(seed=11, tools=6, tools_json_bytes=4000, system_bytes=1500))
SYSTEM = [b for b in GEN.system(None)[1:]]  # identity + instructions, as normalize leaves them
TOOLS = GEN.tools
TOOL_REPLY = "Let me look.\n" + tool_call_markup(TOOLS[0]["name"], {"path": "src/app.py"})
SCRIPT = [{"when": "[[call a tool]]", "reply": TOOL_REPLY}]
GREEDY = {"temperature": 0}


def start(model: Path, tmp: Path, name: str, *extra: str, cache_dir: Path | None = None) -> ServerProcess:
    return ServerProcess(
        "--model",
        str(model),
        "--cache-dir",
        str(cache_dir or tmp / f"cache-{name}"),
        "--max-context",
        "100000",
        "--test-forced-replies",
        str(tmp / "script.json"),
        *extra,
        log_path=tmp / f"{name}.log",
        timeout=120,
    )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prefix-cache")
    (d / "script.json").write_text(json.dumps(SCRIPT))
    return d


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp):
    srv = start(tiny_model_dir, tmp, "reference", "--cache-memory", "0")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cached(tiny_model_dir, tmp):
    srv = start(tiny_model_dir, tmp, "cached")
    yield srv
    srv.stop()


def ask(server: ServerProcess, messages: list[dict], *, system=SYSTEM, tools=TOOLS, max_tokens: int = 8):
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    return client.messages.create(
        model="claude-opus-4-8", max_tokens=max_tokens, system=system, tools=tools, messages=messages, extra_body=GREEDY
    )


def same_as_cold(cached: ServerProcess, reference: ServerProcess, messages: list[dict], **kw):
    """Ask both servers. Every request goes to both, in the same order, because a server renders
    an earlier answer with the tokens it generated for it: both must have generated it."""
    warm = ask(cached, messages, **kw)
    cold = ask(reference, messages, **kw)
    assert cold.usage.cache_read_input_tokens == 0
    assert content_of(warm) == content_of(cold)
    assert warm.usage.input_tokens + warm.usage.cache_read_input_tokens == cold.usage.input_tokens
    return warm


def content_of(msg) -> list[dict]:
    """The answer's blocks without tool_use ids (random per response)."""
    return [{k: v for k, v in b.model_dump().items() if k != "id"} for b in msg.content]


def prompt_len(msg) -> int:
    return msg.usage.input_tokens + msg.usage.cache_read_input_tokens


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def stats(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/v1/cache/stats", timeout=10).json()


def test_system_and_tools_prefix_is_shared_across_conversations(cached, reference) -> None:
    first = same_as_cold(cached, reference, [user("Explain the build, please.")])
    second = same_as_cold(cached, reference, [user("Something else entirely: list the tests.")])
    # Everything up to the first message is restored: system + tools (at least 90% of it).
    assert second.usage.cache_read_input_tokens >= 0.9 * (prompt_len(first) - 20)


def test_conversation_hit_after_a_text_answer(cached, reference) -> None:
    history = [user("Describe the module layout.")]
    answer = same_as_cold(cached, reference, history)
    history += [{"role": "assistant", "content": answer.content[0].text}, user("And the tests?")]
    warm = same_as_cold(cached, reference, history)
    # The model's own answer rendered back gives the tokens it generated: prompt + output restored.
    assert warm.usage.cache_read_input_tokens == prompt_len(answer) + answer.usage.output_tokens - 1


def test_hit_after_a_tool_call(cached, reference) -> None:
    history = [user("Open the app file. [[call a tool]]")]
    call = same_as_cold(cached, reference, history, max_tokens=200)
    assert call.stop_reason == "tool_use"
    tool_use = call.content[-1]
    history += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in call.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "def main(): ..."}],
        },
    ]
    warm = same_as_cold(cached, reference, history)
    assert warm.usage.cache_read_input_tokens == prompt_len(call) + call.usage.output_tokens - 1


def test_exact_repeat_and_prefix_of_a_stored_prompt(cached, reference) -> None:
    history = [
        user("First question about the parser."),
        {"role": "assistant", "content": "It tokenizes."},
        user("Second question about the lexer."),
    ]
    first = same_as_cold(cached, reference, history)
    repeat = same_as_cold(cached, reference, history)
    assert repeat.usage.input_tokens == 1  # all but the last token restored
    shorter = same_as_cold(cached, reference, history[:1])  # a prefix of the stored prompt
    assert shorter.usage.input_tokens == 1 and prompt_len(shorter) < prompt_len(first)


def test_restart_from_disk(tiny_model_dir, tmp, reference) -> None:
    cache_dir = tmp / "cache-restart"
    history = [user("Walk me through the release process.")]
    srv = start(tiny_model_dir, tmp, "before-restart", cache_dir=cache_dir)
    try:
        answer = same_as_cold(srv, reference, history)
    finally:
        srv.stop()  # a clean stop waits for queued snapshot writes
    history += [{"role": "assistant", "content": answer.content[0].text}, user("Which step is slowest?")]
    srv = start(tiny_model_dir, tmp, "after-restart", cache_dir=cache_dir)
    try:
        warm = same_as_cold(srv, reference, history)
        assert warm.usage.cache_read_input_tokens == prompt_len(answer) + answer.usage.output_tokens - 1
    finally:
        srv.stop()


def test_a_stop_right_after_an_answer_still_writes_its_snapshot(tiny_model_dir, tmp) -> None:
    cache_dir = tmp / "cache-quick-stop"
    history = [user("Stop the server right after this answer.")]
    srv = start(tiny_model_dir, tmp, "quick-stop", cache_dir=cache_dir)
    try:
        answer = ask(srv, history)
    finally:
        srv.stop()  # SIGTERM at once, while the snapshot writes are still queued
    assert "stopped; snapshots written" in srv.log_path.read_text()
    srv = start(tiny_model_dir, tmp, "quick-stop-after", cache_dir=cache_dir)
    try:
        again = ask(srv, history)
        assert again.usage.cache_read_input_tokens == prompt_len(answer) - 1  # an exact repeat, from disk
    finally:
        srv.stop()


def test_budget_respected_and_eviction_keeps_answers_right(tiny_model_dir, tmp, reference) -> None:
    probe = ask(reference, [user("probe")], max_tokens=1)
    # Room for about two conversations' snapshots (2 layers x 2 KV heads x 16 dims x float32 x K+V).
    per_token = 2 * 2 * 16 * 4 * 2
    budget = per_token * prompt_len(probe) * 2
    srv = start(tiny_model_dir, tmp, "small", "--cache-memory", str(budget), "--cache-disk", "0")
    try:
        main = [user("The main conversation starts here.")]
        answer = same_as_cold(srv, reference, main)
        for i in range(5):  # side requests and sub-agents with their own prefixes
            same_as_cold(
                srv,
                reference,
                [user(f"unrelated side request {i}")],
                system=[{"type": "text", "text": f"Side prompt {i}."}],
            )
            s = stats(srv)
            assert s["memory_bytes"] <= budget, s
        assert stats(srv)["evictions"] + stats(srv).get("truncations", 0) > 0
        main += [{"role": "assistant", "content": answer.content[0].text}, user("Continue.")]
        same_as_cold(srv, reference, main)
    finally:
        srv.stop()


def test_corrupted_snapshot_files_are_ignored(tiny_model_dir, tmp, reference) -> None:
    cache_dir = tmp / "cache-corrupt"
    history = [user("Summarize the changelog.")]
    srv = start(tiny_model_dir, tmp, "corrupt-1", cache_dir=cache_dir)
    try:
        same_as_cold(srv, reference, history)
    finally:
        srv.stop()
    files = sorted(cache_dir.rglob("*.safetensors"))
    assert files
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3])
    (files[0].parent / "junk.safetensors").write_bytes(b"not a snapshot")
    srv = start(tiny_model_dir, tmp, "corrupt-2", cache_dir=cache_dir)
    try:
        warm = same_as_cold(srv, reference, history)
        assert warm.usage.cache_read_input_tokens == 0
        assert f"removed {len(files) + 1} unusable entries" in srv.log()
        assert stats(srv)["bad_files_removed"] == len(files) + 1
    finally:
        srv.stop()


def read_for(srv: ServerProcess, body: dict, seconds: float, then=None) -> list[str]:
    """Stream `body` and read its events (pings included) for `seconds`, then call `then` and leave."""
    lines: list[str] = []
    t0 = time.monotonic()
    with httpx.stream("POST", f"{srv.url}/v1/messages", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            lines.append(line)
            if time.monotonic() - t0 >= seconds:
                if then is not None:
                    then()
                break
    return lines


def kept_tokens(srv: ServerProcess) -> int:
    return int(re.findall(r"kept its partial prefill: (\d+) of", srv.log())[-1])


def streamed_body(messages: list[dict]) -> dict:
    """A greedy, streamed request with the system prompt and tools: long to prefill."""
    return {"model": "claude-x", "max_tokens": 8, "stream": True, "system": SYSTEM, "tools": TOOLS,
            "messages": messages, "temperature": 0}  # fmt: skip


def test_a_dropped_prefill_is_resumed_by_the_retry(tiny_model_dir, tmp, reference) -> None:
    """A client drops mid-prefill; the same request again prefills only the rest, answers as cold."""
    srv = start(tiny_model_dir, tmp, "resume", "--test-slow-prefill", "0.002", "--ping-interval", "0.1")
    try:
        long_history = [user("Read this carefully. " + " ".join(f"line {i} of the log" for i in range(300)))]
        body = streamed_body(long_history)
        read_for(srv, body, 1.5)  # well past system + tools, then walk away
        deadline = time.monotonic() + 30
        while "kept its partial prefill" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "kept its partial prefill" in srv.log()
        after = same_as_cold(srv, reference, long_history)
        # It resumed exactly where the dropped request stopped, well past system + tools.
        assert stats(srv)["resumed_prefills"] == 1
        assert after.usage.cache_read_input_tokens == kept_tokens(srv) > 100
    finally:
        srv.stop()


def test_a_prefill_stopped_by_shutdown_resumes_after_the_restart(tiny_model_dir, tmp, reference) -> None:
    cache_dir = tmp / "cache-shutdown"
    srv = start(
        tiny_model_dir, tmp, "shutdown-1", "--test-slow-prefill", "0.002", "--ping-interval", "0.1", cache_dir=cache_dir
    )
    history = [user("Shut down in the middle of this. " + " ".join(f"row {i} of the table" for i in range(300)))]
    body = streamed_body(history)
    try:
        read_for(srv, body, 1.5, then=srv.stop)  # SIGTERM while the prefill runs
    finally:
        srv.stop()
    assert "stopped by the server shutdown" in srv.log()
    again = start(tiny_model_dir, tmp, "shutdown-2", cache_dir=cache_dir)
    try:
        after = same_as_cold(again, reference, history)
        assert stats(again)["resumed_prefills"] == 1
        assert after.usage.cache_read_input_tokens == kept_tokens(srv) > 100
    finally:
        again.stop()


@pytest.mark.parametrize("store", ["blocks", "snapshots"])
def test_every_restore_path_answers_as_cold(tiny_model_dir, tmp, reference, store: str) -> None:
    """The same conversation, a sibling branch, after a restart, and with most of the chain evicted
    from memory (loaded back from disk): greedy output equals the cold server's, token for token."""
    cache_dir = tmp / f"cache-paths-{store}"
    opts = ("--cache-store", store, "--cache-block-tokens", "32")
    history = [user("Explain the deploy script.")]
    srv = start(tiny_model_dir, tmp, f"paths-{store}-1", *opts, cache_dir=cache_dir)
    try:
        first = same_as_cold(srv, reference, history)
        said = {"role": "assistant", "content": first.content[0].text}
        second = same_as_cold(srv, reference, [*history, said, user("And the rollback?")])
        assert second.usage.cache_read_input_tokens == prompt_len(first) + first.usage.output_tokens - 1
        sibling = same_as_cold(srv, reference, [*history, said, user("And the tests?")])
        assert sibling.usage.cache_read_input_tokens >= prompt_len(first)
        assert stats(srv)["store"] == store
    finally:
        srv.stop()
    history = [*history, said, user("And the rollback?"), {"role": "assistant", "content": second.content[0].text}]
    # 2 layers x 2 KV heads x 16 dims x float32 x K+V = 512 bytes a token: room for ~150 tokens.
    srv = start(tiny_model_dir, tmp, f"paths-{store}-2", *opts, "--cache-memory", "80000", cache_dir=cache_dir)
    try:
        after = same_as_cold(srv, reference, [*history, user("Summarize.")])
        if store == "blocks":
            assert after.usage.cache_read_input_tokens == prompt_len(second) + second.usage.output_tokens - 1
        # Another conversation pushes the chain out of memory; the next turn reloads it from disk.
        same_as_cold(srv, reference, [user("unrelated")], system=[{"type": "text", "text": "Another prompt."}])
        again = same_as_cold(srv, reference, [*history, user("List the risks.")])
        s = stats(srv)
        assert s["memory_bytes"] <= 80000 and s["evictions"] > 0, s
        if store == "blocks":
            assert again.usage.cache_read_input_tokens >= prompt_len(second) + second.usage.output_tokens - 1
    finally:
        srv.stop()
