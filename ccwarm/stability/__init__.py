"""Prefix stability: what changed between two consecutive requests of one conversation.

A local server renders a /v1/messages request into one prompt text, in this order: `tools`, then
`system`, then `messages`, and reuses the KV cache of the longest prefix it has seen before. So
between two consecutive requests of one conversation, every change is one of:

- **growth** (`growth`): new messages appended at the end (or blocks appended to the last message).
  Expected: the cached prefix is still valid.
- **prefix break** (`prefix_break`): an earlier part changed (a tool, a system block, an old
  message, a message inserted before existing ones, messages removed). Everything after it must
  be prefilled again. Reported with the JSON path of the first difference (`system[0].text`,
  `messages[0].content[0].text`, `tools` for a re-ordered tool list), the block it belongs to
  (`system[0]`, `messages[0].content[0]`), the character offset of the first difference in that
  block's rendered text, the approximate number of rendered characters before it
  (`prefix_chars`), and for the billing block the fields that changed (`cch 56445 -> 1a2b3`).
- **JSON-only** (`json_only`): the JSON changed but the rendered text did not: `cache_control`
  markers moved, a one-text-block content list flipped to a plain string, `metadata`,
  `max_tokens` and other request options. Noted, never flagged.

The package, in the order a request goes through it:
- `render.py`: the rendering model ("rendered text": what a chat template prints, in characters);
- `compare.py` (tools, system, options) and `messages.py` (the message list): `compare()`;
- `changes.py`: what a comparison reports (`Change`, `RequestDiff`) and how a change is located;
- `tracker.py`: `StabilityTracker`, requests grouped by conversation, counts per block;
- `report.py`: the tracker's summary as Markdown and JSON; `outline.py`: one request as text
  (mitmweb's content view). Secrets are redacted by `ccwarm/redact.py`.
"""

from ccwarm.redact import REDACTED, Redactor, is_secret_header
from ccwarm.stability.changes import (
    GROWTH,
    JSON_ONLY,
    PREFIX_BREAK,
    Change,
    RequestDiff,
    billing_field_changes,
    describe_fields,
    excerpt,
    first_difference,
)
from ccwarm.stability.compare import compare
from ccwarm.stability.outline import describe_request
from ccwarm.stability.render import message_len, render_block, render_message, render_tool, short_hash
from ccwarm.stability.report import summary_markdown, write_summary
from ccwarm.stability.tracker import SCHEMA_VERSION, ConversationStats, Observation, StabilityTracker

__all__ = [
    "GROWTH",
    "JSON_ONLY",
    "PREFIX_BREAK",
    "REDACTED",
    "SCHEMA_VERSION",
    "Change",
    "ConversationStats",
    "Observation",
    "Redactor",
    "RequestDiff",
    "StabilityTracker",
    "billing_field_changes",
    "compare",
    "describe_fields",
    "describe_request",
    "excerpt",
    "first_difference",
    "is_secret_header",
    "message_len",
    "render_block",
    "render_message",
    "render_tool",
    "short_hash",
    "summary_markdown",
    "write_summary",
]
