"""Relaxed JSON mode for `output_config.format` (json_schema): prompt, watch, stop, validate.

Why relaxed rather than grammar-constrained: constrained decoding needs a grammar engine per
tokenizer and can stall on big schemas. Claude Code's structured requests (session titles) are
small; the model is prompted with the schema, text before the first `{`/`[` (code fences,
chatter) is dropped, generation stops as soon as one complete JSON value has been produced,
and the result is validated with jsonschema and only reported in the logs. The token cap and a
deadline bound it either way.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("cache_backend.structured")


class JsonValueTracker:
    """Feed text; get back the part that belongs to the JSON value, and whether it is complete."""

    def __init__(self) -> None:
        self.started = False
        self.complete = False
        self._depth = 0
        self._in_string = False
        self._escape = False
        self.text = ""

    def feed(self, text: str) -> str:
        out = []
        for ch in text:
            if self.complete:
                break
            if not self.started:
                if ch in "{[":
                    self.started = True
                    self._depth = 1
                    out.append(ch)
                continue
            out.append(ch)
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.complete = True
        piece = "".join(out)
        self.text += piece
        return piece


def opening_for(schema: dict[str, Any]) -> str | None:
    """The first character a conforming value must start with, when the schema says so."""
    typ = schema.get("type")
    if typ == "object":
        return "{"
    if typ == "array":
        return "["
    return None


def validate(schema: dict[str, Any], text: str) -> str | None:
    """None if `text` is JSON that conforms to `schema`, else a one-line reason."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not valid JSON: {e}"
    try:
        import jsonschema

        cls = jsonschema.validators.validator_for(schema)
        errors = sorted(cls(schema).iter_errors(value), key=lambda e: list(e.path))
    except Exception as e:  # a schema jsonschema cannot handle is reported, never fatal
        return f"schema could not be checked: {e}"
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "(root)"
        return f"{where}: {e.message}"
    return None
