"""Anthropic Messages streaming events: builders and the `event:`/`data:` wire format.

Why separate: the event order and field names are the protocol Claude Code parses; keeping
them in one small module makes them easy to check against Anthropic's documentation.
Order: message_start, (ping | content_block_start, content_block_delta*, content_block_stop)*,
message_delta, message_stop; `error` may replace the tail if generation fails.
"""

from __future__ import annotations

import json
from typing import Any

from cache_backend.errors import error_body


def usage(input_tokens: int, output_tokens: int, cache_read: int = 0, cache_creation: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
    }


def message_shell(
    msg_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str | None,
    stop_sequence: str | None,
    use: dict[str, Any],
) -> dict[str, Any]:
    """A Message object (the non-streamed response, and message_start's payload)."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": use,
    }


def encode(event: dict[str, Any]) -> bytes:
    """One SSE event; the event name is the payload's `type`."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def message_start(msg_id: str, model: str, use: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message_start", "message": message_shell(msg_id, model, [], None, None, use)}


def message_delta(stop_reason: str, stop_sequence: str | None, use: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
        "usage": use,
    }


def message_stop() -> dict[str, Any]:
    return {"type": "message_stop"}


def ping() -> dict[str, Any]:
    return {"type": "ping"}


def error(error_type: str, message: str) -> dict[str, Any]:
    return error_body(error_type, message)


def comment(text: str) -> bytes:
    """An SSE comment line: keeps the connection busy before message_start; clients ignore it."""
    return f": {text}\n\n".encode()
