"""Request bodies in the shapes of the current Claude Code CLI (`claude_cli.CLAUDE_CODE_VERSION`),
one request of each kind at a time: the builders that tests, benchmarks and the soak compose into
conversations (the fixed whole session is in synthetic_current.py).

Generated, never copied: text and schemas of the same shape and size as what the CLI sends
(measured with a recording upstream, see docs/claude-code.md), seeded so every run is the same:
- the main thread: 12 tools (13 interactive) with `DeferredToolPlaceholder` (`defer_loading`),
  `messages[0]` a user message of reminders + the prompt, `messages[1]` a ~10 KB `role: "system"`
  message carrying a message-level `output_config`, later system messages mid-conversation;
- ToolSearch: a `tool_result` holding `tool_reference` blocks, after which the loaded tool
  (`defer_loading: true`) is inserted into `tools` in alphabetical position;
- background sub-agents (`x-claude-code-agent-id`, `cc_is_subagent=true`, 8 tools) and the
  task-notification user message that reports back to the main thread;
- auto-mode classifier requests: not streamed, no tools, a ~141 KB system prompt, a transcript;
- `/compact`: the compaction request, then a conversation with an empty system message;
- first-party mode (the CLI believes it talks to Anthropic): per-request billing fields and a
  system split into 4 blocks, one with `scope: "global"`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

from ccwarm.claude_cli import CLAUDE_CODE_VERSION
from ccwarm.testing.synthetic import BETAS, Request, cli_headers, make_tool, text_of_size

MAIN_TOOLS = (
    "Agent",
    "Bash",
    "Edit",
    "ListAgents",
    "Read",
    "ReportFindings",
    "ScheduleWakeup",
    "Skill",
    "ToolSearch",
    "Workflow",
    "Write",
)
INTERACTIVE_TOOLS = ("AskUserQuestion",)
SUBAGENT_TOOLS = ("Agent", "Bash", "Edit", "Read", "Skill", "ToolSearch", "Write")
PLACEHOLDER = "DeferredToolPlaceholder"
DEFERRED = ("NotebookEdit", "WebFetch", "WebSearch", "mcp__docs__lookup")
CLASSIFIER_SYSTEM = "You are a security monitor for autonomous AI coding agents."
COMPACT_PROMPT = "CRITICAL: Respond with TEXT ONLY. Do NOT call any tools."
CONTINUED = "This session is being continued from a previous conversation that ran out of context."


@dataclass
class CurrentSpec:
    """Sizes measured on the current CLI (-p: 12 tools, ~32 KB; interactive: 13, ~36 KB)."""

    seed: int = 0
    interactive: bool = False
    tools_json_bytes: int = 32_000
    instructions_bytes: int = 7_000
    environment_bytes: int = 9_500
    classifier_bytes: int = 141_000
    first_party: bool = False  # per-request billing fields, 4 system blocks
    date: str = "2026-12-02"


class CurrentRequests:
    """One session's state (seeded, its id, the deferred tools loaded so far, the request count)
    and the requests it sends: main thread, ToolSearch, sub-agents, classifier, /compact."""

    def __init__(self, spec: CurrentSpec | None = None) -> None:
        self.spec = spec or CurrentSpec()
        self.rng = random.Random(self.spec.seed)
        self.session_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        names = MAIN_TOOLS + (INTERACTIVE_TOOLS if self.spec.interactive else ())
        self.base_tools = self._tools(names, self.spec.tools_json_bytes)
        self.deferred = {n: {**make_tool(self.rng, n, 900), "defer_loading": True} for n in DEFERRED}
        self.loaded: list[str] = []
        self.identity = (
            "You are Claude Code, Anthropic's official CLI for Claude."
            if self.spec.interactive
            else "You are a Claude agent, built on Anthropic's Claude Agent SDK."
        )
        self.instructions = "\n" + text_of_size(self.rng, self.spec.instructions_bytes)
        self.environment = "# Environment\n" + text_of_size(self.rng, self.spec.environment_bytes)
        self.classifier_prompt = (
            CLASSIFIER_SYSTEM + "\n\n## Context\n\n" + text_of_size(self.rng, self.spec.classifier_bytes)
        )
        self.entrypoint = "cli" if self.spec.interactive else "sdk-cli"
        self._index = 0  # requests sent, for the first-party per-request fields
        self._prev_req: str | None = None

    # -- pieces ---------------------------------------------------------------------------------

    def _tools(self, names: tuple[str, ...], total_bytes: int) -> list[dict[str, Any]]:
        tools = [make_tool(self.rng, n, 200) for n in names]
        room = total_bytes - len(json.dumps(tools))
        weights = [self.rng.random() ** 2 for _ in tools]
        for tool, w in zip(tools, weights, strict=True):
            extra = int(room * w / (sum(weights) or 1.0))
            if extra > 2:
                tool["description"] += "\n\n" + text_of_size(self.rng, extra - 2)
        placeholder = {
            "name": PLACEHOLDER,
            "description": "Placeholder for tools loaded later.",
            "defer_loading": True,
            "input_schema": {"type": "object", "properties": {}},
        }
        return tools[:-1] + [placeholder, tools[-1]]  # the CLI lists the placeholder before Write

    def tools(self, base: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The tool list with every loaded deferred tool inserted in alphabetical position."""
        plain = [t for t in (base or self.base_tools) if t["name"] != PLACEHOLDER]
        out = sorted(plain + [self.deferred[n] for n in self.loaded], key=lambda t: t["name"])
        placeholder = next(t for t in (base or self.base_tools) if t["name"] == PLACEHOLDER)
        return out[:-1] + [placeholder, out[-1]]

    def suffix(self, first_text: str) -> str:
        return hashlib.sha256(f"{self.spec.seed}{first_text}".encode()).hexdigest()[:3]

    def billing(self, suffix: str, *, subagent: bool = False) -> str:
        fields = [f"cc_version={CLAUDE_CODE_VERSION}.{suffix}", f"cc_entrypoint={self.entrypoint}"]
        if subagent:
            fields.append("cc_is_subagent=true")
        if self.spec.first_party:
            digest = hashlib.sha256(f"{self.spec.seed}-{self._index}".encode()).hexdigest()
            fields += [
                f"cch={digest[:5]}",
                f"cc_prompt_id={digest[5:13]}",
                "cc_turn_origin=user",
                f"cc_prompt_index={self._index}",
                f"cc_turn_index={self._index}",
            ]
            if self._prev_req:
                fields.append(f"cc_prev_req={self._prev_req}")
        return "x-anthropic-billing-header: " + "; ".join(fields) + ";"

    def system(
        self, suffix: str, instructions: str, *, subagent: bool = False, identity: str | None = None
    ) -> list[dict[str, Any]]:
        eph = {"type": "ephemeral"}
        blocks = [
            {"type": "text", "text": self.billing(suffix, subagent=subagent)},
            {"type": "text", "text": identity or self.identity, "cache_control": eph},
        ]
        if self.spec.first_party:  # the instructions split in two, the shared half marked global
            half = len(instructions) // 2
            return blocks + [
                {"type": "text", "text": instructions[:half], "cache_control": {**eph, "scope": "global"}},
                {"type": "text", "text": instructions[half:], "cache_control": eph},
            ]
        return blocks + [{"type": "text", "text": instructions, "cache_control": eph}]

    def headers(self, agent_id: str | None = None) -> dict[str, str]:
        user_agent = f"claude-cli/{CLAUDE_CODE_VERSION} (external, {self.entrypoint})"
        return cli_headers(
            self.session_id, user_agent, BETAS + ",advanced-tool-use-2025-11-20,effort-2025-11-24", agent_id
        )

    def metadata(self) -> dict[str, str]:
        return {
            "user_id": json.dumps(
                {"device_id": hashlib.sha256(b"dev").hexdigest(), "account_uuid": "", "session_id": self.session_id},
                separators=(",", ":"),
            )
        }

    @staticmethod
    def newest_marked(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """cache_control on the newest message only; older one-text-block lists become strings."""
        out = copy.deepcopy(messages)
        for m in out[:-1]:
            c = m["content"]
            if isinstance(c, list):
                for b in c:
                    b.pop("cache_control", None)
                if len(c) == 1 and c[0].get("type") == "text":
                    m["content"] = c[0]["text"]
        last = out[-1]
        if isinstance(last["content"], str):
            last["content"] = [{"type": "text", "text": last["content"]}]
        if last["content"]:
            last["content"][-1]["cache_control"] = {"type": "ephemeral"}
        return out

    def _send(self, body: dict[str, Any], label: str, agent_id: str | None = None) -> Request:
        self._index += 1
        self._prev_req = f"req_{hashlib.sha256(f'{self.spec.seed}{self._index}'.encode()).hexdigest()[:24]}"
        if self.spec.first_party:
            body["diagnostics"] = {"previous_message_id": f"msg_{self._prev_req[4:]}"}
        return Request(body=body, headers=self.headers(agent_id), label=label)

    def _main_body(
        self, messages: list[dict[str, Any]], system: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "model": "claude-opus-5-5",
            "messages": self.newest_marked(messages),
            "system": system,
            "tools": tools,
            "metadata": self.metadata(),
            "max_tokens": 128000,
            "thinking": {"type": "adaptive", "display": "updates" if self.spec.interactive else "omitted"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "medium"},
            "stream": True,
        }

    def first_user(self, prompt: str) -> dict[str, Any]:
        context = (
            f"<system-reminder>\nAs you answer the user's questions, you can use the following context:\n"
            f"# gitStatus\n{text_of_size(self.rng, 400)}\n</system-reminder>"
        )
        attribution = (
            f"<system-reminder>\nAttribution for git commits:\n{text_of_size(self.rng, 500)}\n</system-reminder>\n"
        )
        return {
            "role": "user",
            "content": [
                {"type": "text", "text": context},
                {"type": "text", "text": attribution},
                {"type": "text", "text": prompt},
            ],
        }

    def system_message(self, text: str) -> dict[str, Any]:
        return {"role": "system", "content": [{"type": "text", "text": text}], "output_config": {"effort": "medium"}}

    # -- the main thread ------------------------------------------------------------------------

    def start(self, prompt: str) -> list[dict[str, Any]]:
        """The opening messages of a main conversation (without any answer yet)."""
        self._main_suffix = self.suffix(prompt)
        return [self.first_user(prompt), self.system_message(self.environment + f"\nToday's date is {self.spec.date}.")]

    def main(self, messages: list[dict[str, Any]], label: str, *, first: bool = False) -> Request:
        body = self._main_body(messages, self.system(self._main_suffix, self.instructions), self.tools())
        if first and self.spec.first_party:
            body["safeguards"] = {"mode": "standard"}
        return self._send(body, label)

    @staticmethod
    def tool_use(tool_id: str, name: str, args: dict[str, Any], text: str | None = None) -> dict[str, Any]:
        content = ([{"type": "text", "text": text}] if text else []) + [
            {"type": "tool_use", "id": tool_id, "name": name, "input": args}
        ]
        return {"role": "assistant", "content": content}

    @staticmethod
    def tool_result(tool_id: str, content: Any, *extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": content}, *extra],
        }

    def tool_search(self, tool_id: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """ToolSearch loading `name`: the call, and the result that from now on adds it to `tools`."""
        self.loaded.append(name)
        call = self.tool_use(tool_id, "ToolSearch", {"query": f"select:{name}"})
        result = self.tool_result(
            tool_id, [{"type": "tool_reference", "tool_name": name}], {"type": "text", "text": "Tool loaded."}
        )
        return call, result

    def task_notification(self, agent_id: str, tool_id: str, result: str) -> dict[str, Any]:
        note = (
            "<system-reminder>\n[SYSTEM NOTIFICATION - NOT USER INPUT]\nThis is an automated background-task event.\n"
            f"<task-notification>\n<task-id>{agent_id}</task-id>\n<tool-use-id>{tool_id}</tool-use-id>\n"
            f"<status>completed</status>\n<result>{result}</result>\n</task-notification>\n</system-reminder>"
        )
        used = "<system-reminder>\n<tools-used-before-summary>Read</tools-used-before-summary>\n</system-reminder>"
        return {"role": "user", "content": [{"type": "text", "text": used}, {"type": "text", "text": note}]}

    # -- sub-agents, classifier, compaction ----------------------------------------------------

    def subagent(self, prompt: str, turns: int = 2) -> list[Request]:
        """A background sub-agent: its own system prompt, 8 tools, a deferred-tools system message."""
        agent_id = hashlib.sha256(f"agent{self.spec.seed}{prompt}".encode()).hexdigest()[:17]
        instructions = "You are an agent for Claude Code. " + text_of_size(self.rng, 3000)
        tools = self._tools(SUBAGENT_TOOLS, 16_000) if not hasattr(self, "_sub_tools") else self._sub_tools
        self._sub_tools = tools
        suffix = self.suffix(prompt)
        msgs = [
            self.first_user(prompt),
            self.system_message(
                "The following deferred tools are now available via ToolSearch. " + text_of_size(self.rng, 7000)
            ),
        ]
        out = []
        for turn in range(turns):
            body = self._main_body(msgs, self.system(suffix, instructions, subagent=True), tools)
            out.append(self._send(body, f"subagent {turn + 1}", agent_id=agent_id))
            tid = f"toolu_sub{self.spec.seed}{turn:04d}"
            msgs = msgs + [
                self.tool_use(tid, "Read", {"file_path": f"notes{turn}.txt"}),
                self.tool_result(tid, text_of_size(self.rng, 300)),
            ]
        return out

    def classifier(self, transcript: list[dict[str, Any]], stage: int, label: str = "classifier") -> Request:
        """An auto-mode permission check: not streamed, no tools, the transcript as JSON lines."""
        lines = [{"type": "text", "text": "<transcript>\n"}]
        lines += [
            {
                "type": "text",
                "text": json.dumps(e, separators=(",", ":")) + "\n",
                "cache_control": {"type": "ephemeral"},
            }
            for e in transcript
        ]
        lines += [
            {"type": "text", "text": "</transcript>\n"},
            {"type": "text", "text": f"\nStage {stage}: classify the last action. " + text_of_size(self.rng, 500)},
        ]
        body: dict[str, Any] = {
            "model": "claude-opus-5-5",
            "max_tokens": 64 if stage == 1 else 8192,
            "system": [
                {"type": "text", "text": self.billing(self.suffix("classifier"))},
                {"type": "text", "text": self.classifier_prompt, "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [{"role": "user", "content": lines}],
            "thinking": {"type": "disabled"},
            "metadata": self.metadata(),
        }
        if stage == 1:
            body["stop_sequences"] = ["</block>"]
        return self._send(body, label)

    def compaction(self, messages: list[dict[str, Any]]) -> Request:
        """`/compact`'s summary request: the main history with the summary prompt appended."""
        msgs = copy.deepcopy(messages)
        last = msgs[-1]
        if isinstance(last["content"], str):
            last["content"] = [{"type": "text", "text": last["content"]}]
        last["content"].append({"type": "text", "text": COMPACT_PROMPT + "\n\n" + text_of_size(self.rng, 2000)})
        return self.main(msgs, "compact")

    def after_compaction(self, summary: str, prompt: str) -> list[dict[str, Any]]:
        """The conversation that follows /compact: summary, an empty system message, two user turns."""
        return [
            {"role": "user", "content": f"{CONTINUED}\n\nSummary:\n{summary}"},
            {"role": "system", "content": [], "output_config": {"effort": "medium"}},
            {"role": "assistant", "content": [{"type": "text", "text": "Summary noted."}]},
            {"role": "user", "content": "<local-command-caveat>/compact ran here.</local-command-caveat>"},
            {"role": "user", "content": prompt},
        ]
