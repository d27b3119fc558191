"""A /v1/messages request as typed, immutable objects: what validate.py produces and the renderer
and the HTTP layer read. Only the fields the server acts on; unknown keys never get this far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant", "system"]


@dataclass(frozen=True)
class TextBlock:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImageBlock:
    """An image or document block; the server cannot see it and renders a placeholder."""

    kind: str  # "image" or "document"
    type: Literal["image"] = "image"


@dataclass(frozen=True)
class ToolUseBlock:
    id: str
    name: str
    input: dict[str, Any]
    type: Literal["tool_use"] = "tool_use"


@dataclass(frozen=True)
class ToolReference:
    """`{"type": "tool_reference", "tool_name": ...}`: loads a deferred tool at this point.

    Claude Code's ToolSearch answers with these; the renderer puts the tool's definition here.
    """

    tool_name: str
    type: Literal["tool_reference"] = "tool_reference"


ResultPart = TextBlock | ImageBlock | ToolReference


@dataclass(frozen=True)
class ToolResultBlock:
    tool_use_id: str
    content: tuple[ResultPart, ...]
    is_error: bool = False
    type: Literal["tool_result"] = "tool_result"


@dataclass(frozen=True)
class ThinkingBlock:
    """Thinking (and redacted thinking) blocks: accepted, always dropped from the prompt."""

    type: Literal["thinking"] = "thinking"


Block = TextBlock | ImageBlock | ToolReference | ToolUseBlock | ToolResultBlock | ThinkingBlock


@dataclass(frozen=True)
class Message:
    role: Role
    content: tuple[Block, ...]


@dataclass(frozen=True)
class Tool:
    """`deferred` (`defer_loading: true`): not in the up-front tool list; a ToolReference loads it."""

    name: str
    description: str | None
    input_schema: dict[str, Any]
    deferred: bool = False


@dataclass(frozen=True)
class ToolChoice:
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    messages: tuple[Message, ...]
    system: tuple[TextBlock, ...] = ()
    max_tokens: int | None = None
    stream: bool = False
    stop_sequences: tuple[str, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    json_schema: dict[str, Any] | None = None  # output_config.format (type json_schema)
