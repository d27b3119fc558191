"""Turn the model's text stream into Anthropic content-block events, deciding when to stop early.

Why one place: stop sequences, tool-call markup and relaxed JSON all look at the same text and
all can end a response; their order is fixed here (stop sequences first, then JSON or tool
calls), and the block events they produce are exactly what the SSE stream and the non-streamed
message are both built from.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cache_backend.structured import JsonValueTracker
from cache_backend.toolcalls import StreamingToolParser, TextPiece, ToolCall, ToolCallSyntax

log = logging.getLogger("cache_backend.output")

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"]
# "context_window": max_tokens was lowered so that prompt + output fit the server's context limit,
# and generation used all of it. Anthropic reports that as `model_context_window_exceeded`, which
# Claude Code handles like `max_tokens` (it resends with the partial answer to continue it).
Cause = Literal["eos", "max_tokens", "context_window", "stop_sequence", "json_complete", "deadline", "cancelled"]

_ALPHABET = string.ascii_letters + string.digits
JSON_DELTA_CHUNK = 48


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class StopSequenceFilter:
    """Releases text that can no longer be the start of a stop sequence; reports a hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._buf = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self._buf += text
        best = None
        for s in self.stops:
            i = self._buf.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            out, self._buf, self.hit = self._buf[: best[0]], "", best[1]
            return out
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._buf)), 0, -1):
                if self._buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
        return out

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


@dataclass
class OutputAssembler:
    """Feed decoded text; emits wire-shaped block events through `emit`.

    `feed` returns True when generation should stop (stop sequence or a complete JSON value).
    """

    emit: Callable[[dict[str, Any]], None]
    stop_sequences: tuple[str, ...] = ()
    tool_syntax: ToolCallSyntax | None = None
    json_mode: bool = False
    _stops: StopSequenceFilter = field(init=False)
    _tools: StreamingToolParser = field(init=False)
    _json: JsonValueTracker | None = field(init=False)
    _index: int = field(default=0, init=False)
    _open_text: bool = field(default=False, init=False)
    cause: Cause | None = field(default=None, init=False)
    blocks: list[dict[str, Any]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._stops = StopSequenceFilter(self.stop_sequences)
        self._tools = StreamingToolParser(None if self.json_mode else self.tool_syntax)
        self._json = JsonValueTracker() if self.json_mode else None

    @property
    def stop_sequence(self) -> str | None:
        return self._stops.hit

    @property
    def json_text(self) -> str | None:
        return self._json.text if self._json is not None else None

    def feed(self, text: str) -> bool:
        if self.cause is not None:
            return True
        released = self._stops.feed(text)
        self._route(released)
        if self._stops.hit is not None:
            self.cause = "stop_sequence"
        elif self._json is not None and self._json.complete:
            self.cause = "json_complete"
        return self.cause is not None

    def _route(self, text: str) -> None:
        if not text:
            return
        if self._json is not None:
            self._text(self._json.feed(text))
            return
        for piece in self._tools.feed(text):
            self._piece(piece)

    def _piece(self, piece: TextPiece | ToolCall) -> None:
        if isinstance(piece, TextPiece):
            self._text(piece.text)
        else:
            self._tool_use(piece)

    def _text(self, text: str) -> None:
        if not text:
            return
        if not self._open_text:
            self.emit(
                {"type": "content_block_start", "index": self._index, "content_block": {"type": "text", "text": ""}}
            )
            self.blocks.append({"type": "text", "text": ""})
            self._open_text = True
        self.blocks[-1]["text"] += text
        self.emit({"type": "content_block_delta", "index": self._index, "delta": {"type": "text_delta", "text": text}})

    def _close_text(self) -> None:
        if self._open_text:
            self.emit({"type": "content_block_stop", "index": self._index})
            self._index += 1
            self._open_text = False

    def _tool_use(self, call: ToolCall) -> None:
        self._close_text()
        block = {"type": "tool_use", "id": new_id("toolu_"), "name": call.name, "input": {}}
        self.emit({"type": "content_block_start", "index": self._index, "content_block": dict(block)})
        payload = json.dumps(call.arguments, ensure_ascii=False)
        for i in range(0, len(payload), JSON_DELTA_CHUNK):
            self.emit(
                {
                    "type": "content_block_delta",
                    "index": self._index,
                    "delta": {"type": "input_json_delta", "partial_json": payload[i : i + JSON_DELTA_CHUNK]},
                }
            )
        self.emit({"type": "content_block_stop", "index": self._index})
        block["input"] = call.arguments
        self.blocks.append(block)
        self._index += 1

    def finish(self, cause: Cause) -> StopReason:
        """Flush held-back text, close the open block, and name the stop reason."""
        if self.cause is None:
            self.cause = cause
            self._route(self._stops.flush())
        if self._json is None:
            for piece in self._tools.finish():
                self._piece(piece)
        self._close_text()
        if self.cause == "stop_sequence":
            return "stop_sequence"
        if self.cause in ("max_tokens", "deadline"):
            return "max_tokens"
        if self.cause == "context_window":
            return "model_context_window_exceeded"
        if self._tools.calls:
            return "tool_use"
        return "end_turn"
