"""A Messages request as chat-template messages, mapped in one fixed way (see render.py for why).

Thinking is dropped, images become a placeholder, string content equals one-text-block content,
mid-conversation system messages stay where they stand (or become user turns for a template
that refuses them), tool calls and results use the template's own form when it has one and
Hermes text otherwise, and a loaded deferred tool is defined where its `tool_reference` stands.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cache_backend.errors import InvalidRequest
from cache_backend.hermes import tool_call_markup, tools_section
from cache_backend.request import (
    ImageBlock,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolReference,
    ToolResultBlock,
    ToolUseBlock,
)

log = logging.getLogger("cache_backend.render")

IMAGE_PLACEHOLDER = "[{kind} omitted: this server cannot read {kind}s]"
ERROR_PREFIX = "Error: "
BLOCK_JOIN = "\n\n"


def tool_dict(t: Tool) -> dict[str, Any]:
    """An Anthropic tool as the OpenAI/Hugging Face function dict chat templates expect."""
    fn: dict[str, Any] = {"name": t.name}
    if t.description is not None:
        fn["description"] = t.description
    fn["parameters"] = t.input_schema
    return {"type": "function", "function": fn}


def tool_reference_text(tool: Tool) -> str:
    """A loaded deferred tool's definition, where its `tool_reference` stands.

    Anthropic expands a `tool_reference` into the tool's definition in place, so the up-front
    list never changes when a tool is loaded; rendering it here, inside the tool result, keeps
    every token before it (the whole cached conversation) where it was. The form is the one
    Claude Code's ToolSearch description promises the model: one
    `<function>{"description", "name", "parameters"}</function>` line inside `<functions>`.
    """
    fn = {"description": tool.description or "", "name": tool.name, "parameters": tool.input_schema}
    return "<functions>\n<function>" + json.dumps(fn, ensure_ascii=False) + "</function>\n</functions>"


def json_instruction(schema: dict[str, Any]) -> str:
    return "Respond with only a JSON value that conforms to this JSON Schema, and nothing else:\n" + json.dumps(
        schema, ensure_ascii=False
    )


@dataclass
class Chat:
    """A request as chat-template messages (+ tools for a template that renders them, and the
    text of a final assistant message, which continues as a prefill)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    prefill: str | None
    placeholders: int


@dataclass(frozen=True)
class TemplateCaps:
    """What the chat template renders natively: tool definitions, tool calls, a `tool` role, and
    system messages after the first turn."""

    native_tools: bool
    native_tool_calls: bool
    native_tool_role: bool
    mid_system: bool


def probe_template(try_apply: Callable[..., str | None]) -> TemplateCaps:
    """What a chat template renders natively, found by rendering marked probe messages."""
    tool = {
        "type": "function",
        "function": {
            "name": "probe_tool_zq",
            "description": "d",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    out = try_apply([{"role": "user", "content": "hi"}], [tool])
    native_tools = bool(out and "probe_tool_zq" in out)
    call = {"id": "c1", "type": "function", "function": {"name": "probe_call_zq", "arguments": {"arg_zq": 1}}}
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "probe_result_zq", "tool_call_id": "c1", "name": "probe_call_zq"},
    ]
    out = try_apply(msgs, [tool] if native_tools else None)
    # Without tool definitions in the template, tool turns are all rendered as Hermes text.
    native_calls = native_tools and bool(out and "probe_call_zq" in out and "arg_zq" in out)
    native_tool_role = native_tools and bool(out and "probe_result_zq" in out)
    out = try_apply(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": "probe_sys_zq"},
            {"role": "user", "content": "c"},
        ]
    )
    mid_system = bool(out and "probe_sys_zq" in out)
    return TemplateCaps(native_tools, native_calls, native_tool_role, mid_system)


class ChatMapper:
    """Requests -> chat-template messages for a template with the given capabilities."""

    def __init__(self, caps: TemplateCaps) -> None:
        self.caps = caps

    def chat(self, req: MessagesRequest) -> Chat:
        placeholders = 0
        # Deferred tools (`defer_loading`) are rendered where a tool_reference loads them.
        tools = [tool_dict(t) for t in req.tools if not t.deferred] or None
        by_name = {t.name: t for t in req.tools}
        messages: list[dict[str, Any]] = []
        system_text = "\n\n".join(b.text for b in req.system)
        if tools and not self.caps.native_tools:
            system_text = system_text + "\n\n" + tools_section(tools) if system_text else tools_section(tools)
        if system_text:
            messages.append({"role": "system", "content": system_text})
        names: dict[str, str] = {}
        prefill = None
        last = len(req.messages) - 1
        for i, msg in enumerate(req.messages):
            if msg.role == "system":
                text = BLOCK_JOIN.join(b.text for b in msg.content if isinstance(b, TextBlock))
                role = "system" if (self.caps.mid_system or not messages) else "user"
                messages.append({"role": role, "content": text})
            elif msg.role == "assistant":
                texts = [b.text for b in msg.content if isinstance(b, TextBlock)]
                calls = [b for b in msg.content if isinstance(b, ToolUseBlock)]
                for b in msg.content:
                    if isinstance(b, ImageBlock):
                        placeholders += 1
                        texts.append(IMAGE_PLACEHOLDER.format(kind=b.kind))
                text = BLOCK_JOIN.join(texts)
                if i == last and i > 0:
                    if calls:
                        raise InvalidRequest(
                            f"messages[{i}]: the final assistant message contains tool_use blocks; "
                            "a user message with their tool_result blocks must follow"
                        )
                    prefill = text
                    continue
                for c in calls:
                    names[c.id] = c.name
                messages.append(self._assistant(text, calls))
            else:
                pending: list[str] = []
                for b in msg.content:
                    if isinstance(b, TextBlock):
                        pending.append(b.text)
                    elif isinstance(b, ToolReference):
                        pending.append(tool_reference_text(by_name[b.tool_name]))
                    elif isinstance(b, ImageBlock):
                        placeholders += 1
                        pending.append(IMAGE_PLACEHOLDER.format(kind=b.kind))
                    elif isinstance(b, ToolResultBlock):
                        if pending:
                            messages.append({"role": "user", "content": BLOCK_JOIN.join(pending)})
                            pending = []
                        parts = []
                        for c in b.content:
                            if isinstance(c, TextBlock):
                                parts.append(c.text)
                            elif isinstance(c, ToolReference):
                                parts.append(tool_reference_text(by_name[c.tool_name]))
                            else:
                                placeholders += 1
                                parts.append(IMAGE_PLACEHOLDER.format(kind=c.kind))
                        text = "\n".join(parts)
                        if b.is_error:
                            text = ERROR_PREFIX + text
                        messages.append(self._tool_result(text, b.tool_use_id, names.get(b.tool_use_id, "")))
                    elif isinstance(b, ThinkingBlock):
                        pass
                if pending or not msg.content:
                    messages.append({"role": "user", "content": BLOCK_JOIN.join(pending)})
        if req.json_schema is not None:
            role = "system" if self.caps.mid_system else "user"
            messages.append({"role": role, "content": json_instruction(req.json_schema)})
        if placeholders:
            log.info("replaced %d image/document block(s) with a placeholder", placeholders)
        return Chat(messages, tools if self.caps.native_tools else None, prefill, placeholders)

    def _assistant(self, text: str, calls: list[ToolUseBlock]) -> dict[str, Any]:
        if not calls:
            return {"role": "assistant", "content": text}
        if not self.caps.native_tool_calls:
            markup = "\n".join(tool_call_markup(c.name, c.input) for c in calls)
            return {"role": "assistant", "content": f"{text}\n{markup}" if text else markup}
        tool_calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.input}} for c in calls
        ]
        return {"role": "assistant", "content": text, "tool_calls": tool_calls}

    def _tool_result(self, text: str, tool_use_id: str, name: str) -> dict[str, Any]:
        if self.caps.native_tool_role:
            return {"role": "tool", "content": text, "tool_call_id": tool_use_id, "name": name}
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
