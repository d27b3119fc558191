"""Byte-faithful edits of JSON text: locate top-level members and drop array items.

The proxy must forward exactly what the client sent minus the dropped blocks: re-serialising with
`json.dumps` would change key order, unicode escapes, number spelling and whitespace, and any such
change is itself a cache-busting prefix change for servers that hash raw text. So we find spans
with the stdlib decoder and splice the original text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class JSONEditError(ValueError):
    """The text is not the JSON shape an edit expects; the message says where."""


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]


def _value_end(text: str, pos: int) -> int:
    try:
        _, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise JSONEditError(f"invalid JSON value at offset {pos}: {e.msg}") from None
    except RecursionError:
        raise JSONEditError(f"JSON value at offset {pos} nests too deeply to decode") from None
    except ValueError as e:  # e.g. an integer over 4,300 digits
        raise JSONEditError(f"JSON value at offset {pos}: {e}") from None
    return end


def top_level_members(text: str) -> dict[str, Span]:
    """Span of each top-level member's value. Duplicate keys: the last wins, as in json.loads."""
    pos = _skip_ws(text, 0)
    if not text.startswith("{", pos):
        raise JSONEditError("top-level JSON value is not an object")
    members: dict[str, Span] = {}
    pos = _skip_ws(text, pos + 1)
    if text.startswith("}", pos):
        if _skip_ws(text, pos + 1) != len(text):
            raise JSONEditError(f"extra data after the top-level object at offset {pos + 1}")
        return members
    while True:
        if not text.startswith('"', pos):
            raise JSONEditError(f"expected a member name at offset {pos}")
        try:
            key, pos = json.decoder.scanstring(text, pos + 1)
        except json.JSONDecodeError as e:
            raise JSONEditError(f"invalid member name at offset {pos}: {e.msg}") from None
        pos = _skip_ws(text, pos)
        if not text.startswith(":", pos):
            raise JSONEditError(f"expected ':' after member {key!r} at offset {pos}")
        start = _skip_ws(text, pos + 1)
        end = _value_end(text, start)
        members[key] = Span(start, end)
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("}", pos):
            if _skip_ws(text, pos + 1) != len(text):
                raise JSONEditError(f"extra data after the top-level object at offset {pos + 1}")
            return members
        else:
            raise JSONEditError(f"expected ',' or '}}' after member {key!r} at offset {pos}")


def array_items(text: str, span: Span) -> list[Span]:
    """Spans of the items of the array whose text is text[span.start:span.end]."""
    if not text.startswith("[", span.start):
        raise JSONEditError(f"value at offset {span.start} is not an array")
    items: list[Span] = []
    pos = _skip_ws(text, span.start + 1)
    if text.startswith("]", pos):
        return items
    while True:
        end = _value_end(text, pos)
        items.append(Span(pos, end))
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            return items
        else:
            raise JSONEditError(f"expected ',' or ']' at offset {pos}")


def drop_array_items(text: str, span: Span, drop: set[int]) -> str:
    """The array text without the items whose indices are in `drop`.

    Kept items keep their own text and the separator that followed them, so dropping nothing
    returns the array unchanged and the output is a pure function of the input.
    """
    items = array_items(text, span)
    kept = [i for i in range(len(items)) if i not in drop]
    if len(kept) == len(items):
        return text[span.start : span.end]
    if not kept:
        return "[]"
    out = [text[span.start : items[0].start]]
    for n, i in enumerate(kept):
        out.append(text[items[i].start : items[i].end])
        if n + 1 < len(kept):
            out.append(text[items[i].end : items[i + 1].start])
    out.append(text[items[-1].end : span.end])
    return "".join(out)


def replace_span(text: str, span: Span, new: str) -> str:
    return text[: span.start] + new + text[span.end :]
