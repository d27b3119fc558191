"""The rendering model: the text a chat template prints for each part of a request.

Offsets and "did the rendered text change" are measured in this model's characters: tool
definitions as JSON without `cache_control`, system and text blocks as their text, `tool_use` as
name and input JSON, `tool_result` as its text, thinking blocks as their thinking text. It is no
one server's template; it only has to change exactly when a real template's output changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def without_cache_control(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [without_cache_control(v) for v in value]
    return value


def render_tool(tool: Any) -> str:
    if isinstance(tool, dict) and "cache_control" in tool:
        tool = {k: v for k, v in tool.items() if k != "cache_control"}
    return dumps(tool)


def render_block(block: Any) -> str:
    """The text a chat template would print for one content or system block."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return dumps(block)
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return text if isinstance(text, str) else dumps(text)
    if kind == "tool_use":
        return f"{block.get('name')}({dumps(block.get('input'))})"
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            content = "".join(render_block(b) for b in content)
        elif not isinstance(content, str):
            content = "" if content is None else dumps(content)
        return ("[error] " if block.get("is_error") else "") + content
    if kind == "thinking":
        return str(block.get("thinking", ""))
    if kind == "redacted_thinking":
        return str(block.get("data", ""))
    return dumps(without_cache_control(block))


def message_blocks(message: Any) -> list[Any]:
    """A message's content as a block list (a plain string is one text block)."""
    if not isinstance(message, dict):
        return [message]
    content = message.get("content")
    if isinstance(content, list):
        return content
    return [content if isinstance(content, str) else dumps(content)]


def render_message(message: Any) -> tuple[str, tuple[str, ...]]:
    role = message.get("role") if isinstance(message, dict) else None
    return (str(role), tuple(render_block(b) for b in message_blocks(message)))


def message_len(message: Any) -> int:
    return sum(len(t) for t in render_message(message)[1])


def system_blocks(system: Any) -> list[Any]:
    if system is None:
        return []
    if isinstance(system, list):
        return system
    return [system]


def system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    return "\n".join(render_block(b) for b in system_blocks(system))


def short_hash(text: str | bytes) -> str:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:8]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else ([] if value is None else [value])


def upfront_tools(body: Mapping[str, Any]) -> list[Any]:
    """The tools a server puts before the messages: deferred ones (`defer_loading: true`) are
    rendered where a tool_reference loads them, so adding one to `tools` moves no prefix."""
    return [t for t in as_list(body.get("tools")) if not (isinstance(t, dict) and t.get("defer_loading") is True)]


def tool_name(tool: Any) -> str:
    return str(tool.get("name")) if isinstance(tool, dict) else dumps(tool)[:40]


def describe_message(message: Any) -> str:
    role = message.get("role") if isinstance(message, dict) else "?"
    kinds = [str(b.get("type", "?")) if isinstance(b, dict) else "text" for b in message_blocks(message)]
    return f"{role}: {', '.join(kinds)}"
