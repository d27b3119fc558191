"""Check a /v1/messages body and turn it into typed objects; every error names its JSON path.

Why by hand rather than with pydantic: the error text is the API. Clients (and people reading
logs) need `messages[2].content[0].type: unknown block type 'foo'`, and the accepted shapes are
deliberately lenient (unknown top-level keys are ignored: Claude Code adds new ones often).
"""

from __future__ import annotations

import re
from typing import Any

from cache_backend.errors import InvalidRequest
from cache_backend.request import (
    Block,
    ImageBlock,
    Message,
    MessagesRequest,
    ResultPart,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolReference,
    ToolResultBlock,
    ToolUseBlock,
)
from ccwarm import jsonsafe

MESSAGE_ROLES = ("user", "assistant", "system")
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "an object"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _fail(path: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: {what}")


def _expect(value: Any, typ: type | tuple[type, ...], path: str, wanted: str | None = None) -> Any:
    ok = isinstance(value, typ) and not (typ in (int, float, (int, float)) and isinstance(value, bool))
    if not ok:
        if wanted is None:
            wanted = _TYPE_NAMES.get(typ, str(typ)) if isinstance(typ, type) else "a number"
        raise _fail(path, f"expected {wanted}, got {_type_name(value)}")
    return value


def _required(obj: dict[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise _fail(f"{path}.{key}" if path else key, "field required")
    return obj[key]


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode the body; malformed JSON or a non-object is a 400 that says so."""
    if not raw.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        body = jsonsafe.loads(raw)
    except jsonsafe.JSONBodyError as e:
        raise InvalidRequest(str(e)) from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {_type_name(body)}")
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then walk the body to name the field
        where = _lone_surrogate_path(body)
        if where is not None:
            raise _fail(
                where, "contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text"
            )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate_path(value: Any) -> str | None:
    """Path of the first string (value or key) holding a lone surrogate, walked without recursion."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "request body"
        elif isinstance(item, dict):
            for k, v in reversed(item.items()):
                child = f"{path}.{k}" if path else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return f"{path or 'request body'}: a key"
                stack.append((v, child))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))
    return None


def _text_block(obj: dict[str, Any], path: str) -> TextBlock:
    return TextBlock(text=_expect(_required(obj, "text", path), str, f"{path}.text"))


def _image_block(obj: dict[str, Any], path: str, kind: str) -> ImageBlock:
    # The server renders a placeholder, so only the shape is checked: new source types pass.
    source = _expect(_required(obj, "source", path), dict, f"{path}.source")
    _expect(_required(source, "type", f"{path}.source"), str, f"{path}.source.type")
    return ImageBlock(kind=kind)


def _tool_reference(obj: dict[str, Any], path: str) -> ToolReference:
    return ToolReference(tool_name=_expect(_required(obj, "tool_name", path), str, f"{path}.tool_name"))


def _tool_result_content(value: Any, path: str) -> tuple[ResultPart, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (TextBlock(value),)
    _expect(value, list, path, "a string or an array of content blocks")
    out: list[ResultPart] = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        _expect(item, dict, p)
        typ = _expect(_required(item, "type", p), str, f"{p}.type")
        if typ == "text":
            out.append(_text_block(item, p))
        elif typ in ("image", "document"):
            out.append(_image_block(item, p, typ))
        elif typ == "tool_reference":
            out.append(_tool_reference(item, p))
        else:
            raise _fail(
                f"{p}.type",
                f"unknown block type {typ!r} in a tool_result (expected 'text', 'image', 'document' or "
                "'tool_reference')",
            )
    return tuple(out)


def _block(obj: Any, path: str, role: str) -> Block:
    _expect(obj, dict, path)
    typ = _expect(_required(obj, "type", path), str, f"{path}.type")
    if typ == "text":
        return _text_block(obj, path)
    if typ in ("image", "document"):
        return _image_block(obj, path, typ)
    if typ in ("thinking", "redacted_thinking"):
        return ThinkingBlock()
    if typ == "tool_reference":
        if role != "user":
            raise _fail(f"{path}.type", f"tool_reference blocks are only allowed in user messages, not {role}")
        return _tool_reference(obj, path)
    if typ == "tool_use":
        if role != "assistant":
            raise _fail(f"{path}.type", f"tool_use blocks are only allowed in assistant messages, not {role}")
        tid = _expect(_required(obj, "id", path), str, f"{path}.id")
        name = _expect(_required(obj, "name", path), str, f"{path}.name")
        args = _required(obj, "input", path)
        _expect(args, dict, f"{path}.input")
        return ToolUseBlock(id=tid, name=name, input=args)
    if typ == "tool_result":
        if role != "user":
            raise _fail(f"{path}.type", f"tool_result blocks are only allowed in user messages, not {role}")
        tid = _expect(_required(obj, "tool_use_id", path), str, f"{path}.tool_use_id")
        content = _tool_result_content(obj.get("content"), f"{path}.content")
        is_error = obj.get("is_error", False)
        if is_error is None:
            is_error = False
        _expect(is_error, bool, f"{path}.is_error")
        return ToolResultBlock(tool_use_id=tid, content=content, is_error=is_error)
    raise _fail(f"{path}.type", f"unknown block type {typ!r}")


def _content(value: Any, path: str, role: str) -> tuple[Block, ...]:
    if isinstance(value, str):
        return (TextBlock(value),)
    _expect(value, list, path, "a string or an array of content blocks")
    return tuple(_block(b, f"{path}[{i}]", role) for i, b in enumerate(value))


def _message(obj: Any, path: str) -> Message:
    _expect(obj, dict, path)
    role = _expect(_required(obj, "role", path), str, f"{path}.role")
    if role not in MESSAGE_ROLES:
        raise _fail(f"{path}.role", f"unknown role {role!r} (expected 'user', 'assistant' or 'system')")
    content = _content(_required(obj, "content", path), f"{path}.content", role)
    if role == "system" and any(not isinstance(b, TextBlock) for b in content):
        raise _fail(f"{path}.content", "a system message may only contain text blocks")
    return Message(role=role, content=content)  # type: ignore[arg-type]


def _system(value: Any) -> tuple[TextBlock, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (TextBlock(value),) if value else ()
    _expect(value, list, "system", "a string or an array of text blocks")
    out = []
    for i, b in enumerate(value):
        p = f"system[{i}]"
        _expect(b, dict, p)
        typ = _expect(_required(b, "type", p), str, f"{p}.type")
        if typ != "text":
            raise _fail(f"{p}.type", f"unknown block type {typ!r} in system (expected 'text')")
        out.append(_text_block(b, p))
    return tuple(out)


def _tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    _expect(value, list, "tools")
    out = []
    for i, t in enumerate(value):
        p = f"tools[{i}]"
        _expect(t, dict, p)
        name = _expect(_required(t, "name", p), str, f"{p}.name")
        desc = t.get("description")
        if desc is not None:
            _expect(desc, str, f"{p}.description")
        schema = t.get("input_schema")
        if schema is None:
            # Server tools (`type: web_search_...`) have no schema; custom tools must have one.
            if t.get("type") in (None, "custom"):
                raise _fail(f"{p}.input_schema", "field required")
            schema = {"type": "object", "properties": {}}
        _expect(schema, dict, f"{p}.input_schema")
        deferred = t.get("defer_loading", False)
        if deferred is None:
            deferred = False
        _expect(deferred, bool, f"{p}.defer_loading")
        out.append(Tool(name=name, description=desc, input_schema=schema, deferred=deferred))
    return tuple(out)


def _check_tool_references(messages: tuple[Message, ...], tools: tuple[Tool, ...]) -> None:
    """Every tool_reference must name a tool in `tools`: the renderer puts its definition there."""
    names = {t.name for t in tools}
    for i, msg in enumerate(messages):
        for j, block in enumerate(msg.content):
            path = f"messages[{i}].content[{j}]"
            if isinstance(block, ToolResultBlock):
                refs = [
                    (f"{path}.content[{k}]", p) for k, p in enumerate(block.content) if isinstance(p, ToolReference)
                ]
            else:
                refs = [(path, block)] if isinstance(block, ToolReference) else []
            for where, ref in refs:
                if ref.tool_name not in names:
                    raise _fail(f"{where}.tool_name", f"no tool named {ref.tool_name!r} in tools")


def _check_tool_pairs(messages: tuple[Message, ...]) -> None:
    """As the Anthropic API requires: each tool_result answers a tool_use of the assistant message
    just before it, and each tool_use (except in a final assistant message) is answered in the
    user message just after it. A broken pair would render a conversation the model never saw."""
    for i, msg in enumerate(messages):
        if msg.role != "user":
            continue
        prev = messages[i - 1] if i > 0 else None
        asked = (
            {b.id for b in prev.content if isinstance(b, ToolUseBlock)} if prev and prev.role == "assistant" else set()
        )
        for j, block in enumerate(msg.content):
            if isinstance(block, ToolResultBlock) and block.tool_use_id not in asked:
                raise _fail(
                    f"messages[{i}].content[{j}].tool_use_id",
                    f"no tool_use with id {block.tool_use_id!r} in the previous assistant message",
                )
    for i, msg in enumerate(messages[:-1]):
        if msg.role != "assistant":
            continue
        nxt = messages[i + 1]
        answered = (
            {b.tool_use_id for b in nxt.content if isinstance(b, ToolResultBlock)} if nxt.role == "user" else set()
        )
        for j, block in enumerate(msg.content):
            if isinstance(block, ToolUseBlock) and block.id not in answered:
                raise _fail(
                    f"messages[{i}].content[{j}].id",
                    f"tool_use {block.id!r} has no tool_result in the next user message",
                )


def _tool_choice(value: Any, tools: tuple[Tool, ...]) -> ToolChoice:
    if value is None:
        return ToolChoice()
    _expect(value, dict, "tool_choice")
    typ = _expect(_required(value, "type", "tool_choice"), str, "tool_choice.type")
    if typ not in ("auto", "any", "tool", "none"):
        raise _fail("tool_choice.type", f"unknown tool_choice type {typ!r} (expected 'auto', 'any', 'tool' or 'none')")
    name = None
    if typ == "tool":
        name = _expect(_required(value, "name", "tool_choice"), str, "tool_choice.name")
        if name not in {t.name for t in tools}:
            raise _fail("tool_choice.name", f"no tool named {name!r} in tools")
    return ToolChoice(type=typ, name=name)  # type: ignore[arg-type]


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    _expect(value, (int, float), key, "a number")
    if not lo <= value <= hi:
        raise _fail(key, f"must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


def _json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    oc = body.get("output_config")
    fmt = None
    path = "output_config.format"
    if oc is not None:
        _expect(oc, dict, "output_config")
        fmt = oc.get("format")
    if fmt is None and body.get("output_format") is not None:  # older beta spelling
        fmt, path = body["output_format"], "output_format"
    if fmt is None:
        return None
    _expect(fmt, dict, path)
    typ = _expect(_required(fmt, "type", path), str, f"{path}.type")
    if typ != "json_schema":
        raise _fail(f"{path}.type", f"unsupported format type {typ!r} (expected 'json_schema')")
    schema = _required(fmt, "schema", path)
    _expect(schema, dict, f"{path}.schema")
    return schema


def parse_messages_request(body: dict[str, Any], *, count_tokens: bool = False) -> MessagesRequest:
    """Validate a parsed body. `count_tokens` bodies need no `max_tokens`.

    Accepted and ignored: metadata, thinking, context_management, output_config.effort,
    service_tier, and any unknown top-level key.
    """
    model = _expect(_required(body, "model", ""), str, "model")
    msgs = _expect(_required(body, "messages", ""), list, "messages")
    if not msgs:
        raise _fail("messages", "at least one message is required")
    messages = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(msgs))
    max_tokens = body.get("max_tokens")
    if not count_tokens:
        _required(body, "max_tokens", "")
    if max_tokens is not None:
        _expect(max_tokens, int, "max_tokens")
        if max_tokens < 1:
            raise _fail("max_tokens", f"must be at least 1, got {max_tokens}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    _expect(stream, bool, "stream")
    stops = body.get("stop_sequences")
    if stops is None:
        stops = []
    _expect(stops, list, "stop_sequences")
    for i, s in enumerate(stops):
        _expect(s, str, f"stop_sequences[{i}]")
        if not s:
            raise _fail(f"stop_sequences[{i}]", "must not be empty")
    top_k = body.get("top_k")
    if top_k is not None:
        _expect(top_k, int, "top_k")
        if top_k < 0:
            raise _fail("top_k", f"must be non-negative, got {top_k}")
    tools = _tools(body.get("tools"))
    _check_tool_references(messages, tools)
    _check_tool_pairs(messages)
    return MessagesRequest(
        model=model,
        messages=messages,
        system=_system(body.get("system")),
        max_tokens=max_tokens,
        stream=stream,
        stop_sequences=tuple(stops),
        temperature=_number(body, "temperature", 0.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=top_k,
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools),
        json_schema=_json_schema(body),
    )
