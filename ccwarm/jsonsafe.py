"""JSON decoding that fails one way, with a message, for every hostile body.

`json.loads` fails in three ways that are easy to miss: `ValueError` for malformed text or an
integer longer than 4,300 digits, `UnicodeDecodeError` for bytes that are not UTF-8, and
`RecursionError` for ~1,000 nested brackets. Anything that walks the decoded value recursively
afterwards (deepdiff, validation, a chat template) fails on far fewer levels, so a decoded value
is also held to :data:`MAX_DEPTH`. Claude Code's bodies nest about 15 levels (tool schemas).
Used by the proxy addons and by the server alike.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 128


class JSONBodyError(ValueError):
    """The body cannot be decoded, or nests deeper than MAX_DEPTH; the message says which."""


def nesting_depth(value: Any, stop_after: int = MAX_DEPTH) -> int:
    """Levels of arrays and objects in `value` (a scalar is 0), counted without recursion;
    counting stops once it passes `stop_after`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > stop_after:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


def loads(raw: bytes | str, what: str = "request body") -> Any:
    """`json.loads(raw)`, raising only JSONBodyError ("<what> is not valid JSON: ...")."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JSONBodyError(f"{what} nests arrays or objects too deeply to decode (limit {MAX_DEPTH} levels)") from None
    except UnicodeDecodeError as e:
        raise JSONBodyError(f"{what} is not UTF-8 (invalid byte at offset {e.start})") from None
    except ValueError as e:
        raise JSONBodyError(f"{what} is not valid JSON: {e}") from None
    if nesting_depth(value) > MAX_DEPTH:
        raise JSONBodyError(f"{what} nests arrays or objects more than {MAX_DEPTH} levels deep")
    return value
