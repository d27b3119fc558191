"""What a Claude Code /v1/messages request is made of, and which parts of it are volatile.

One place for this knowledge, shared by the proxy addons, the scripts and the cache backend:
- the billing block (`x-anthropic-billing-header: cc_version=...; cch=...;`) in every known form,
- the conversation key (session id, sub-agent id) and the request kind (main, sub-agent, side),
- `strip_volatile`, which removes volatile system blocks from the raw body without re-serialising it.

Claude Code changes often, so recognition goes by pattern, never by one version's exact shape.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ccwarm import jsonedit, jsonsafe

BILLING_HEADER_NAME = "x-anthropic-billing-header"
MESSAGES_PATHS = ("/v1/messages", "/v1/messages/count_tokens")

SESSION_HEADER = "x-claude-code-session-id"
AGENT_HEADERS = ("x-claude-code-agent-id",)
PARENT_AGENT_HEADERS = ("x-claude-code-parent-agent-id",)

# Tolerant on purpose: any case, spaces around ':', leading whitespace.
_BILLING_LINE = re.compile(r"^[ \t]*x-anthropic-billing-header[ \t]*:(?P<fields>[^\n]*)$", re.I | re.M)
_LEGACY_USER_ID = re.compile(r"_session_(?P<session>[0-9a-fA-F-]{8,})$")


class PayloadError(ValueError):
    """The body is not a request we can edit; the message says what is wrong and where."""


@dataclass(frozen=True)
class BillingHeader:
    """The parsed fields of one billing line, unknown fields included, in their order."""

    text: str
    fields: dict[str, str]

    @property
    def version(self) -> str | None:
        return self.fields.get("cc_version")

    @property
    def entrypoint(self) -> str | None:
        return self.fields.get("cc_entrypoint")

    @property
    def cch(self) -> str | None:
        return self.fields.get("cch")

    @property
    def is_subagent(self) -> bool:
        return self.fields.get("cc_is_subagent", "").lower() in ("true", "1", "yes")

    def describe(self) -> str:
        """Short human summary, e.g. `billing header cc_version=2.1.39.c39 cch=56445`."""
        shown = [f"{k}={v}" for k, v in self.fields.items() if k in ("cc_version", "cch", "cc_prev_req")]
        if self.is_subagent:
            shown.append("subagent")
        return " ".join(["billing header", *shown]) if shown else "billing header"


def parse_billing_header(text: str) -> BillingHeader | None:
    """The billing header if `text` (a block's text or a whole system string) contains one."""
    m = _BILLING_LINE.search(text)
    if m is None:
        return None
    fields: dict[str, str] = {}
    for part in m.group("fields").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        fields[key.strip()] = value.strip() if sep else ""
    return BillingHeader(text=m.group(0).strip(), fields=fields)


def is_billing_block(block: Any) -> bool:
    """A system list entry that is the billing block (its text starts with the header)."""
    if not isinstance(block, Mapping):
        return False
    text = block.get("text")
    return isinstance(text, str) and _BILLING_LINE.match(text.lstrip("\n")) is not None


def billing_header_of(system: Any) -> BillingHeader | None:
    """The billing header of a `system` value in either form (string or block list)."""
    if isinstance(system, str):
        return parse_billing_header(system)
    if isinstance(system, list):
        for block in system:
            if is_billing_block(block):
                return parse_billing_header(block["text"])
    return None


# --- conversation identity --------------------------------------------------------------------


class RequestKind(enum.StrEnum):
    MAIN = "main"
    SUBAGENT = "subagent"
    SIDE = "side"


def _header(headers: Mapping[str, str] | None, names: Iterable[str]) -> str | None:
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in names:
        value = lowered.get(name)
        if value:
            return value
    return None


def session_id_from_user_id(user_id: Any) -> str | None:
    """Session id inside `metadata.user_id`: JSON form, or legacy `user_..._session_<uuid>`."""
    if not isinstance(user_id, str) or not user_id:
        return None
    if user_id.lstrip().startswith("{"):
        try:
            parsed = json.loads(user_id)
        except ValueError:
            return None
        sid = parsed.get("session_id") if isinstance(parsed, dict) else None
        return sid if isinstance(sid, str) and sid else None
    m = _LEGACY_USER_ID.search(user_id)
    return m.group("session") if m else None


_CLASSIFIER = re.compile(r"^\s*You are a security monitor for autonomous AI coding agents", re.M)
_COMPACTION = re.compile(r"CRITICAL: Respond with TEXT ONLY\. Do NOT call any tools")


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for block in value:
            if isinstance(block, Mapping) and isinstance(block.get("text"), str):
                yield block["text"]


def purpose(body: Mapping[str, Any]) -> str | None:
    """What a request is for, when its shape says more than its kind: "classifier" (auto mode's
    permission check), "compaction" (/compact's summary request), "title" (json_schema output)."""
    if any(_CLASSIFIER.search(t) for t in _texts(body.get("system"))):
        return "classifier"
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], Mapping):
        if any(_COMPACTION.search(t) for t in _texts(msgs[-1].get("content"))):
            return "compaction"
    oc = body.get("output_config")
    if isinstance(oc, Mapping) and isinstance(oc.get("format"), Mapping):
        return "title"
    return None


def is_side_request(body: Mapping[str, Any]) -> bool:
    """Title generation, classifiers, quota probes: requests that carry no tools."""
    return not body.get("tools")


@dataclass(frozen=True)
class RequestIdentity:
    """Which conversation a request belongs to, and what kind of request it is."""

    session_id: str | None
    agent_id: str | None
    kind: RequestKind
    billing: BillingHeader | None = field(default=None, compare=False)

    @property
    def conversation_key(self) -> str:
        key = self.session_id or "no-session"
        if self.agent_id:
            key += f"/agent:{self.agent_id}"
        elif self.kind is RequestKind.SUBAGENT:
            key += "/agent"
        if self.kind is RequestKind.SIDE:
            key += "/side"
        return key


def identify(
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    *,
    dropped: Iterable[Mapping[str, Any] | str] = (),
) -> RequestIdentity:
    """Session, agent and kind of a parsed /v1/messages body (headers are matched case-insensitively).

    `dropped` holds what a proxy removed from the body before (normalize's `{"where", "reason",
    "text"}` records, see `ccwarm.flowmeta`, or plain texts): a removed `cc_is_subagent=true`
    billing block still makes the request a sub-agent's, so that a normalized sub-agent without
    an agent-id header is not mixed into the main conversation.
    """
    billing = billing_header_of(body.get("system"))
    for d in dropped if billing is None else ():
        text = d if isinstance(d, str) else d.get("text")
        billing = parse_billing_header(text) if isinstance(text, str) else None
        if billing is not None:
            break
    session = _header(headers, (SESSION_HEADER,))
    if session is None:
        metadata = body.get("metadata")
        if isinstance(metadata, Mapping):
            session = session_id_from_user_id(metadata.get("user_id"))
    agent = _header(headers, AGENT_HEADERS)
    if is_side_request(body):
        kind = RequestKind.SIDE
    elif agent or (billing is not None and billing.is_subagent):
        kind = RequestKind.SUBAGENT
    else:
        kind = RequestKind.MAIN
    return RequestIdentity(session_id=session, agent_id=agent, kind=kind, billing=billing)


def body_encoding(headers: Mapping[str, str]) -> str | None:
    """The request body's content-encoding when it has one (gzip, br, ...); None for a plain body,
    which is the only kind the addons read or change."""
    encoding = (headers.get("content-encoding") or "identity").strip().lower()
    return None if encoding in ("", "identity") else encoding


def is_messages_path(path: str) -> bool:
    """`/v1/messages` or `/v1/messages/count_tokens`, with or without a query string."""
    return path.split("?", 1)[0].rstrip("/") in MESSAGES_PATHS


# --- stripping volatile blocks ----------------------------------------------------------------


@dataclass(frozen=True)
class Dropped:
    """One removed piece: where it was (`system[0]`, `system:line 1`), its text, and why."""

    where: str
    text: str
    reason: str

    def describe(self) -> str:
        return f"dropped {self.where}: {self.reason}"


@dataclass(frozen=True)
class StripResult:
    body: bytes
    dropped: list[Dropped]

    @property
    def changed(self) -> bool:
        return bool(self.dropped)


def _why_dropped(text: str, patterns: Iterable[re.Pattern[str]]) -> str | None:
    billing = parse_billing_header(text) if _BILLING_LINE.match(text.lstrip("\n")) else None
    if billing is not None:
        return billing.describe()
    for pattern in patterns:
        if pattern.search(text):
            return f"matched {pattern.pattern!r}"
    return None


_RAW_TOKEN = re.compile(r"\\u[0-9a-fA-F]{4}|\\.|[^\\]+", re.S)


def _split_raw_lines(raw: str) -> tuple[list[str], list[str]]:
    """A JSON string literal's raw text split at its newline escapes (`\\n`, `\\u000a`).

    Returns the raw lines and the escape that followed each one but the last.
    """
    lines, seps, current = [], [], []
    for m in _RAW_TOKEN.finditer(raw):
        token = m.group(0)
        if token == "\\n" or token.lower() == "\\u000a":
            lines.append("".join(current))
            seps.append(token)
            current = []
        else:
            current.append(token)
    lines.append("".join(current))
    return lines, seps


def _strip_string_system(text: str, span: jsonedit.Span, patterns: list[re.Pattern[str]]) -> tuple[str, list[Dropped]]:
    lines = json.loads(text[span.start : span.end]).split("\n")
    dropped: list[Dropped] = []
    drop_idx: set[int] = set()
    for n, line in enumerate(lines):
        reason = _why_dropped(line, patterns) if line.strip() else None
        if reason is not None:
            drop_idx.add(n)
            dropped.append(Dropped(where=f"system:line {n + 1}", text=line, reason=reason))
    if not dropped:
        return text, []
    kept = [n for n in range(len(lines)) if n not in drop_idx]
    new_value = "\n".join(lines[n] for n in kept)
    # Keep the client's own escaping: cut the dropped lines out of the raw literal (each kept line
    # keeps the escape that followed it) and check it decodes to what we want; if the literal
    # spells newlines in a way we do not split on, re-encode this one string instead.
    raw_lines, seps = _split_raw_lines(text[span.start + 1 : span.end - 1])
    if len(raw_lines) == len(lines):
        candidate = (
            '"' + "".join(raw_lines[n] + (seps[n] if k + 1 < len(kept) else "") for k, n in enumerate(kept)) + '"'
        )
        if json.loads(candidate) == new_value:
            return jsonedit.replace_span(text, span, candidate), dropped
    return jsonedit.replace_span(text, span, json.dumps(new_value, ensure_ascii=False)), dropped


def strip_volatile(raw: bytes, patterns: Iterable[re.Pattern[str]] = ()) -> StripResult:
    """Remove the billing block and blocks matching `patterns` from a request body's `system`.

    The output is the input text with exactly those blocks (or, for a string `system`, lines)
    cut out; everything else is byte-identical. Raises PayloadError for bodies we must not touch.
    """
    patterns = list(patterns)
    if not raw.strip():
        raise PayloadError("empty body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"body is not UTF-8 (byte {e.start})") from None
    try:
        members = jsonedit.top_level_members(text)
    except jsonedit.JSONEditError:
        try:
            value = jsonsafe.loads(text, "body")
        except jsonsafe.JSONBodyError as decode_error:
            raise PayloadError(str(decode_error)) from None
        raise PayloadError(f"body is a JSON {type(value).__name__}, not an object") from None
    span = members.get("system")
    if span is None:
        return StripResult(raw, [])
    first = text[span.start]
    if first == '"':
        new_text, dropped = _strip_string_system(text, span, patterns)
    elif first == "[":
        items = jsonedit.array_items(text, span)
        dropped, drop_idx = [], set()
        for i, item in enumerate(items):
            block = json.loads(text[item.start : item.end])
            block_text = block.get("text") if isinstance(block, dict) else None
            if not isinstance(block_text, str):
                continue
            reason = _why_dropped(block_text, patterns)
            if reason is not None:
                drop_idx.add(i)
                dropped.append(Dropped(where=f"system[{i}]", text=block_text, reason=reason))
        if not dropped:
            return StripResult(raw, [])
        new_text = jsonedit.replace_span(text, span, jsonedit.drop_array_items(text, span, drop_idx))
    elif text.startswith("null", span.start):
        return StripResult(raw, [])
    else:
        raise PayloadError(
            f"'system' is neither a string nor a list of blocks (found {text[span.start : span.start + 20]!r})"
        )
    if not dropped:
        return StripResult(raw, [])
    return StripResult(new_text.encode("utf-8"), dropped)
