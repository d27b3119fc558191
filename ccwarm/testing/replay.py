"""Replaying a Claude Code session against a real server: streamed requests, measured answers.

Shared by the benchmarks and the soak. `Replay` builds each request of a 2.1.197-shaped session
from the server's previous answers; `send` streams one request and records what the server
reported (restored and prefilled tokens from `usage`, TTFT measured here).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cache_backend.hermes import tool_call_markup
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec, text_of_size


@dataclass
class Measured:
    label: str
    kind: str
    prompt_tokens: int
    restored: int
    prefilled: int
    ttft_s: float
    output_tokens: int
    stop_reason: str


def stream_request(
    client: httpx.Client, body: dict[str, Any], headers: dict[str, str]
) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """POST a streaming request; returns (final message with content blocks, TTFT, usage)."""
    start = time.perf_counter()
    ttft = None
    message: dict[str, Any] = {}
    blocks: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    usage: dict[str, Any] = {}
    with client.stream("POST", "/v1/messages?beta=true", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:500]}")
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            if event in ("content_block_start", "content_block_delta") and ttft is None:
                ttft = time.perf_counter() - start
            if event == "message_start":
                message = data["message"]
                usage.update(message.get("usage", {}))
            elif event == "content_block_start":
                blocks.append(dict(data["content_block"]))
            elif event == "content_block_delta":
                d = data["delta"]
                if d["type"] == "text_delta":
                    blocks[data["index"]]["text"] += d["text"]
                elif d["type"] == "input_json_delta":
                    partial[data["index"]] = partial.get(data["index"], "") + d["partial_json"]
            elif event == "content_block_stop" and data["index"] in partial:
                blocks[data["index"]]["input"] = json.loads(partial.pop(data["index"]) or "{}")
            elif event == "message_delta":
                message["stop_reason"] = data["delta"].get("stop_reason")
                usage.update(data.get("usage", {}))
            elif event == "error":
                raise RuntimeError(f"stream error: {data}")
    message["content"] = blocks
    return message, ttft if ttft is not None else time.perf_counter() - start, usage


class Replay:
    """Builds each request from the server's previous answers, as Claude Code does."""

    def __init__(self, spec: SessionSpec, turns: int) -> None:
        self.gen = SessionGenerator(spec)
        self.turns = turns
        self.tools = self.gen.tools

    def script(self, extra_turns: int = 0) -> list[dict[str, Any]]:
        entries = [
            {"when": "[[tail]]", "reply": "Noted."},
            {"when": "[[title]]", "reply": '{"title": "What the build does"}'},
            {"when": "[[sub 1]]", "reply": "Searching.\n" + tool_call_markup("Grep", {"pattern": "config"})},
            {"when": "[[sub 2]]", "reply": "The configuration is read in two places."},
        ]
        for k in range(1, self.turns + 2 + extra_turns):
            tool = self.tools[k % 6]["name"]
            reply = f"Step {k}: checking the next file.\n" + tool_call_markup(tool, {"path": f"src/module_{k}.py"})
            entries.append({"when": f"[[turn {k}]]", "reply": reply})
        return entries

    def request(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list | None,
        subagent: bool = False,
        instructions: str | None = None,
        label: str,
        agent_id: str | None = None,
    ) -> tuple[dict, dict]:
        req = self.gen.request(
            messages,
            tools=tools,
            label=label,
            subagent=subagent,
            instructions=instructions,
            agent_id=agent_id,
            max_tokens=256,
        )
        return req.body, req.headers

    @staticmethod
    def server_args(model: str | Path, cache_dir: Path, script: Path) -> tuple[str, ...]:
        """The companion server for a replay: its model, cache folder and scripted replies."""
        return ("--model", str(model), "--cache-dir", str(cache_dir), "--max-context", "200000",
                "--test-forced-replies", str(script))  # fmt: skip

    def subagent_request(self, messages: list[dict[str, Any]], *, agent_id: str, label: str) -> tuple[dict, dict]:
        """A sub-agent's request: 8 of the main tools, its own (shorter) instructions, its agent id."""
        instructions = "You are a search agent. " + self.gen.instructions[: len(self.gen.instructions) // 3]
        return self.request(
            messages, tools=self.tools[:8], subagent=True, instructions=instructions, label=label, agent_id=agent_id
        )

    def tool_results(self, assistant: dict[str, Any], marker: str) -> dict[str, Any]:
        results = [
            {"type": "tool_result", "tool_use_id": b["id"], "content": text_of_size(self.gen.rng, 1200) + f"\n{marker}"}
            for b in assistant["content"]
            if b["type"] == "tool_use"
        ]
        if not results:
            return {"role": "user", "content": f"Go on. {marker}"}
        return {"role": "user", "content": results}


def post_request(client: httpx.Client, body: dict[str, Any], headers: dict[str, str]) -> tuple[dict, float, dict]:
    """POST a request that is not streamed (as the CLI's classifier checks are); the whole answer's
    time stands in for TTFT."""
    start = time.perf_counter()
    resp = client.post("/v1/messages?beta=true", json=body, headers=headers)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    message = resp.json()
    return message, time.perf_counter() - start, message.get("usage", {})


# A user's pause before a main turn (reading the answer, typing), also after a restart: an idle
# server's first product wakes BLAS threads and cold caches (+~10 ms on the bench model), so a
# figure that compares a turn after a pause with back-to-back turns compares unlike things.
THINK_S = 1.0
PAUSED_KINDS = ("main", "restart")


def send(
    client: httpx.Client, out: list[Measured], body: dict[str, Any], headers: dict[str, str], label: str, kind: str
) -> dict[str, Any]:
    """Send one request (streamed or not, as the body says) and record what it cost; main turns
    come after a user's pause (THINK_S)."""
    if kind in PAUSED_KINDS:
        time.sleep(THINK_S)
    message, ttft, usage = (stream_request if body.get("stream") else post_request)(client, body, headers)
    restored = usage.get("cache_read_input_tokens", 0)
    prefilled = usage.get("input_tokens", 0)
    out.append(
        Measured(
            label,
            kind,
            restored + prefilled,
            restored,
            prefilled,
            ttft,
            usage.get("output_tokens", 0),
            message.get("stop_reason") or "",
        )
    )
    return message


def wait_for_warm_start(server_url: str, timeout: float = 600.0) -> dict[str, Any]:
    """Wait until a restarted server has loaded its recent conversations back (as a user does
    while typing the next prompt); returns its warm-start figures (state, seconds, tokens, bytes)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"{server_url}/v1/cache/stats", timeout=60).json()
        if stats.get("warm_start_state", "off") not in ("waiting", "running") or time.monotonic() > deadline:
            return {k.removeprefix("warm_start_"): v for k, v in stats.items() if k.startswith("warm_start_")}
        time.sleep(0.05)
