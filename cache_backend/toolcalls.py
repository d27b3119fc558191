"""Find tool calls in streamed model text and turn them into structured calls; everything else is text.

Why streaming: text before a call must reach the client as it is generated, and the call must
become a tool_use block as soon as its closing markup arrives. Markup comes from the
tokenizer's mlx-lm tool parser when it declares one, else Hermes-style
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. Markup that does not parse
comes back as plain text, unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cache_backend import hermes

log = logging.getLogger("cache_backend.toolcalls")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class TextPiece:
    text: str


Piece = TextPiece | ToolCall


@dataclass(frozen=True)
class ToolCallSyntax:
    """Start and end markers and a parser for the text between them (raises ValueError if bad)."""

    start: str
    end: str
    parse: Callable[[str], list[ToolCall]]
    kind: str = "hermes"  # "hermes", or the mlx-lm tool parser module name

    @property
    def json_body(self) -> bool:
        """Whether the body between the markers is `{"name": ..., "arguments": ...}` JSON."""
        return self.kind in ("hermes", "json_tools")


def _normalize(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        raise ValueError(f"tool call is a {type(obj).__name__}, not an object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("tool call has no name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"tool call arguments are a {type(args).__name__}, not an object")
    return ToolCall(name=name, arguments=args)


def parse_hermes(inner: str) -> list[ToolCall]:
    """`{"name": ..., "arguments": {...}}` (one object) between the markers."""
    return [_normalize(json.loads(inner.strip()))]


HERMES = ToolCallSyntax(hermes.START, hermes.END, parse_hermes)


def syntax_for(tokenizer: Any, tools: list[dict[str, Any]] | None) -> ToolCallSyntax:
    """The tokenizer's own mlx-lm tool parser if it declares one, else Hermes."""
    parser = getattr(tokenizer, "tool_parser", None)
    start = getattr(tokenizer, "tool_call_start", None)
    end = getattr(tokenizer, "tool_call_end", None)
    if parser is None or not start or not end:
        return HERMES

    def parse(inner: str) -> list[ToolCall]:
        try:
            out = parser(inner, tools)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(str(e)) from None
        return [_normalize(o) for o in (out if isinstance(out, list) else [out])]

    kind = (getattr(tokenizer, "init_kwargs", None) or {}).get("tool_parser_type") or "mlx-lm"
    return ToolCallSyntax(start, end, parse, kind=str(kind))


def _partial_suffix(buf: str, marker: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


class StreamingToolParser:
    """Feed text pieces, get back text and tool calls in order.

    Text is held back only while it could still be the start of a call marker, plus trailing
    whitespace (dropped if a call follows, so the text block renders back exactly as the model
    wrote it around its markup).
    """

    def __init__(self, syntax: ToolCallSyntax | None) -> None:
        self.syntax = syntax
        self._buf = ""
        self._in_call = False
        self._after_call = False
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        if self.syntax is None:
            return [TextPiece(text)] if text else []
        self._buf += text
        out: list[Piece] = []
        while True:
            if self._in_call:
                j = self._buf.find(self.syntax.end)
                if j < 0:
                    return out
                inner, self._buf = self._buf[:j], self._buf[j + len(self.syntax.end) :]
                self._in_call = False
                out.extend(self._call(inner, closed=True))
                continue
            i = self._buf.find(self.syntax.start)
            if i >= 0:
                before = self._buf[:i].rstrip()
                if self._after_call:
                    before = before.lstrip()
                if before:
                    out.append(TextPiece(before))
                self._buf = self._buf[i + len(self.syntax.start) :]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buf, self.syntax.start)
            upto = len(self._buf) - keep
            while upto > 0 and self._buf[upto - 1].isspace():
                upto -= 1
            emit = self._buf[:upto]
            if self._after_call:
                emit = emit.lstrip()
            if emit:
                out.append(TextPiece(emit))
                self._after_call = False
            self._buf = self._buf[upto:]
            return out

    def _call(self, inner: str, *, closed: bool) -> list[Piece]:
        assert self.syntax is not None
        try:
            calls = self.syntax.parse(inner)
        except (ValueError, json.JSONDecodeError) as e:
            log.info("malformed tool call markup returned as text: %s", e)
            raw = self.syntax.start + inner + (self.syntax.end if closed else "")
            self._after_call = False
            return [TextPiece(raw)]
        self.calls += len(calls)
        self._after_call = True
        return list(calls)

    def finish(self) -> list[Piece]:
        """Flush what is held back; an unterminated call is accepted if its body parses."""
        if self.syntax is None:
            return []
        buf, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            return self._call(buf, closed=False)
        if self._after_call:
            buf = buf.lstrip()
        return [TextPiece(buf)] if buf else []
