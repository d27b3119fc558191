"""Claude-Code-shaped request bodies, generated: for tests, benchmarks and demos.

We never ship Claude Code's own prompt text; this writes text and schemas of the same shape and
size (3 system blocks with a rotating billing block, ~25 tools totalling 60-90 KB of JSON Schema,
reminders, mid-conversation `role: "system"` messages, tool_use/tool_result turns, cache_control
markers that move to the newest block, content list/string flips). Seeded, so every run of a
benchmark replays the same session.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

_WORDS = (
    "agent file path command output tool result user request project code change test build "
    "branch commit diff review search pattern directory module function class value error line "
    "context session model answer task plan step check run read write edit update create remove "
    "always never only before after when while because should must may instead prefer avoid "
    "the a an of to in on for with from by as at is are be this that these those it its your "
    "clear short safe exact current relevant specific absolute relative multiple single large"
).split()

_TOOL_NAMES = (
    "Bash Read Write Edit MultiEdit Glob Grep LS NotebookRead NotebookEdit WebFetch WebSearch "
    "TodoWrite Task ExitPlanMode BashOutput KillShell SlashCommand Skill AskUserQuestion "
    "ListMcpResources ReadMcpResource mcp__git__status mcp__git__log mcp__docs__lookup"
).split()

BILLING_VERSION = "2.1.197"


def _sentence(rng: random.Random, lo: int = 8, hi: int = 22) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def text_of_size(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    n = 0
    while n < size:
        p = _paragraph(rng, rng.randint(3, 7))
        if rng.random() < 0.3:
            p = "- " + p
        parts.append(p)
        n += len(p) + 2
    return "\n\n".join(parts)[:size]


def _schema_property(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kind = rng.choice(
        ["string", "string", "integer", "boolean", "array", "object"] if depth < 2 else ["string", "integer"]
    )
    prop: dict[str, Any] = {"type": kind, "description": _sentence(rng, 10, 30)}
    if kind == "array":
        prop["items"] = _schema_property(rng, depth + 1)
    elif kind == "object":
        props = {f"{rng.choice(_WORDS)}_{i}": _schema_property(rng, depth + 1) for i in range(rng.randint(2, 4))}
        prop.update(properties=props, required=sorted(props)[:1], additionalProperties=False)
    elif kind == "string" and rng.random() < 0.3:
        prop["enum"] = sorted({rng.choice(_WORDS) for _ in range(4)})
    return prop


def make_tool(rng: random.Random, name: str, description_size: int) -> dict[str, Any]:
    props = {f"{rng.choice(_WORDS)}_{i}": _schema_property(rng) for i in range(rng.randint(2, 6))}
    return {
        "name": name,
        "description": text_of_size(rng, description_size),
        "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": props,
            "required": sorted(props)[: rng.randint(1, len(props))],
            "additionalProperties": False,
        },
    }


def billing_text(version_suffix: str, body_hash: str | None, *, subagent: bool = False) -> str:
    fields = [f"cc_version={BILLING_VERSION}.{version_suffix}", "cc_entrypoint=cli"]
    if subagent:
        fields.append("cc_is_subagent=true")
    if body_hash is not None:
        fields.append(f"cch={body_hash}")
    return "x-anthropic-billing-header: " + "; ".join(fields) + ";"


@dataclass
class Request:
    """One generated request: its body and the headers Claude Code would send with it."""

    body: dict[str, Any]
    headers: dict[str, str]
    label: str

    def raw(self) -> bytes:
        return json.dumps(self.body).encode()


@dataclass
class SessionSpec:
    """Sizes of a generated session. Defaults give ~80 KB of tools and ~12 KB of system text."""

    seed: int = 0
    tools: int = 25
    tools_json_bytes: int = 75_000
    system_bytes: int = 12_000
    turns: int = 8
    with_cch: bool = True
    date: str = "2026-11-22"
    extra: dict[str, Any] = field(default_factory=dict)


class SessionGenerator:
    """A main conversation plus the side requests and sub-agents that interleave with it."""

    def __init__(self, spec: SessionSpec | None = None) -> None:
        self.spec = spec or SessionSpec()
        self.rng = random.Random(self.spec.seed)
        self.session_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.device_id = hashlib.sha256(f"device{self.spec.seed}".encode()).hexdigest()
        self.tools = self._make_tools()
        self.identity = "You are Claude Code, a command line assistant for software engineering work."
        self.instructions = text_of_size(self.rng, self.spec.system_bytes)
        self.messages: list[dict[str, Any]] = []
        self._turn = 0
        self._version_suffix = hashlib.sha256(f"first{self.spec.seed}".encode()).hexdigest()[:3]

    def _make_tools(self) -> list[dict[str, Any]]:
        tools = [make_tool(self.rng, _TOOL_NAMES[i % len(_TOOL_NAMES)], 120) for i in range(self.spec.tools)]
        # Schemas first, then spread the remaining bytes over the descriptions (uneven, as real
        # tools are: Bash and Task carry pages of guidance, LS a line).
        room = self.spec.tools_json_bytes - len(json.dumps(tools))
        weights = [self.rng.random() ** 2 for _ in tools]
        total = sum(weights) or 1.0
        for tool, w in zip(tools, weights):
            extra = int(room * w / total)
            if extra > 2:
                tool["description"] += "\n\n" + text_of_size(self.rng, extra - 2)
        return tools

    # -- pieces ---------------------------------------------------------------------------------

    def system(
        self, body_hash: str | None, *, subagent: bool = False, instructions: str | None = None
    ) -> list[dict[str, Any]]:
        # The cc_version suffix derives from the first user message: sub-agents get their own.
        suffix = self._version_suffix if not subagent else self._version_suffix[::-1]
        return [
            {"type": "text", "text": billing_text(suffix, body_hash, subagent=subagent)},
            {"type": "text", "text": self.identity, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": instructions or self.instructions, "cache_control": {"type": "ephemeral"}},
        ]

    def headers(self, agent_id: str | None = None) -> dict[str, str]:
        return cli_headers(self.session_id, f"claude-cli/{BILLING_VERSION} (external, cli)", BETAS, agent_id)

    def metadata(self) -> dict[str, str]:
        return {"user_id": json.dumps({"device_id": self.device_id, "account_uuid": "", "session_id": self.session_id})}

    def request(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None,
        label: str,
        subagent: bool = False,
        instructions: str | None = None,
        agent_id: str | None = None,
        **fields: Any,
    ) -> Request:
        """The request Claude Code would send for this history; `fields` override body keys (max_tokens, ...)."""
        body = self._body(messages, tools=tools)
        body.update(fields)
        return self._finish(body, subagent=subagent, label=label, agent_id=agent_id, instructions=instructions)

    def _finish(
        self,
        body: dict[str, Any],
        *,
        subagent: bool = False,
        label: str,
        agent_id: str | None = None,
        instructions: str | None = None,
    ) -> Request:
        # cch is derived from the body, so it changes on every request, as in the versions that send it.
        digest = (
            hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:5] if self.spec.with_cch else None
        )
        body["system"] = self.system(digest, subagent=subagent, instructions=instructions)
        ordered = {
            k: body[k]
            for k in (
                "model",
                "messages",
                "system",
                "tools",
                "metadata",
                "max_tokens",
                "thinking",
                "context_management",
                "output_config",
                "stream",
            )
            if k in body
        }
        return Request(body=ordered, headers=self.headers(agent_id), label=label)

    @staticmethod
    def _move_cache_control(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """cache_control sits on the newest block only; older single-block lists flip to strings."""
        out = copy.deepcopy(messages)
        for m in out:
            content = m["content"]
            if isinstance(content, list):
                for block in content:
                    block.pop("cache_control", None)
                if m["role"] == "user" and len(content) == 1 and content[0].get("type") == "text":
                    m["content"] = content[0]["text"]
        last = out[-1]
        if isinstance(last["content"], str):
            last["content"] = [{"type": "text", "text": last["content"]}]
        last["content"][-1]["cache_control"] = {"type": "ephemeral"}
        return out

    def _body(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "claude-opus-4-8",
            "messages": self._move_cache_control(messages),
            "tools": tools,
            "metadata": self.metadata(),
            "max_tokens": 64000,
            "thinking": {"type": "adaptive"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"},
            "stream": True,
        }
        if tools is None:
            del body["tools"]
        return body

    # -- the conversation -----------------------------------------------------------------------

    def first_user_message(self, prompt: str) -> dict[str, Any]:
        reminder = (
            "<system-reminder>\nAs you answer the user's questions, you can use the following context:\n"
            f"# claudeMd\n{text_of_size(self.rng, 1500)}\n\nToday's date is {self.spec.date}.\n</system-reminder>"
        )
        return {"role": "user", "content": [{"type": "text", "text": reminder}, {"type": "text", "text": prompt}]}

    def main_turns(self) -> list[Request]:
        """The main thread: a first prompt, then tool calls and results, then a final answer."""
        out: list[Request] = []
        msgs = [self.first_user_message("Look at the project and tell me what the build does.")]
        out.append(self.request(msgs, tools=self.tools, label="main 1"))
        for turn in range(2, self.spec.turns + 1):
            tool = self.rng.choice(self.tools[:6])
            tool_id = f"toolu_{hashlib.sha256(f'{self.spec.seed}-{turn}'.encode()).hexdigest()[:24]}"
            msgs.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": _sentence(self.rng)},
                        {
                            "type": "tool_use",
                            "id": tool_id,
                            "name": tool["name"],
                            "input": {"path": f"src/{self.rng.choice(_WORDS)}.py"},
                        },
                    ],
                }
            )
            result = {
                "type": "tool_result",
                "tool_use_id": tool_id,
                "content": text_of_size(self.rng, self.rng.randint(400, 3000)),
            }
            if turn == 4:
                result["is_error"] = True
            msgs.append({"role": "user", "content": [result]})
            if turn == 5:
                msgs.append({"role": "system", "content": "The user changed the permission mode to accept edits."})
            out.append(self.request(msgs, tools=self.tools, label=f"main {turn}"))
        self.messages = msgs
        return out

    def title_request(self) -> Request:
        """A side request: no tools, a JSON-schema output format, its own short system text."""
        body = self._body(
            [{"role": "user", "content": "Look at the project and tell me what the build does."}], tools=None
        )
        body["max_tokens"] = 512
        body["output_config"] = {
            "format": {
                "type": "json_schema",
                "schema": {
                    "type": "object",
                    "properties": {"title": {"type": "string"}},
                    "required": ["title"],
                    "additionalProperties": False,
                },
            }
        }
        return self._finish(
            body, label="side: title", instructions="Generate a concise title for this conversation. Answer with JSON."
        )

    def subagent_requests(self, turns: int = 2) -> list[Request]:
        """A sub-agent: a different system prompt and a subset of the tools, its own agent id."""
        agent_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        instructions = text_of_size(self.rng, self.spec.system_bytes // 3)
        tools = self.tools[:8]
        msgs: list[dict[str, Any]] = [
            {"role": "user", "content": "Find every place that reads the build configuration."}
        ]
        out = []
        for turn in range(1, turns + 1):
            out.append(
                self.request(
                    msgs,
                    tools=tools,
                    subagent=True,
                    instructions=instructions,
                    label=f"subagent {turn}",
                    agent_id=agent_id,
                )
            )
            tool_id = f"toolu_sub{turn:021d}"
            msgs = msgs + [
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": tool_id, "name": "Grep", "input": {"pattern": "config"}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": tool_id,
                            "content": [{"type": "text", "text": text_of_size(self.rng, 600)}],
                        }
                    ],
                },
            ]
        return out

    def session(self) -> list[Request]:
        """Main turns with a title request after the first and a sub-agent in the middle."""
        main = self.main_turns()
        side = self.title_request()
        sub = self.subagent_requests()
        middle = len(main) // 2
        return [main[0], side, *main[1:middle], *sub, *main[middle:]]


BETAS = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"


def cli_headers(session_id: str, user_agent: str, betas: str, agent_id: str | None = None) -> dict[str, str]:
    """The headers Claude Code sends with a /v1/messages request (an agent id for sub-agents)."""
    h = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": betas,
        "x-app": "cli",
        "user-agent": user_agent,
        "X-Claude-Code-Session-Id": session_id,
        "x-api-key": "sk-ant-test-secret",
    }
    if agent_id:
        h["x-claude-code-agent-id"] = agent_id
    return h
